"""The FMA roofline of a CPU, measured beside the kernels.

A Gram pass does T(T+1)/2 fused multiply-adds per column of J, so from some T on the FMA units
bound it rather than memory. :file:`fma_peak.c` is a loop of independent FMAs as wide as the
vectors of the native kernels that run the compute-bound Gram pass here (512-bit for the AVX-512
variant, 256-bit for AVX2: the widest variant, ``_extension.CPU_ISA``, which the Gram pass from
T = 16 runs on and ``EMTL_CPU_ISA`` caps). It is compiled once per process with the system C compiler and
run through ctypes (which releases the GIL) on as many threads at once as torch uses, so one
sample times :func:`fmas_per_sample` FMAs at the machine's peak.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from emtl_kernels import _extension

SOURCE = Path(__file__).with_name("fma_peak.c")
COMPILE_FLAGS = ("-O2", "-shared", "-fPIC")
#: The probe's vector flags for each kernel variant it can stand beside.
ISA_FLAGS = {"avx2": ("-mavx2", "-mfma"), "avx512": ("-mavx512f", "-mfma")}
#: Rounds of the loop a thread runs in one sample: about 15 ms at 5 G vector FMAs per second.
ROUNDS_PER_THREAD = 6_000_000


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    """(the compiled probe, None), or (None, why there is none)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the probe is x86-64 code, this is {platform.machine()}"
    isa_flags = ISA_FLAGS.get(_extension.CPU_ISA or "")
    if isa_flags is None:
        return None, f"the native kernels run {_extension.CPU_ISA or 'nowhere'} here, not {' or '.join(ISA_FLAGS)}"
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return None, f"no C compiler ({compiler})"
    library = Path(tempfile.mkdtemp(prefix="emtl-fma-peak-")) / "fma_peak.so"
    done = subprocess.run(
        [compiler, *COMPILE_FLAGS, *isa_flags, str(SOURCE), "-o", str(library)], capture_output=True, text=True
    )
    if done.returncode != 0:
        return None, f"{compiler} failed on {SOURCE.name}: {done.stderr.strip()[:200]}"
    probe = ctypes.CDLL(str(library))
    probe.fma_rounds.argtypes = [ctypes.c_longlong]
    probe.fma_rounds.restype = ctypes.c_float
    probe.fma_per_round.restype = ctypes.c_int
    return probe, None


def unavailable_reason() -> str | None:
    """Why the probe cannot run here, or None."""
    return _library()[1]


def fmas_per_sample(threads: int) -> int:
    """Scalar FMAs one call of :func:`probe` performs."""
    probe, reason = _library()
    if probe is None:
        raise RuntimeError(f"no FMA probe: {reason}")
    return threads * ROUNDS_PER_THREAD * probe.fma_per_round()


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fma-peak")


def probe(threads: int):
    """A call that runs the FMA loop on ``threads`` threads at once and returns when all are done."""
    library, reason = _library()
    if library is None:
        raise RuntimeError(f"no FMA probe: {reason}")
    pool = _pool(threads)

    def run() -> None:
        list(pool.map(library.fma_rounds, [ROUNDS_PER_THREAD] * threads))

    return run
