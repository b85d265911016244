"""One Gram pass and one combine pass of each CUDA backend at P = 2²⁴, for ``ncu``.

    ncu --profile-from-start off python tests/profile_workload.py

Each pass runs once eagerly first (the Triton backend tunes then, timing its candidates), so the
profiler sees only the chosen launches: ``torch.cuda.profiler`` brackets one call of each.
"""

from __future__ import annotations

import torch

from emtl_kernels import TaskGradients, available_backends, task_gram, weighted_combine

NUM_TASKS, NUMEL = 8, 2**24


def main() -> None:
    device = torch.device("cuda")
    for dtype in (torch.float32, torch.bfloat16):
        grads = TaskGradients.from_matrix(torch.randn(NUM_TASKS, NUMEL, device=device, dtype=dtype))
        weights = torch.randn(NUM_TASKS, device=device)
        out = torch.empty(NUMEL, device=device, dtype=dtype)
        for backend in (b for b in available_backends(device) if b != "reference"):
            task_gram(grads, backend=backend)
            weighted_combine(grads, weights, out=[out], backend=backend)
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            task_gram(grads, backend=backend)
            weighted_combine(grads, weights, out=[out], backend=backend)
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            print(f"{backend} {dtype}: profiled", flush=True)


if __name__ == "__main__":
    main()
