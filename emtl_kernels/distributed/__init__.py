"""The multi-task step on models trained data-parallel with torch.distributed (DDP and FSDP2)."""

from .collectives import CommunicationLog
from .step import DistributedMTLStep

__all__ = ["CommunicationLog", "DistributedMTLStep"]
