"""The Triton backend's own checks, beyond the generic parity matrix of test_ops_parity.py.

On a CPU these run the kernels in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 when
no GPU is present); on a GPU machine the same tests run on CUDA, plus the GPU-only ones at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _asserts import assert_combine_close, assert_gram_close, assert_passes_close, combine64
from task_gradient_cases import make_task_gradients

from emtl_kernels import TaskGradients, task_gram, task_sq_norms, weighted_combine
from emtl_kernels.backends import auto_candidates, resolve, unavailable_reason

DEVICE = next((d for d in ("cuda", "cpu") if unavailable_reason("triton", d) is None), None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason=f"Triton cannot run here: {unavailable_reason('triton', 'cpu')}")
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")

if DEVICE is not None:
    from emtl_kernels.triton_kernels import passes as triton_passes
    from emtl_kernels.triton_kernels import tables, tuning
    from emtl_kernels.triton_kernels.combine import combine_launcher
    from emtl_kernels.triton_kernels.gram import gram_launcher

    # The interpreter's tile (4096); one off it is also one off a multiple of every smaller
    # power-of-two tile a GPU configuration may use.
    BLOCK = tuning.INTERPRETER_CONFIG.block
else:
    BLOCK = 1  # every test skips

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check_all_passes(grads, exact: torch.Tensor, dtype: torch.dtype, seed: int) -> None:
    """Gram, squared norms and combination of ``grads`` against the float64 ``exact`` J."""
    weights = torch.randn(exact.shape[0], generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    assert_passes_close(grads, exact, weights, dtype, "triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 7, BLOCK - 1, BLOCK + 1, 10**5 + 3])
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 8, 17, 32])
def test_passes_match_float64(num_tasks, numel, dtype):
    grads, exact = make_task_gradients(num_tasks, numel, dtype, "rows", device=DEVICE, seed=num_tasks + numel)
    check_all_passes(grads, exact, dtype, seed=numel)


@pytest.mark.parametrize("num_tasks", [33, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tasks_beyond_one_register_block(num_tasks, dtype):
    grads, exact = make_task_gradients(num_tasks, 3001, dtype, "blocks", device=DEVICE, seed=num_tasks)
    check_all_passes(grads, exact, dtype, seed=num_tasks)


def mixed_size_gradients(num_tasks: int, num_tensors: int, dtype: torch.dtype, seed: int):
    """Per-task gradients on ``num_tensors`` parameters of mixed shapes (separate allocations, as
    autograd returns them), with their float64 J and the parameter shapes."""
    generator = torch.Generator().manual_seed(seed)
    shapes = []
    for k in range(num_tensors):
        if k % 50 == 7:
            shapes.append((3, 16411))  # a few tensors span several chunks
        elif k % 3 == 0:
            shapes.append((int(torch.randint(1, 40, (1,), generator=generator)), 17))
        else:
            shapes.append((int(torch.randint(1, 3000, (1,), generator=generator)),))
    rows = [
        [(torch.randn(shape, generator=generator, dtype=torch.float64) * 10.0 ** (i - 2)).to(dtype) for shape in shapes]
        for i in range(num_tasks)
    ]
    exact = torch.stack([torch.cat([piece.reshape(-1).double() for piece in row]) for row in rows])
    device_rows = [[piece.to(DEVICE) for piece in row] for row in rows]
    return TaskGradients(device_rows), exact, shapes


def test_many_tensors_of_mixed_sizes():
    dtype = torch.bfloat16
    grads, exact, shapes = mixed_size_gradients(5, 200, dtype, seed=11)
    check_all_passes(grads, exact, dtype, seed=3)
    # Into each parameter's own .grad, adding to what is there.
    weights = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0], device=DEVICE)
    before = [torch.randn(shape, dtype=torch.float64).to(dtype).to(DEVICE) for shape in shapes]
    outs = [b.clone() for b in before]
    weighted_combine(grads, weights, out=outs, accumulate=True, backend="triton")
    expected, scale = combine64(exact, weights)
    start = torch.cat([b.reshape(-1).double().cpu() for b in before])
    assert_combine_close(outs, expected + start, scale + start.abs(), dtype)
    # Into views of one flat buffer: most views start off a 16-byte boundary.
    flat = torch.full((grads.numel,), float("nan"), dtype=dtype, device=DEVICE)
    views = list(flat.split(grads.sizes))
    assert not tables.output_table(views)[1]
    weighted_combine(grads, weights, out=views, backend="triton")
    assert_combine_close(flat, expected, scale, dtype)


@pytest.mark.parametrize("num_tasks", [3, 17, 40])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_value_reaches_the_diagonal_on_every_path(num_tasks, bad):
    grads, _ = make_task_gradients(num_tasks, 3 * tables.CHUNK_ELEMENTS + 9, torch.bfloat16, "rows", device=DEVICE)
    row = num_tasks - 2
    assert grads.sizes[-1] > tables.CHUNK_ELEMENTS
    grads.rows[row][-1][-1] = bad  # in the partial tile ending the second chunk of the last tensor
    diagonal = task_gram(grads, backend="triton").diagonal().cpu()
    expected = [i != row for i in range(num_tasks)]
    assert torch.isfinite(diagonal).tolist() == expected
    assert torch.isfinite(task_sq_norms(grads, backend="triton")).cpu().tolist() == expected


@pytest.mark.parametrize("num_tasks", [8, 17])
def test_repeat_runs_are_bit_identical(num_tasks):
    grads, _ = make_task_gradients(num_tasks, 10**5 + 3, torch.bfloat16, "rows", device=DEVICE, seed=2)
    weights = torch.randn(num_tasks).to(DEVICE)
    first = (
        task_gram(grads, backend="triton"),
        task_sq_norms(grads, backend="triton"),
        torch.cat(weighted_combine(grads, weights, backend="triton")),
    )
    # A new TaskGradients of the same tensors: the tables come from the cache.
    again = TaskGradients(grads.rows)
    second = (
        task_gram(again, backend="triton"),
        task_sq_norms(again, backend="triton"),
        torch.cat(weighted_combine(again, weights, backend="triton")),
    )
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_tables_are_built_once_and_reused():
    grads, _ = make_task_gradients(4, 2 * tables.CHUNK_ELEMENTS + 1, torch.float32, "rows", device=DEVICE)
    first = tables.row_tables(grads)
    assert tables.row_tables(grads) is first
    cached = len(tables.DEVICE_TABLES)
    again = tables.row_tables(TaskGradients(grads.rows))
    assert again is not first
    assert again.row_pointers is first.row_pointers and again.chunks is first.chunks
    assert len(tables.DEVICE_TABLES) == cached
    assert first.row_pointers.dtype == torch.int64
    assert first.row_pointers.cpu().view(len(grads.sizes), 4).tolist() == [
        [grads.rows[i][k].data_ptr() for i in range(4)] for k in range(len(grads.sizes))
    ]
    outs = [torch.empty(size, device=DEVICE) for size in grads.sizes]
    assert tables.output_table(outs)[0] is tables.output_table(list(outs))[0]


def test_a_step_on_the_same_memory_reuses_its_launchers():
    """New tensor objects over the previous step's memory (a training loop's steady state) find
    the launchers of that step; moved memory gets its own, and each computes its own input."""
    triton_passes.clear()
    grads, exact = make_task_gradients(5, 3001, torch.float32, "rows", device=DEVICE, seed=13)
    weights = torch.linspace(-1, 1, 5, device=DEVICE)
    first = (task_gram(grads, backend="triton"), weighted_combine(grads, weights, backend="triton"))
    kept = dict(triton_passes._LAUNCHERS)
    same_memory = TaskGradients([[piece.view(-1) for piece in row] for row in grads.rows])
    outs = [out.view(-1) for out in first[1]]
    assert torch.equal(task_gram(same_memory, backend="triton"), first[0])
    weighted_combine(same_memory, weights, out=outs, backend="triton")
    assert dict(triton_passes._LAUNCHERS) == kept
    moved = TaskGradients([[2 * piece for piece in row] for row in grads.rows])
    assert_gram_close(task_gram(moved, backend="triton"), 2 * exact)
    assert_combine_close(
        weighted_combine(moved, weights, backend="triton"), *combine64(2 * exact, weights), torch.float32
    )
    assert len(triton_passes._LAUNCHERS) == len(kept) + 2  # its Gram, its combine


def test_host_time_benchmark_stubs_every_launch():
    """bench.host_time times the host's part alone: inside its stub nothing is launched (a
    combine leaves its destination as it was), outside it the kernels run again."""
    from bench.host_time import TENSOR_COUNTS, measure, stubbed_launches

    grads, exact = make_task_gradients(3, 1000, torch.float32, "rows", device=DEVICE, seed=14)
    weights = torch.tensor([1.0, -1.0, 2.0], device=DEVICE)
    outs = [torch.zeros(size, device=DEVICE) for size in grads.sizes]
    with stubbed_launches():
        weighted_combine(grads, weights, out=outs, backend="triton")
        assert all(bool((out == 0).all()) for out in outs)
    weighted_combine(grads, weights, out=outs, backend="triton")
    assert_combine_close(outs, *combine64(exact, weights), torch.float32)
    samples = measure(TENSOR_COUNTS[-1], torch.device(DEVICE), steps=3, warmup=1)
    assert {name: len(values) for name, values in samples.items()} == {
        "task_gram": 3,
        "task_sq_norms": 3,
        "weighted_combine": 3,
        "TaskGradients(rows)": 9,
    }


def test_tables_made_during_a_capture_are_staged_once_and_never_overwritten(monkeypatch):
    """The bookkeeping of capture staging, with the capture simulated on the host: each new table
    takes fresh entries, a table met again is the pinned one, and without room it asks for an
    eager step. (On a GPU, test_capture_of_unseen_tensors_* checks the replays themselves.)"""
    staging = tables._CaptureStaging(pin_memory=False)
    staging.MIN_ENTRIES = 8
    monkeypatch.setattr(tables, "CAPTURE_STAGING", staging)
    monkeypatch.setattr(tables, "is_capturing", lambda device: True)
    cache, cpu = tables._DeviceTableCache(capacity=4), torch.device("cpu")

    def built(*values):
        return lambda: torch.tensor(values)

    with pytest.raises(RuntimeError, match="eagerly"):
        cache.get(("addresses", (1,)), cpu, built(1))
    staging.reserve(5)
    first = cache.get(("addresses", (1, 2, 3)), cpu, built(1, 2, 3))
    second = cache.get(("addresses", (4, 5)), cpu, built(4, 5))
    assert cache.get(("addresses", (1, 2, 3)), cpu, built(9, 9, 9)) is first
    assert first.values.tolist() == [1, 2, 3] and second.values.tolist() == [4, 5]
    with pytest.raises(RuntimeError, match="eagerly"):
        cache.get(("addresses", (6, 7, 8, 9)), cpu, built(6, 7, 8, 9))
    staging.reserve(4)  # a new buffer: the full one stays, as graphs still copy from it
    third = cache.get(("addresses", (6, 7, 8, 9)), cpu, built(6, 7, 8, 9))
    assert [table.values.tolist() for table in (first, second, third)] == [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert len(cache) == 3


def test_chunk_table_covers_every_element_with_int64_offsets():
    chunk = tables.CHUNK_ELEMENTS
    sizes = (3, 2 * chunk + 5, 2**31 + 7, chunk)
    spans = tables.chunk_spans(sizes)
    assert spans.dtype == torch.int64
    tensor, start, length = spans
    assert bool((length > 0).all()) and bool((length <= chunk).all())
    for k, size in enumerate(sizes):
        mine = tensor == k
        assert start[mine].tolist() == list(range(0, size, chunk))
        assert int(length[mine].sum()) == size
    last = int(torch.nonzero(tensor == 2)[-1])
    assert (int(start[last]), int(length[last])) == (2**31, 7)


def test_kernels_reach_offsets_past_two_to_the_31():
    """A chunk starting at element 2³¹ + 16 of a shifted base address lands on the real data
    only if the kernels add offsets in 64 bits."""
    num_tasks, numel, dtype = 3, 1000, torch.bfloat16
    grads, exact = make_task_gradients(num_tasks, numel, dtype, "rows", device=DEVICE, seed=9)
    grads = TaskGradients([[torch.cat(row)] for row in grads.rows])
    first = 2**31 + 16
    shift = first * grads.rows[0][0].element_size()
    address = [grads.rows[i][0].data_ptr() - shift for i in range(num_tasks)]
    row_tables = tables.RowTables(
        chunks=torch.tensor([[0], [first], [numel]], device=DEVICE),
        num_chunks=1,
        row_pointers=torch.tensor(address, device=DEVICE),
        aligned=all((a + shift) % tables.VECTOR_BYTES == 0 for a in address),
    )
    config = tuning.outer_product_candidates(8, 2)[0]
    triton_dtype = triton_passes.TRITON_DTYPES[dtype]
    slots = tuning.program_slots(torch.device(DEVICE))
    gram = gram_launcher(row_tables, num_tasks, triton_dtype, config, slots, norms_only=False)()
    assert_gram_close(gram, exact)
    out = torch.empty(numel, dtype=dtype, device=DEVICE)
    output_table = tables.DeviceTable(torch.tensor([out.data_ptr() - shift], device=DEVICE), aligned=True)
    weights = torch.tensor([1.0, -2.0, 0.5], device=DEVICE)
    config = tuning.elementwise_candidates(9, 2, persistent=False)[0]
    combine_launcher(row_tables, num_tasks, triton_dtype, output_table, config, accumulate=False)(weights)
    assert_combine_close(out, *combine64(exact, weights), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vec", [1, 2, 8])
@pytest.mark.parametrize("num_tasks", [3, 8])
def test_gram_products_of_every_element_grouping(num_tasks, vec, dtype):
    """The GPU candidates let a thread sum the products of ``vec`` adjacent elements into one
    accumulator slot; every grouping gives G within the bound, partial tiles included (the
    interpreter's own configuration takes vec = 4)."""
    grads, exact = make_task_gradients(num_tasks, 3 * 1024 + 29, dtype, "rows", device=DEVICE, seed=vec)
    config = tuning.LaunchConfig(block=256 * vec, vec=vec)
    slots = tuning.program_slots(torch.device(DEVICE))
    gram = gram_launcher(
        tables.row_tables(grads), num_tasks, triton_passes.TRITON_DTYPES[dtype], config, slots, norms_only=False
    )()
    assert_gram_close(gram, exact)
    assert torch.equal(gram, gram.T)


def test_alignment_is_claimed_only_where_it_holds():
    separate, _ = make_task_gradients(3, 7, torch.float32, "rows", device=DEVICE)
    assert tables.row_tables(separate).aligned
    views, _ = make_task_gradients(3, 7, torch.float32, "matrix", device=DEVICE)  # rows 28 bytes apart
    assert not tables.row_tables(TaskGradients.from_matrix(views)).aligned


def test_where_the_backend_runs():
    triton_backend = resolve("triton", torch.device(DEVICE))
    # The interpreter is never the fast choice.
    assert triton_backend not in auto_candidates(torch.device("cpu"), "gram")
    assert unavailable_reason("triton", "meta") is not None
    if DEVICE == "cpu":
        assert "TRITON_INTERPRET" in unavailable_reason("triton", "cuda")
    else:
        assert auto_candidates(torch.device("cuda"), "gram")[0] is triton_backend


@pytest.mark.skipif(DEVICE != "cpu", reason="the compile check stands in for a GPU")
def test_kernels_compile_for_hopper_with_wide_accesses():
    """The interpreter never compiles: compile every code path for sm_90 in a process without
    TRITON_INTERPRET, and check that aligned tiles move 16 bytes an access."""
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(root / "tests" / "triton_sm90_compile.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if "ptxas" in result.stderr and result.returncode != 0 and "No such file" in result.stderr:
        pytest.skip("Triton's ptxas is not installed")
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(reports) == 10
    for report in reports:
        constants = report["constants"]
        if report["kernel"] == "reduce_partials_kernel":
            continue
        # Every row of a full tile is read with 16-byte loads (the tail adds narrower ones), and
        # no product runs on tensor cores, whose accumulation missed the parity bound.
        assert report["wide_loads"] >= int(constants["T_BLOCK"]), report
        assert not report["mma"], report


# GPU only: what the interpreter cannot show.


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_tasks", [4, 16])
def test_large_repeat_runs_are_bit_identical_on_gpu(num_tasks, dtype):
    grads, exact = make_task_gradients(num_tasks, 2**22 + 5, dtype, "rows", device=DEVICE, seed=1)
    gram = task_gram(grads, backend="triton")
    assert_gram_close(gram, exact)
    for _ in range(3):
        assert torch.equal(task_gram(grads, backend="triton"), gram)


@needs_cuda
def test_first_accumulating_combine_adds_once_on_gpu():
    triton_passes.clear()
    grads, exact = make_task_gradients(13, 2**20 + 3, torch.float32, "rows", device=DEVICE, seed=4)
    weights = torch.linspace(-1, 1, 13, device=DEVICE)
    out = [torch.ones(size, device=DEVICE) for size in grads.sizes]
    weighted_combine(grads, weights, out=out, accumulate=True, backend="triton")
    expected, scale = combine64(exact, weights)
    assert_combine_close(out, expected + 1.0, scale + 1.0, torch.float32)


def capture_both_passes(grads, weights, outs) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """The Gram and combine passes over ``grads`` captured in a CUDA graph, and the G it writes."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gram = task_gram(grads, backend="triton")
        weighted_combine(grads, weights, out=outs, backend="triton")
    return graph, gram


def replay_on_scaled_gradients(graph, gram, grads, weights, outs, factor: float) -> None:
    """Scale every task gradient in place, replay, and check both passes against float64."""
    for row in grads.rows:
        for piece in row:
            piece.mul_(factor)
    graph.replay()
    torch.cuda.synchronize()
    exact = torch.stack([torch.cat(row).double().cpu() for row in grads.rows])
    assert_gram_close(gram, exact)
    assert_combine_close(outs, *combine64(exact, weights), grads.dtype)


@needs_cuda
def test_cuda_graph_replays_both_passes():
    grads, _ = make_task_gradients(6, 300_001, torch.float32, "rows", device=DEVICE, seed=6)
    weights = torch.randn(6, device=DEVICE)
    outs = [torch.empty(size, device=DEVICE) for size in grads.sizes]
    task_gram(grads, backend="triton")  # warm-up: tuning and tables happen outside the capture
    weighted_combine(grads, weights, out=outs, backend="triton")
    torch.cuda.synchronize()
    graph, gram = capture_both_passes(grads, weights, outs)
    weights.mul_(2.0)
    replay_on_scaled_gradients(graph, gram, grads, weights, outs, -0.5)


@needs_cuda
def test_capture_of_unseen_tensors_copies_their_tables_at_every_replay():
    """Tensors first met during a capture (a whole step's, made in the graph's pool) get tables
    staged in pinned memory; each replay reads them again, and a later capture stages new ones."""
    warm_up, _ = make_task_gradients(5, 70_001, torch.bfloat16, "rows", device=DEVICE, seed=8)
    weights = torch.randn(5, device=DEVICE)
    task_gram(warm_up, backend="triton")
    weighted_combine(warm_up, weights, backend="triton")
    torch.cuda.synchronize()
    for seed in (9, 10):
        grads, _ = make_task_gradients(5, 70_001, torch.bfloat16, "rows", device=DEVICE, seed=seed)
        outs = [torch.empty(size, dtype=torch.bfloat16, device=DEVICE) for size in grads.sizes]
        graph, gram = capture_both_passes(grads, weights, outs)
        for _ in range(2):
            replay_on_scaled_gradients(graph, gram, grads, weights, outs, -2.0)


@needs_cuda
def test_capture_without_reserved_memory_asks_for_an_eager_step(monkeypatch):
    grads, _ = make_task_gradients(3, 1000, torch.float32, "rows", device=DEVICE, seed=11)
    task_gram(make_task_gradients(3, 1000, torch.float32, "rows", device=DEVICE, seed=12)[0], backend="triton")
    monkeypatch.setattr(tables, "CAPTURE_STAGING", tables._CaptureStaging())
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="eagerly"), torch.cuda.graph(graph):
        task_gram(grads, backend="triton")
