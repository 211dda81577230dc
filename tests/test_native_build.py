"""The C++ autograd node builds from its source into an empty cache and loads from it, under any
supported torch: CI runs this file under the GPU image's torch (2.11) too, in an environment without
the package's other dependencies, so it loads ``native.py`` by path rather than importing the package.
"""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

NATIVE = Path(__file__).resolve().parents[1] / "hifi_fast" / "tuning" / "native.py"

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler: the node cannot be built here")


def _native_module():
    spec = importlib.util.spec_from_file_location("hifi_fast_native_by_path", NATIVE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fresh_build_leaves_only_the_library_and_is_then_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    native = _native_module()
    native.build_or_load()
    path = native.library_path()
    assert path.parent == tmp_path / "hifi_fast"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # the build folder is gone

    def no_build(path):
        raise AssertionError("built again although the cache holds the library")

    monkeypatch.setattr(native, "_build", no_build)
    extension = native.build_or_load()
    monkeypatch.undo()

    # A second build in the same process (another cache) installs a library that loads too: torch
    # numbers a name's later builds in a process (name_v1), which would not load under the name.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "second"))
    native.build_or_load()
    # loaded in a fresh process: in this one, the name imports as the module already loaded
    code = ("import importlib.util, sys, torch; spec = importlib.util.spec_from_file_location(sys.argv[1], sys.argv[2]); "
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); print(module.ROWS_RUN)")
    loaded = subprocess.run([sys.executable, "-c", code, native.MODULE_NAME, str(native.library_path())],
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "0", loaded.stderr[-2000:]

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    rows = torch.tensor([2, 3, 6])
    slice_weight = weight[rows].clone().requires_grad_(True)
    slice_bias = bias[rows].clone().requires_grad_(True)
    y = extension.head_slice_linear(slice_weight, slice_bias, rows, extension.ROWS_INDEX, 0, 0, x, weight, bias)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    x2, g2 = x.detach().reshape(-1, 5), grad_out.reshape(-1, 7)
    tolerance = dict(rtol=1e-12, atol=1e-12)  # float64: only the summation order may differ
    torch.testing.assert_close(y, x.detach() @ weight.T + bias, **tolerance)
    torch.testing.assert_close(x.grad, grad_out @ weight, **tolerance)
    torch.testing.assert_close(slice_weight.grad, g2[:, rows].T @ x2, **tolerance)
    torch.testing.assert_close(slice_bias.grad, g2[:, rows].sum(0), **tolerance)
