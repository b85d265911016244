"""emtl-kernels: fused kernels for multi-task optimisation in PyTorch.

Every step of equitable multi-task learning (EMTL) and its relatives needs the T per-task
gradients on the shared parameters, their Gram matrix, T weights and one weighted combination
written back as the update. This package makes that one fused step:

- :class:`MTLStep`: the drop-in backward for a training loop; :class:`DistributedMTLStep` the
  same for models trained data-parallel with DDP or FSDP2.
- :func:`task_gram`, :func:`task_sq_norms`, :func:`weighted_combine`: the fused passes over the
  task-gradient matrix, with a backend per device (:func:`available_backends`): the compiled
  extension ("native": C++ on CPU, CUDA on GPU) where it is built, Triton on GPU, and the
  pure-PyTorch "reference".
- :func:`emtl_weights`, :func:`gradnorm_scaling_weights`, :func:`equal_weights` and the
  gradient-balancing methods built on the whole Gram matrix (:func:`imtl_g_weights`,
  :func:`mgda_weights`, :func:`pcgrad_weights`, :func:`cagrad_weights`,
  :func:`aligned_mtl_weights`, :func:`upgrad_weights`, :func:`dualproj_weights`,
  :func:`nash_mtl_weights`, :func:`fairgrad_weights`, :func:`krum_weights`,
  :func:`db_mtl_weights`, :func:`config_weights`, and the stateful :class:`PCD`,
  :class:`GradVac`, :class:`CRMOGM`, :class:`GradNorm`): weightings from (losses, Gram matrix)
  to task weights, on the device.
- :mod:`emtl_kernels.adapters`: TorchJD and LibMTL users' way in (optional imports).
- :mod:`emtl_kernels.amp`: the step under ``torch.amp.GradScaler`` (weights of the unscaled losses).
"""

from . import _extension  # noqa: F401  (registers torch.ops.emtl_kernels.* when the extension is built)
from .backends import available_backends
from .distributed import CommunicationLog, DistributedMTLStep
from .ops import task_gram, task_sq_norms, weighted_combine
from .skip_check import SKIP_REASONS
from .step import MTLStep, StepRecord
from .streamed_gram import StreamedGramError
from .task_gradients import SUPPORTED_DTYPES, TaskGradients
from .weightings import (
    CRMOGM,
    DBMTL,
    EMTL,
    IMTLG,
    MGDA,
    PCD,
    WEIGHTINGS,
    AlignedMTL,
    CAGrad,
    ConFIG,
    DualProj,
    Equal,
    FairGrad,
    GradNorm,
    GradNormScaling,
    GradVac,
    Krum,
    NashMTL,
    PCGrad,
    StatefulWeighting,
    UPGrad,
    Weighting,
    aligned_mtl_weights,
    cagrad_weights,
    config_weights,
    db_mtl_weights,
    dualproj_weights,
    emtl_weights,
    equal_weights,
    fairgrad_weights,
    gradnorm_scaling_weights,
    imtl_g_weights,
    krum_weights,
    make_weighting,
    mgda_weights,
    nash_mtl_weights,
    pcgrad_weights,
    relative_contributions,
    upgrad_weights,
)

__version__ = "0.1.0"

__all__ = [
    "CRMOGM",
    "DBMTL",
    "EMTL",
    "IMTLG",
    "MGDA",
    "PCD",
    "SKIP_REASONS",
    "SUPPORTED_DTYPES",
    "WEIGHTINGS",
    "AlignedMTL",
    "CAGrad",
    "CommunicationLog",
    "ConFIG",
    "DistributedMTLStep",
    "DualProj",
    "Equal",
    "FairGrad",
    "GradNorm",
    "GradNormScaling",
    "GradVac",
    "Krum",
    "MTLStep",
    "NashMTL",
    "PCGrad",
    "StatefulWeighting",
    "StepRecord",
    "StreamedGramError",
    "TaskGradients",
    "UPGrad",
    "Weighting",
    "aligned_mtl_weights",
    "available_backends",
    "cagrad_weights",
    "config_weights",
    "db_mtl_weights",
    "dualproj_weights",
    "emtl_weights",
    "equal_weights",
    "fairgrad_weights",
    "gradnorm_scaling_weights",
    "imtl_g_weights",
    "krum_weights",
    "make_weighting",
    "mgda_weights",
    "nash_mtl_weights",
    "pcgrad_weights",
    "relative_contributions",
    "task_gram",
    "task_sq_norms",
    "upgrad_weights",
    "weighted_combine",
]
