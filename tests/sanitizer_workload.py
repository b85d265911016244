"""A small run of every CUDA kernel for compute-sanitizer: odd sizes, several pieces a task.

    compute-sanitizer --tool memcheck python tests/sanitizer_workload.py

Sizes are small because the sanitizer slows every access; the pieces end off the block
boundaries so that out-of-bounds accesses at the tails would be reported.
"""

from __future__ import annotations

import torch

from emtl_kernels import TaskGradients, available_backends, task_gram, weighted_combine

SIZES = (1, 127, 4099, 70_001)


def main() -> None:
    device = torch.device("cuda")
    backends = [b for b in available_backends(device) if b != "reference"]
    for dtype in (torch.float32, torch.bfloat16):
        for num_tasks in (1, 3, 17):
            rows = [[torch.randn(size, device=device, dtype=dtype) for size in SIZES] for _ in range(num_tasks)]
            grads = TaskGradients(rows)
            weights = torch.randn(num_tasks, device=device)
            for backend in backends:
                outs = [torch.zeros(size, device=device, dtype=dtype) for size in SIZES]
                task_gram(grads, backend=backend)
                weighted_combine(grads, weights, out=outs, accumulate=True, backend=backend)
                print(f"{backend} {dtype} T={num_tasks}: ok", flush=True)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
