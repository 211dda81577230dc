"""The C++ autograd node of the eager head-slice layer (``head_slice_linear.cpp``), built on first use.

A Python ``autograd.Function`` costs the host tens of microseconds per projection per step more than
a C++ node (the engine enters Python for its backward, and ``apply`` costs Python too); on a
launch-bound GPU that is the step's cost (``bench/host_overhead.py``). The node is the same ops as
the Python Function, so results are the same to the bit, and the Python Function stays as the
fallback.

Built with torch's C++ extension tools (a C++ compiler and ninja; about 30 s on two cores) once per
source, torch and Python version, into ``$TORCH_EXTENSIONS_DIR/hifi_fast`` (default
``~/.cache/torch_extensions/hifi_fast``); the build runs in a folder of its own and the library is
renamed into place, so concurrent builds (DDP ranks) cannot see half a file and an interrupted build
leaves no lock behind. ``HIFI_FAST_NATIVE`` says what to do: ``auto`` (default) builds or loads it
and falls back to the Python Function, with one warning, where it cannot; ``0`` never uses it; ``1``
requires it (an error says why it cannot load).
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("head_slice_linear.cpp")
MODULE_NAME = "hifi_fast_head_slice_linear"
MODES = ("auto", "0", "1")
_CFLAGS = ("-O2",)
logger = logging.getLogger(__name__)


class NativeUnavailableError(RuntimeError):
    """``HIFI_FAST_NATIVE=1`` but the C++ node cannot be built or loaded here."""


def mode() -> str:
    """``HIFI_FAST_NATIVE``: ``auto``, ``0`` or ``1``."""
    value = os.environ.get("HIFI_FAST_NATIVE", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"HIFI_FAST_NATIVE={value!r} is not one of {MODES} (auto: use the C++ node where it builds)")
    return value


def cache_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / "hifi_fast"


def library_path() -> Path:
    """Where the built library of this source, torch, Python and platform lives."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), sys.version.encode(), sys.platform.encode(),
                 " ".join(_CFLAGS).encode()):
        key.update(part)
    return cache_dir() / f"{MODULE_NAME}_{key.hexdigest()[:16]}{importlib.machinery.EXTENSION_SUFFIXES[-1]}"


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(path: Path) -> ModuleType:
    from torch.utils import cpp_extension

    logger.warning("hifi_fast: building the C++ autograd node of the head-slice layer (once per torch "
                   "version, about 30 s) into %s; HIFI_FAST_NATIVE=0 skips it", path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix="build-") as build:
        # load() numbers a name's builds within a process (name_v1, ...) whenever the build folder
        # differs; the cached library must define MODULE_NAME's init function for later loads
        cpp_extension.JIT_EXTENSION_VERSIONER.entries.pop(MODULE_NAME, None)
        module = cpp_extension.load(MODULE_NAME, [str(SOURCE)], extra_cflags=list(_CFLAGS), build_directory=build,
                                    verbose=False)
        if module.__name__ != MODULE_NAME:
            raise RuntimeError(f"torch built the node as {module.__name__!r}, not {MODULE_NAME!r}; not cached")
        # the library just built (not module.__file__: a second build in a process imports as the first)
        os.replace(Path(build) / f"{MODULE_NAME}{cpp_extension.LIB_EXT}", path)
    return module


def build_or_load() -> ModuleType:
    """The extension module: loaded from the cache, else built (errors say why it cannot be)."""
    path = library_path()
    if path.exists():
        try:
            return _import(path)
        except ImportError as err:  # damaged, or linked against another build of torch: build again
            logger.warning("hifi_fast: rebuilding %s, which does not load (%s)", path, err)
    return _build(path)


@lru_cache(maxsize=None)
def extension() -> ModuleType | None:
    """The C++ node's module, or ``None`` where the Python Function runs (``HIFI_FAST_NATIVE``)."""
    wanted = mode()
    if wanted == "0":
        return None
    try:
        return build_or_load()
    except Exception as err:  # no compiler, no ninja, a read-only cache...: the Python Function works
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        if wanted == "1":
            raise NativeUnavailableError(
                f"HIFI_FAST_NATIVE=1 but the C++ autograd node cannot be built or loaded ({reason}); it needs "
                "a C++ compiler and ninja (pip install ninja); HIFI_FAST_NATIVE=auto falls back to the Python one"
            ) from err
        logger.warning("hifi_fast: the C++ autograd node cannot be built or loaded (%s); using the Python "
                       "autograd Function, which costs the host more per step (HIFI_FAST_NATIVE=0 hides this)", reason)
        return None
