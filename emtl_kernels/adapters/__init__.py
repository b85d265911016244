"""Ways in for users of other multi-task libraries. Each submodule is imported on its own, so
the package never needs those libraries:

- :mod:`emtl_kernels.adapters.torchjd`: our weightings as TorchJD weightings and aggregators, a
  TorchJD weighting inside :class:`~emtl_kernels.MTLStep`, and a device-side dual-cone projector
  for TorchJD's UPGrad and DualProj (needs ``torchjd``).
- :mod:`emtl_kernels.adapters.libmtl`: a weighting class for LibMTL's ``Trainer`` whose backward
  is :class:`~emtl_kernels.MTLStep` (needs nothing from LibMTL).
"""
