"""Shared test setup: Triton runs in its interpreter where no GPU is present."""

import os

# The interpreter multiplies tiles with numpy; on a small shared CI machine OpenBLAS threads only
# contend (tens of ms per tile product instead of tens of µs). Set before numpy is loaded.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch

# Must be set before triton is first imported: without a GPU, Triton kernels then run on CPU
# tensors through the interpreter, which is how CI tests them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings

# CI draws the same examples every run, so that a red run is a bug to replay, never the luck of
# the draw; a local run explores new examples each time.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
