"""The compiled backend: its custom ops under torch.compile, determinism across thread counts,
many-tensor inputs, errors raised from C++, and the ISA variants.

Parity with float64 over the full matrix of T, P, dtypes and layouts is in test_ops_parity.py,
which runs every available backend, this one included; the ops' schemas and opcheck are in
test_ops_contract.py, with the Triton backend's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _asserts import assert_combine_close, assert_gram_close, assert_passes_close, assert_sq_norms_close, combine64
from task_gradient_cases import make_task_gradients

from emtl_kernels import TaskGradients, _extension, backends, task_gram, task_sq_norms, weighted_combine
from emtl_kernels.backends import native

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
#: The CPU kernel variants, widest first; EMTL_CPU_ISA names one narrower than the CPU's to force it.
CPU_ISAS = ("avx512", "avx2", "baseline")
CUDA = torch.cuda.is_available() and backends.unavailable_reason("native", "cuda") is None

needs_extension = pytest.mark.skipif(
    _extension.LOAD_ERROR is not None, reason=f"native extension not built: {_extension.LOAD_ERROR}"
)
needs_cuda_extension = pytest.mark.skipif(not CUDA, reason="no GPU, or the extension was built without CUDA")
ops = torch.ops.emtl_kernels if _extension.LOAD_ERROR is None else None


def many_tensors(num_tasks: int, dtype: torch.dtype, *, count: int = 300, device="cpu", seed: int = 0):
    """(TaskGradients over ``count`` small tensors of uneven sizes, float64 J): ~75k elements,
    so the fixed chunks of the kernels cut through tensors."""
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 500, (count,), generator=generator).tolist()
    exact = torch.randn(num_tasks, sum(sizes), generator=generator, dtype=torch.float64).to(dtype).double()
    rows = [[piece.to(dtype).to(device) for piece in row.split(sizes)] for row in exact]
    return TaskGradients(rows), exact


def test_unavailable_reasons_say_how_to_build(monkeypatch):
    monkeypatch.setattr(_extension, "LOAD_ERROR", "No module named 'emtl_kernels._C'")
    assert "pip install --no-build-isolation -e ." in native.BACKEND.unavailable_reason(torch.device("cpu"))
    monkeypatch.setattr(_extension, "LOAD_ERROR", None)
    monkeypatch.setattr(_extension, "WITH_CUDA", False)
    assert "without CUDA" in native.BACKEND.unavailable_reason(torch.device("cuda"))
    assert native.BACKEND.unavailable_reason(torch.device("meta")) is not None


@needs_extension
def test_auto_picks_native_on_cpu():
    grads = TaskGradients.from_matrix(torch.randn(3, 10))
    for kernel_pass in ("gram", "sq_norms", "combine"):
        assert backends.AUTO.choose(kernel_pass, grads, run=None) is native.BACKEND
    assert "native" in backends.available_backends("cpu")
    assert _extension.CPU_ISA in CPU_ISAS


# ---- registration: torch.compile (opcheck: test_ops_contract.py)


def balanced_step(pieces: list[torch.Tensor], num_tasks: int, outs: list[torch.Tensor]) -> torch.Tensor:
    """A step in miniature: Gram, inverse-norm weights, combination into ``outs``."""
    gram = ops.task_gram(pieces, num_tasks)
    weights = 1.0 / (ops.task_sq_norms(pieces, num_tasks).sqrt() + 1e-8)
    ops.weighted_combine_(pieces, num_tasks, weights, outs, True)
    return gram


@needs_extension
def test_ops_compile_with_fullgraph():
    grads, _ = make_task_gradients(3, 500, torch.float32, "blocks")
    pieces = grads.flat_pieces()
    start = [torch.randn(size) for size in grads.sizes]
    eager_outs = [s.clone() for s in start]
    compiled_outs = [s.clone() for s in start]
    torch._dynamo.reset()
    compiled = torch.compile(balanced_step, fullgraph=True, backend="inductor")
    gram = compiled(pieces, 3, compiled_outs)
    assert torch.equal(gram, balanced_step(pieces, 3, eager_outs))
    # Inductor fuses 1 / (sqrt(x) + eps) into code whose last bit can differ from eager's on some
    # CPUs, so the weights agree to float32 rounding only, and the outputs through them to that
    # rounding on the scale of the sum (cancellation makes small elements' relative error larger).
    eps = torch.finfo(torch.float32).eps
    for compiled_out, eager_out in zip(compiled_outs, eager_outs, strict=True):
        torch.testing.assert_close(compiled_out, eager_out, rtol=0, atol=4 * eps * eager_out.abs().max().item())


# ---- determinism


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tasks", [5, 8, 33])
def test_one_and_two_threads_agree_bit_for_bit(dtype, num_tasks):
    # T × 200k elements in three tensors: several fixed chunks, split between the threads. T = 5
    # and 8: one and two register sweeps at 16 lanes, a triangle and strips of 2 columns at 8;
    # T = 33: every tile shape, and the combine's task groups.
    grads, exact = make_task_gradients(num_tasks, 200_003, dtype, "blocks", seed=11)
    weights = torch.linspace(-1.0, 2.0, num_tasks)
    weights[2] = 0.0
    previous_threads = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs = [
                (
                    task_gram(grads, backend="native"),
                    task_sq_norms(grads, backend="native"),
                    torch.cat(weighted_combine(grads, weights, backend="native")),
                )
                for _ in range(2)
            ]
            for first, second in zip(*runs, strict=True):
                assert torch.equal(first, second), f"not reproducible with {threads} thread(s)"
            results[threads] = runs[0]
    finally:
        torch.set_num_threads(previous_threads)
    for threads in (2, 3):
        for one, more in zip(results[1], results[threads], strict=True):
            assert torch.equal(one, more), f"1 and {threads} threads differ"
    assert_gram_close(results[1][0], exact)


# ---- several Gram blocks and combine spans


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tasks", [2, 3, 4, 5, 7, 8, 16, 17, 31, 32, 33, 66])
@pytest.mark.parametrize("layout", ["matrix", "strided_rows", "blocks"])
def test_passes_over_several_blocks_match_float64(dtype, num_tasks, layout):
    # 7001 elements: 2 to 37 of the Gram pass's column blocks (28 KiB of float32 over T rows),
    # neither a whole number of blocks nor of vectors, so every tile asks for the next block's
    # rows, the last block of each tensor for its own, and a tail follows (T = 5-8 at 16 lanes:
    # register sweeps over blocks of 512 elements, 13 in a whole row, then a shorter one and a
    # widened tail); an odd number of
    # vectors (437 of 16, 875 of 8), so a triangle read in place with two accumulators a slot
    # (T <= 4) ends on a single vector; strips of 6 columns from T = 17 (AVX-512), many of them at
    # T = 66, whose last row block has 2 rows and whose tiles store an odd count of accumulators;
    # and several combine spans read in task groups that ask for the next span (T > 8).
    # strided_rows: rows that are not contiguous; blocks: five tensors, each its own run of blocks.
    grads, exact = make_task_gradients(num_tasks, 7001, dtype, layout, seed=num_tasks)
    assert_passes_close(grads, exact, torch.linspace(-1.0, 1.5, num_tasks), dtype, "native")


# ---- many small tensors


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tasks", [1, 6, 13])
def test_hundreds_of_small_tensors(dtype, num_tasks):
    grads, exact = many_tensors(num_tasks, dtype, seed=num_tasks)
    assert_gram_close(task_gram(grads, backend="native"), exact)
    assert_sq_norms_close(task_sq_norms(grads, backend="native"), exact)
    weights = torch.randn(num_tasks, generator=torch.Generator().manual_seed(3))
    before = [torch.randn(size).to(dtype) for size in grads.sizes]
    outs = [b.clone() for b in before]
    weighted_combine(grads, weights, out=outs, accumulate=True, backend="native")
    expected, scale = combine64(exact, weights)
    start = torch.cat(before).double()
    assert_combine_close(outs, expected + start, scale + start.abs(), dtype)


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tasks", [4, 8])
def test_non_finite_in_a_tail_reaches_the_diagonal(dtype, num_tasks):
    # The last element of the last tensor: read by the counted (partial-vector) loads. T = 8 at 16
    # lanes: rows 0 and 2 in the first triangle of the register sweeps, the last row in the second.
    grads, _ = many_tensors(num_tasks, dtype, count=50, seed=5)
    grads.rows[2][-1][-1] = float("nan")
    grads.rows[0][-1][-1] = float("inf")
    grads.rows[-1][-1][-1] = float("nan")
    expected = [task not in (0, 2, num_tasks - 1) for task in range(num_tasks)]
    assert torch.isfinite(task_gram(grads, backend="native").diagonal()).tolist() == expected
    assert torch.isfinite(task_sq_norms(grads, backend="native")).tolist() == expected


# ---- errors raised by the C++ checks (the ops called directly, past the Python checks)


def error_cases():
    a, b = torch.randn(10), torch.randn(10)
    w, out = torch.ones(2), [torch.zeros(10)]
    return {
        "num_tasks must be at least 1": (ops.task_gram, ([a, b], 0)),
        "pieces for 3 tasks": (ops.task_gram, ([a, b], 3)),
        "one dtype for all": (ops.task_gram, ([a, b.half()], 2)),
        "supported: float32, bfloat16, float16": (ops.task_sq_norms, ([a.double(), b.double()], 2)),
        "has 9 elements": (ops.task_gram, ([a, b[:9]], 2)),
        "is not contiguous": (ops.task_gram, ([a, torch.randn(20)[::2]], 2)),
        "weights must be float32": (ops.weighted_combine_, ([a, b], 2, w.double(), out, False)),
        "weights must be a 1-D tensor of num_tasks = 2": (
            ops.weighted_combine_,
            ([a, b], 2, torch.ones(3), out, False),
        ),
        "got 2 outputs for 1 shared tensors": (ops.weighted_combine_, ([a, b], 2, w, out * 2, False)),
        "output 0 has dtype": (ops.weighted_combine_, ([a, b], 2, w, [torch.zeros(10).half()], False)),
        "output 0 has 11 elements": (ops.weighted_combine_, ([a, b], 2, w, [torch.zeros(11)], False)),
        "output 0 is not contiguous": (ops.weighted_combine_, ([a, b], 2, w, [torch.zeros(20)[::2]], False)),
    }


@needs_extension
@pytest.mark.parametrize("message", list(error_cases()) if _extension.LOAD_ERROR is None else [])
def test_cpp_checks_raise_clear_errors(message):
    op, args = error_cases()[message]
    with pytest.raises((RuntimeError, TypeError), match=message):
        op(*args)


@needs_cuda_extension
def test_device_mix_raises_on_cuda():
    a, b = torch.randn(10, device="cuda"), torch.randn(10)
    with pytest.raises(RuntimeError, match="one device for all"):
        ops.task_gram([a, b], 2)
    with pytest.raises(RuntimeError, match="weights are on"):
        ops.weighted_combine_([a, a.clone()], 2, torch.ones(2), [torch.zeros(10, device="cuda")], False)


# ---- the kernel variants: the per-pass choice, and each variant forced


@needs_extension
def test_each_pass_runs_a_variant_no_wider_than_cpu_isa():
    forced = os.environ.get("EMTL_CPU_ISA")
    for kernel_pass in ("gram", "sq_norms", "combine"):
        for dtype in DTYPES:
            for num_tasks in range(1, 41):
                isa = _extension.cpu_pass_isa(kernel_pass, dtype, num_tasks)
                assert CPU_ISAS.index(isa) >= CPU_ISAS.index(_extension.CPU_ISA), (kernel_pass, dtype, num_tasks)
                if forced in CPU_ISAS or (kernel_pass == "gram" and num_tasks >= 16):
                    # bench/roofline.py measures the FMA peak as wide as CPU_ISA for the T >= 16 Gram.
                    assert isa == _extension.CPU_ISA, (kernel_pass, dtype, num_tasks)


@needs_extension
@pytest.mark.parametrize("args", [("gemm", "float32", 4), ("gram", "float64", 4), ("gram", "float32", 0)])
def test_cpu_pass_isa_rejects_unknown_names(args):
    with pytest.raises(ValueError, match="cpu_pass_isa"):
        _extension._C.cpu_pass_isa(*args)


ISA_CHECK = """
import sys
import torch
from emtl_kernels import _extension
from _asserts import assert_passes_close
from task_gradient_cases import make_task_gradients
forced = sys.argv[1]  # the variant EMTL_CPU_ISA names, or "" for the per-pass default
assert _extension.CPU_ISA == (forced or _extension.CPU_ISA), _extension.CPU_ISA
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for num_tasks in (1, 2, 3, 5, 8, 16, 17, 31, 32, 33):
        if forced:
            for kernel_pass in ("gram", "sq_norms", "combine"):
                assert _extension.cpu_pass_isa(kernel_pass, dtype, num_tasks) == forced
        for layout in ("strided_rows", "blocks"):
            grads, exact = make_task_gradients(num_tasks, 4099, dtype, layout, seed=num_tasks)
            assert_passes_close(grads, exact, torch.linspace(-1, 1, num_tasks), dtype, "native")
