"""TorchJD interoperability (TorchJD ≥ 0.18, https://github.com/TorchJD/torchjd).

TorchJD's gradient-balancing methods are ``Weighting`` modules from a Gramian to weights, used by
its ``GramianWeightedAggregator``; ours are :class:`~emtl_kernels.weightings.Weighting` objects
from (losses, Gram matrix) to weights. This module converts both ways:

- :func:`as_torchjd_weighting` / :func:`as_torchjd_aggregator`: one of ours (by name or
  instance) for ``torchjd.autojac.jac_to_grad`` (after ``backward`` or ``mtl_backward``, which
  take no aggregator in TorchJD 0.18) and anything else that takes a TorchJD weighting or
  aggregator.
- :func:`from_torchjd`: a TorchJD Gramian weighting (or Gramian-weighted aggregator) for
  ``MTLStep(weighting=from_torchjd(UPGradWeighting()))``. It runs TorchJD's own solver, host round
  trips included: the fast path is our weighting of the same name.
- :class:`DeviceDualConeProjector`: a ``torchjd.linalg.DualConeProjector`` that solves on the
  device, for ``UPGrad(projector=DeviceDualConeProjector())`` and ``DualProj(...)``.

Importing this module without TorchJD raises an ImportError that says how to install it.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from torchjd import aggregation as _aggregation
    from torchjd.linalg import DualConeProjector as _DualConeProjector
except ImportError as error:  # pragma: no cover - exercised only without torchjd
    raise ImportError("emtl_kernels.adapters.torchjd needs TorchJD (>= 0.18): pip install torchjd") from error

from ..weightings import Weighting, make_weighting
from ..weightings._solvers import IPM_ITERATIONS
from ..weightings.base import check_count, check_number, compute_dtype
from ..weightings.upgrad import dual_cone_projections

try:  # TorchJD's marker for weightings that read the Jacobian itself; private, so optional.
    from torchjd.aggregation._weighting_bases import _MatrixWeighting

    JACOBIAN_WEIGHTINGS: tuple[type, ...] = (_MatrixWeighting,)
except ImportError:  # pragma: no cover
    JACOBIAN_WEIGHTINGS = ()


class TorchJDWeighting(_aggregation.Weighting):
    """A TorchJD ``Weighting`` (of a Gramian) made of one of our weightings.

    TorchJD hands a weighting the Gramian only. A weighting of ours that reads the task losses
    (EMTL: ``reads_losses``) takes them from :attr:`losses`, which the training loop sets before
    each aggregation; the others are called with zero losses.
    """

    def __init__(self, weighting: Weighting):
        super().__init__()
        self.weighting = weighting
        #: ``[T]`` task losses for a weighting that reads them; None otherwise.
        self.losses: Tensor | None = None

    def forward(self, gramian: Tensor, /) -> Tensor:
        losses = self.losses
        if losses is None:
            if self.weighting.reads_losses:
                raise ValueError(
                    f"{self.weighting!r} reads the task losses, which TorchJD does not pass to a "
                    "weighting: set .losses to the [T] loss tensor before each aggregation"
                )
            losses = torch.zeros(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
        return self.weighting(losses.detach(), gramian.detach()).to(gramian.dtype)


def as_torchjd_weighting(weighting: str | Weighting, **options) -> TorchJDWeighting:
    """Our weighting (a name from :data:`~emtl_kernels.WEIGHTINGS` with its options, or an
    instance) as a TorchJD ``Weighting`` of a Gramian."""
    return TorchJDWeighting(make_weighting(weighting, **options))


class TorchJDAggregator(_aggregation.GramianWeightedAggregator):
    """TorchJD's ``GramianWeightedAggregator`` of one of our weightings, run under ``no_grad``.

    Our weights are detached from J (the step holds them constant), so a graph through Jᵀw would
    differentiate the aggregation as if w did not depend on J: a wrong gradient. TorchJD's own
    aggregators whose weights leave autograd (UPGrad, DualProj, IMTL-G, CAGrad…) run under
    ``no_grad`` for that reason; this one does too, so its result carries no autograd history.
    """

    def __call__(self, matrix: Tensor, /) -> Tensor:
        with torch.no_grad():
            return super().__call__(matrix)


def as_torchjd_aggregator(weighting: str | Weighting, **options) -> TorchJDAggregator:
    """Our weighting inside TorchJD's ``GramianWeightedAggregator``: the aggregation of a
    Jacobian J is Jᵀw with w from J Jᵀ, computed without autograd history (see
    :class:`TorchJDAggregator`). Its weighting is ``aggregator.gramian_weighting``; use it with
    ``torchjd.autojac.jac_to_grad(shared_params, aggregator)`` after ``backward`` or
    ``mtl_backward``."""
    return TorchJDAggregator(as_torchjd_weighting(weighting, **options))


class FromTorchJD(Weighting):
    """A TorchJD Gramian weighting as one of ours: ``weights(losses, gram)`` is its weights of
    ``gram`` (the losses give the dtype only). Made by :func:`from_torchjd`."""

    gram_use = "full"

    def __init__(self, weighting: _aggregation.Weighting):
        self.torchjd_weighting = weighting

    def weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        dtype = compute_dtype(losses)
        return self.torchjd_weighting(gram.detach().to(dtype)).to(dtype)

    def __repr__(self) -> str:
        return f"from_torchjd({self.torchjd_weighting!r})"


def from_torchjd(weighting: _aggregation.Weighting | _aggregation.GramianWeightedAggregator) -> FromTorchJD:
    """A TorchJD weighting of the Gramian (``UPGradWeighting()``, ``MGDAWeighting()``…) or a
    ``GramianWeightedAggregator`` (``UPGrad()``…) as a weighting for :class:`~emtl_kernels.MTLStep`.

    TorchJD weightings of the Jacobian itself (``MeanWeighting``, ``NashMTL``'s…) are refused:
    the step forms only the Gram matrix.
    """
    if isinstance(weighting, _aggregation.GramianWeightedAggregator):
        weighting = weighting.gramian_weighting
    if not isinstance(weighting, _aggregation.Weighting):
        raise TypeError(f"expected a TorchJD Weighting or GramianWeightedAggregator, got {type(weighting).__name__}")
    if isinstance(weighting, JACOBIAN_WEIGHTINGS):
        raise TypeError(
            f"{type(weighting).__name__} weighs the Jacobian, not its Gramian; MTLStep forms only the "
            "Gram matrix (use our weighting of the same method, or a TorchJD Gramian weighting)"
        )
    return FromTorchJD(weighting)


class DeviceDualConeProjector(_DualConeProjector):
    """A TorchJD ``DualConeProjector`` that solves on the device, without quadprog.

    Same problem and defaults as TorchJD's ``QuadprogProjector`` (G normalised by its trace,
    ``norm_eps`` = ``reg_eps`` = 1e-4), solved in float64 for all rows of U, without leaving the
    Gramian's device: by the compiled active-set solver on a CPU tensor, by the interior-point
    method of :func:`~emtl_kernels.weightings._solvers.project_onto_dual_cone` elsewhere
    (``iterations`` is its iteration count).
    """

    def __init__(self, *, norm_eps: float = 1e-4, reg_eps: float = 1e-4, iterations: int = IPM_ITERATIONS):
        check_number("norm_eps", norm_eps)
        check_number("reg_eps", reg_eps)
        check_count("iterations", iterations)
        self.norm_eps, self.reg_eps, self.iterations = norm_eps, reg_eps, iterations

    def __call__(self, U: Tensor, G: Tensor) -> Tensor:
        rows = U.detach().reshape(-1, U.shape[-1]).to(compute_dtype(G))
        weights = dual_cone_projections(G.detach(), rows, self.norm_eps, self.reg_eps, self.iterations)
        return weights.reshape(U.shape).to(G.dtype)

    def __repr__(self) -> str:
        return (
            f"DeviceDualConeProjector(norm_eps={self.norm_eps}, reg_eps={self.reg_eps}, iterations={self.iterations})"
        )
