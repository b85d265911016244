"""One op contract for the backends that register custom ops (native: ``torch.ops.emtl_kernels``,
Triton: ``torch.ops.emtl_triton``): the names and schemas of ``backends.contract.OPS``,
``torch.library.opcheck`` on every op (schema, fake kernel, autograd registration, AOT dispatch),
and each op computing what its backend's eager call computes."""

from __future__ import annotations

import pytest
import torch
from task_gradient_cases import make_task_gradients

from emtl_kernels import TaskGradients, backends
from emtl_kernels.backends import native, triton
from emtl_kernels.backends.contract import OPS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NAMESPACES = {"native": native.OP_NAMESPACE, "triton": triton.OP_NAMESPACE}
OP_BACKENDS = [
    pytest.param(name, device, id=f"{name}-{device}")
    for name in NAMESPACES
    for device in DEVICES
    if backends.unavailable_reason(name, device) is None
]


def registered(name: str):
    return getattr(torch.ops, NAMESPACES[name])


@pytest.mark.parametrize("name", list(NAMESPACES))
def test_every_op_backend_registers_the_contract(name):
    if name == "native" and backends.unavailable_reason("native", "cpu") is not None:
        pytest.skip("the extension is not built")
    for op_name, op in OPS.items():
        schema = str(getattr(registered(name), op_name).default._schema)
        assert schema == f"{NAMESPACES[name]}::{op_name}{op.schema}"


def cases(device: str) -> list[TaskGradients]:
    matrix, _ = make_task_gradients(3, 1000, torch.float32, "matrix", device=device)
    blocks, _ = make_task_gradients(4, 777, torch.bfloat16, "blocks", device=device, seed=1)
    rows, _ = make_task_gradients(2, 99, torch.float16, "rows", device=device, seed=2)
    return [TaskGradients.from_matrix(matrix), blocks, rows]


@pytest.mark.parametrize("name,device", OP_BACKENDS)
def test_opcheck(name, device):
    ops = registered(name)
    for grads in cases(device):
        pieces, num_tasks = grads.flat_pieces(), grads.num_tasks
        torch.library.opcheck(ops.task_gram.default, (pieces, num_tasks))
        torch.library.opcheck(ops.task_sq_norms.default, (pieces, num_tasks))
        weights = torch.linspace(-1.0, 2.0, num_tasks, device=device)
        for accumulate in (False, True):
            outs = [torch.randn(size, device=device).to(grads.dtype) for size in grads.sizes]
            torch.library.opcheck(ops.weighted_combine_.default, (pieces, num_tasks, weights, outs, accumulate))


@pytest.mark.parametrize("name,device", OP_BACKENDS)
def test_ops_compute_what_the_backend_computes(name, device):
    ops, backend = registered(name), backends.resolve(name, torch.device(device))
    for grads in cases(device):
        pieces, num_tasks = grads.flat_pieces(), grads.num_tasks
        assert torch.equal(ops.task_gram(pieces, num_tasks), backend.gram(grads))
        assert torch.equal(ops.task_sq_norms(pieces, num_tasks), backend.sq_norms(grads))
        weights = torch.linspace(-1.0, 2.0, num_tasks, device=device)
        start = [torch.randn(size, device=device).to(grads.dtype) for size in grads.sizes]
        by_op, by_backend = [s.clone() for s in start], [s.clone() for s in start]
        ops.weighted_combine_(pieces, num_tasks, weights, by_op, True)
        backend.combine(grads, weights, by_backend, True)
        assert all(torch.equal(a, b) for a, b in zip(by_op, by_backend, strict=True))


@pytest.mark.parametrize("name,device", OP_BACKENDS)
def test_fake_kernels_refuse_pieces_that_do_not_divide_into_tasks(name, device):
    ops = registered(name)
    pieces = [torch.randn(4, device=device) for _ in range(3)]
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fakes = [mode.from_tensor(piece) for piece in pieces]
        with pytest.raises(RuntimeError, match="got 3 pieces for 2 tasks"):
            ops.task_gram(fakes, 2)
        assert ops.task_sq_norms(fakes, 3).shape == (3,)
