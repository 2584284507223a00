"""Build script for lrcomp.

Metadata lives in pyproject.toml. This file exists for the compiled part: the CUDA
extension ``lrcomp._C`` built from csrc/ (randomized SVD, covariance accumulation) with
``torch.utils.cpp_extension`` (ninja), sources found by glob. It is built only when a CUDA
build of torch and nvcc (CUDA_HOME) are present, which needs torch inside the build
environment: ``pip install -e . --no-build-isolation`` on a CUDA machine. Anywhere else the
install is pure Python and ``import lrcomp`` works all the same (the ops fall back to their
PyTorch references; ``lrcomp.has_cuda_ext()`` says which is in use).

Environment switches:
    LRCOMP_SKIP_CUDA_BUILD=1   never build the extension (pure-Python install).
    LRCOMP_FORCE_CUDA_BUILD=1  build it even where no GPU/CUDA torch is detected (e.g. a
                               build container); set TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0").
"""

from __future__ import annotations

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def _cuda_extension_kwargs() -> dict:
    if _flag("LRCOMP_SKIP_CUDA_BUILD"):
        return {}
    force = _flag("LRCOMP_FORCE_CUDA_BUILD")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp"), root_dir=ROOT)
                     + glob.glob(os.path.join("csrc", "*.cu"), root_dir=ROOT))
    if not sources:
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if force:
            raise RuntimeError("LRCOMP_FORCE_CUDA_BUILD=1 but torch is not importable in the build environment "
                               "(use pip install --no-build-isolation)") from None
        return {}
    if not force and (torch.version.cuda is None or CUDA_HOME is None):
        return {}  # CPU-only torch or no nvcc: pure-Python install
    if force and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        print("lrcomp: LRCOMP_FORCE_CUDA_BUILD=1 without TORCH_CUDA_ARCH_LIST; torch picks the architectures")
    extension = CUDAExtension(
        name="lrcomp._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_cuda_extension_kwargs())
