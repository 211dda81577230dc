"""Build script: the Python packages always; the optional CUDA extension (csrc/) only where it can
be built (a CUDA-enabled torch importable at build time and a CUDA toolkit).

HIFI_FAST_SKIP_CUDA_BUILD=1 skips it; HIFI_FAST_FORCE_CUDA_BUILD=1 fails loudly if it cannot be built.
With pip's default build isolation torch is not importable here, so build the extension with
``pip install --no-build-isolation -e .``.
"""
import glob
import os
import sys

from setuptools import find_packages, setup



def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def cuda_extension():
    """``(ext_modules, cmdclass)`` for the CUDA extension, or empty ones with a one-line reason."""
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    reason = None
    if _flag("HIFI_FAST_SKIP_CUDA_BUILD"):
        reason = "HIFI_FAST_SKIP_CUDA_BUILD is set"
    elif not sources:
        reason = "no sources in csrc/"
    else:
        try:
            import torch
            from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
        except ImportError:
            reason = "torch is not importable at build time (use pip install --no-build-isolation)"
        else:
            if torch.version.cuda is None:
                reason = f"torch {torch.__version__} has no CUDA"
            elif CUDA_HOME is None:
                reason = "no CUDA toolkit found (set CUDA_HOME)"
    if reason is not None:
        if _flag("HIFI_FAST_FORCE_CUDA_BUILD"):
            sys.exit(f"hifi_fast: HIFI_FAST_FORCE_CUDA_BUILD is set but the CUDA extension cannot be built: {reason}")
        print(f"hifi_fast: skipping the optional CUDA extension ({reason})")
        return [], {}
    ext = CUDAExtension(
        "hifi_fast._cuda",
        sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()
# Only hifi_fast and its sub-packages: no other top-level name is installed (bench/, tests/ stay in the repo).
# The C++ autograd node's source ships inside the package: it is built on first use (hifi_fast/tuning/native.py).
setup(packages=find_packages(include=["hifi_fast", "hifi_fast.*"]), package_data={"hifi_fast.tuning": ["*.cpp"]},
      ext_modules=ext_modules, cmdclass=cmdclass)
