"""Build script. The project metadata lives in pyproject.toml; this file adds the compiled
extension ``emtl_kernels._C`` (csrc/, the "native" backend).

Build: ``pip install --no-build-isolation -e .`` (or ``python setup.py build_ext --inplace``)
after torch is installed. Where torch has CUDA and nvcc is found (CUDA_HOME), the extension is a
CUDAExtension with the kernels of csrc/cuda; otherwise a CppExtension with the CPU kernels only.
Set EMTL_BUILD_EXTENSION=0 to install the pure-Python package (reference and Triton backends).
"""

from __future__ import annotations

import os
import platform
from glob import glob

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The files compiled alone for an instruction set (see csrc/cpu/kernels.h), from the narrowest:
# each is linked after the baseline objects and the narrower variants, so that an inline function
# several objects emit keeps its narrowest copy. The rest builds for the baseline.
ISA_VARIANTS = {
    "_avx2.cpp": ("EMTL_WITH_AVX2_KERNELS", ["-mavx2", "-mfma", "-mf16c"]),
    "_avx512.cpp": (
        "EMTL_WITH_AVX512_KERNELS",
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    ),
}


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(path, ROOT) for path in glob(os.path.join(ROOT, pattern)))


def _build_isa_variants() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and os.name != "nt"


def _extension_build():
    """(ext_modules, cmdclass) for the compiled extension; empty when it is not wanted."""
    if os.environ.get("EMTL_BUILD_EXTENSION", "1") == "0":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    class BuildWithIsaVariants(BuildExtension):
        """Compiles each ISA_VARIANTS source with its flags and links them after all the others."""

        def build_extension(self, ext):
            variant_objects = []
            for suffix, (_, isa_flags) in ISA_VARIANTS.items():
                variant_sources = [source for source in ext.sources if source.endswith(suffix)]
                ext.sources = [source for source in ext.sources if source not in variant_sources]
                if variant_sources:
                    variant_objects += self._compile_with(ext, variant_sources, isa_flags)
            ext.extra_objects = [*ext.extra_objects, *variant_objects]
            super().build_extension(ext)

        def _compile_with(self, ext, sources, isa_flags):
            flags = dict(ext.extra_compile_args)
            flags["cxx"] = [*flags["cxx"], *isa_flags]
            return self.compiler.compile(
                sources,
                output_dir=self.build_temp,
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs=flags,
                depends=ext.depends,
            )

    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp") + _sources("csrc/solvers/*.cpp")
    macros = []
    if _build_isa_variants():
        macros += [(macro, None) for macro, _ in ISA_VARIANTS.values()]
    else:
        sources = [source for source in sources if not source.endswith(tuple(ISA_VARIANTS))]
    # Strict IEEE float arithmetic (no -ffast-math): inf and NaN must reach the Gram diagonal.
    compile_args = {"cxx": ["-O3", "-fno-fast-math", "-Wall", "-Wno-unknown-pragmas"]}
    link_args = []
    if torch.backends.openmp.is_available():
        # ATen's parallel_for is an inline template over OpenMP where torch uses OpenMP: without
        # -fopenmp it compiles to a serial loop. libgomp is then torch's own copy (same soname).
        compile_args["cxx"].append("-fopenmp")
        link_args.append("-fopenmp")
    extension_type = CppExtension
    if with_cuda:
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
        macros.append(("EMTL_WITH_CUDA", None))
        compile_args["nvcc"] = ["-O3"]
        extension_type = CUDAExtension
    extension = extension_type(
        "emtl_kernels._C",
        sources,
        define_macros=macros,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        include_dirs=[os.path.join(ROOT, "csrc")],
        py_limited_api=True,
    )
    return [extension], {"build_ext": BuildWithIsaVariants.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_build()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
