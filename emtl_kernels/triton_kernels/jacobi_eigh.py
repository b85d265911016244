"""The symmetric eigen-decomposition of a small matrix in one program: parallel cyclic Jacobi.

IMTL-G and Aligned-MTL need the eigen-decomposition of the T×T Gram matrix; on a GPU
``torch.linalg.eigh`` reads an error flag on the host, and the tensor-op Jacobi of
:func:`emtl_kernels.weightings._solvers.jacobi_eigh` makes several launches a rotation round.
Here one program holds the matrix A and the accumulated rotations V as BLOCK×BLOCK float64 tiles
in registers and runs the same sweeps: a sweep visits every pair (p, q) once, in BLOCK − 1 rounds
of BLOCK/2 disjoint pairs (the circle method: seat 0 stays, the others move one seat a round),
and the rotations of a round (Golub & Van Loan, Algorithm 8.5.2, the smaller angle) are applied
together as one orthogonal matrix R: A ← RᵀAR, V ← VR, three tile products. Padding rows and
columns are zero, so every rotation that touches them has angle 0 and they never mix in.

Eigenvalues come out in index order (diag A); the launcher sorts them on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tuning import next_power_of_2

#: Smallest tile: ``tl.dot`` needs 16 rows and columns.
MIN_BLOCK = 16


#: Off-diagonal part, relative to the whole (Frobenius norms), at which the sweeps stop: n·eps
#: for n = 16 in float64, where a further sweep changes nothing above rounding.
ROUNDING = 16 * 2.220446049250313e-16


def program_warps(block: int) -> int:
    """Warps of a program holding BLOCK×BLOCK tiles: 4, and 8 from BLOCK = 64, where 4 make ptxas
    spill 924 bytes for sm_90; below, it spills at most 48 bytes (a few values, not a tile:
    tests/triton_sm90_solver_compile.py). Not timed on a GPU yet."""
    return 8 if block >= 64 else 4


@triton.jit
def _round_partner(index, turn, BLOCK: tl.constexpr):
    """Each index's partner in round ``turn`` of the circle method over BLOCK players, and
    whether it is the pair's first member p (seat < BLOCK/2)."""
    turning = BLOCK - 1
    seat = tl.where(index == 0, 0, (index - 1 + turn) % turning + 1)
    partner_seat = BLOCK - 1 - seat
    partner = tl.where(partner_seat == 0, 0, (partner_seat - 1 - turn + turning) % turning + 1)
    return partner, seat < BLOCK // 2


@triton.jit
def jacobi_eigh_kernel(matrix, values, vectors, size, sweeps, BLOCK: tl.constexpr, ROUNDING: tl.constexpr):
    """Eigenvalues of ``matrix [size, size]`` into ``values [size]`` (index order), orthonormal
    eigenvectors into the columns of ``vectors [size, size]``, after at most ``sweeps`` sweeps:
    fewer where ‖off(A)‖_F ≤ ROUNDING · ‖A‖_F sooner."""
    index = tl.arange(0, BLOCK)
    rows = index[:, None]
    columns = index[None, :]
    inside = (rows < size) & (columns < size)
    loaded = tl.load(matrix + rows * size + columns, mask=inside, other=0.0).to(tl.float64)
    transposed = tl.load(matrix + columns * size + rows, mask=inside, other=0.0).to(tl.float64)
    work = (loaded + transposed) * 0.5
    eye = rows == columns
    basis = tl.where(eye, 1.0, 0.0).to(tl.float64)
    # Sweeps stop once the off-diagonal part is below float64 rounding of A (Frobenius norms):
    # quadratic convergence gets there in a sweep or two from where it starts to bite, and
    # rank-deficient matrices get there later than the others (12 sweeps at n = 32, half null).
    # (The off-diagonal part is summed on its own: as the whole less the diagonal it would cancel
    # to nothing where the diagonal dominates, and stop the sweeps before they start.)
    total = tl.sum(tl.sum(work * work, axis=1), axis=0)
    off_diagonal = tl.sum(tl.sum(tl.where(eye, 0.0, work * work), axis=1), axis=0)
    sweep = 0
    while (sweep < sweeps) & (off_diagonal > ROUNDING * ROUNDING * total):
        for turn in range(BLOCK - 1):
            partner, first = _round_partner(index, turn, BLOCK)
            is_partner = columns == partner[:, None]
            diagonal = tl.sum(tl.where(eye, work, 0.0), axis=1)
            partner_diagonal = tl.sum(tl.where(is_partner, diagonal[None, :], 0.0), axis=1)
            # A[p, q] and A[q, p] differ by the products' rounding: both members of a pair must
            # see the same value, or they turn by different angles and R is not orthogonal.
            off_row = tl.sum(tl.where(is_partner, work, 0.0), axis=1)
            off_column = tl.sum(tl.where(rows == partner[None, :], work, 0.0), axis=0)
            off = (off_row + off_column) * 0.5
            app = tl.where(first, diagonal, partner_diagonal)
            aqq = tl.where(first, partner_diagonal, diagonal)
            nonzero = off != 0.0
            tau = (aqq - app) / tl.where(nonzero, 2.0 * off, 1.0)
            sign = tl.where(tau >= 0.0, 1.0, -1.0)
            tangent = tl.where(nonzero, sign / (tl.abs(tau) + tl.sqrt(1.0 + tau * tau)), 0.0)
            cosine = 1.0 / tl.sqrt(1.0 + tangent * tangent)
            sine = tangent * cosine
            # R[p, p] = R[q, q] = c, R[p, q] = s, R[q, p] = −s, for every pair of the turn.
            rotation = tl.where(eye, cosine[:, None], 0.0)
            rotation = tl.where(is_partner, tl.where(first, sine, -sine)[:, None], rotation)
            rotated = tl.dot(work, rotation)
            work = tl.dot(tl.trans(rotation), rotated)
            basis = tl.dot(basis, rotation)
        off_diagonal = tl.sum(tl.sum(tl.where(eye, 0.0, work * work), axis=1), axis=0)
        sweep += 1
    diagonal = tl.sum(tl.where(eye, work, 0.0), axis=1)
    tl.store(values + index, diagonal.to(values.dtype.element_ty), mask=index < size)
    tl.store(vectors + rows * size + columns, basis.to(vectors.dtype.element_ty), mask=inside)


def jacobi_eigh(matrix: torch.Tensor, sweeps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and orthonormal eigenvectors (columns) of a symmetric ``[n, n]``
    ``matrix`` (its symmetric part), in its dtype, computed in float64 by at most ``sweeps``
    sweeps in one launch; sorted on the device afterwards."""
    size = matrix.shape[-1]
    values = torch.empty(size, dtype=matrix.dtype, device=matrix.device)
    vectors = torch.empty(size, size, dtype=matrix.dtype, device=matrix.device)
    block = max(MIN_BLOCK, next_power_of_2(size))
    jacobi_eigh_kernel[(1,)](
        matrix.contiguous(),
        values,
        vectors,
        size,
        sweeps,
        BLOCK=block,
        ROUNDING=ROUNDING,
        num_warps=program_warps(block),
        num_stages=1,
        enable_fp_fusion=True,
    )
    order = values.argsort()
    return values[order], vectors[:, order]
