"""Triton kernels of the "triton" backend, one kernel a file, and the host-side tables they read.

``tables`` (plain torch) builds the device tables that let one launch walk all T×K pieces of the
task-gradient matrix; ``tiles`` holds the device helpers the kernels share; ``gram`` and
``combine`` hold one pass each with its launcher; ``nonnegative_qp`` solves the weightings' small
QPs, one program a problem; ``tuning`` picks block sizes and warps.
Importing any module but ``tables`` imports Triton.
"""
