"""Shared test setup: Triton runs in its interpreter where no GPU is present."""

import os

import torch

# Must be set before triton is first imported: without a GPU, Triton kernels then run on CPU
# tensors through the interpreter, which is how CI tests them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