"""


def runs_here(isa: str) -> bool:
    """Whether this build and CPU run ``isa`` when EMTL_CPU_ISA names it ("": the default)."""
    widest = _extension.CPU_ISA
    return isa == "" or (widest in CPU_ISAS and CPU_ISAS.index(isa) >= CPU_ISAS.index(widest))


def isa_env(isa: str) -> dict[str, str]:
    """This process's environment with EMTL_CPU_ISA naming ``isa`` (unset for "")."""
    env = {name: value for name, value in os.environ.items() if name != "EMTL_CPU_ISA"}
    return env | {"EMTL_CPU_ISA": isa} if isa else env


@needs_extension
@pytest.mark.parametrize("isa", ["", *CPU_ISAS], ids=["per-pass", *CPU_ISAS])
def test_each_isa_setting_matches_float64(isa):
    # Every variant the CPU runs, forced on every pass, and the default's per-pass mix: in a
    # process of its own, as the choice is made once per process.
    if not runs_here(isa):
        pytest.skip(f"the kernels run {_extension.CPU_ISA} at most here: {isa} is not a variant of this build")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = isa_env(isa) | {"PYTHONPATH": os.pathsep.join([tests_dir, *sys.path])}
    result = subprocess.run([sys.executable, "-c", ISA_CHECK, isa], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
