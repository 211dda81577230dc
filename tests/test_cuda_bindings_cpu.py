"""The CUDA extension's bindings (``csrc/bindings.cpp``) built for CPU tensors and called on every
error case and on real inputs, against whichever torch is installed.

The first GPU run crashed (SIGSEGV) on an error case of the extension instead of raising. Here the
same bindings, compiled with ``-DHIFI_FAST_CHECKS_ON_CPU`` and a CPU stand-in launcher
(``csrc/testing/cpu_launcher.cpp``, the kernel emulated on CPU threads), run every check, message,
allocation and output stride where no GPU is. Each case runs in a child process, so a crash is a
failing test that names the case, not a dead test run. CI runs this file under the torch of the
GPU image (2.11) as well as the package's own (``.ci/run``); it needs torch, ninja and a C++
compiler only (no conftest: ``pytest --noconftest`` works).
"""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"

# name: (message the error must match, call built from (grad_out [4, 8], inp [4, 8], blocks [1]) and
# a tensor on a device the op refuses)
ERROR_CASES = {
    "wrong-device": ("grad_out must be a (CUDA|CPU) tensor", "('head_rows_grad', other(g), other(x), other(b), 8, True)"),
    "mixed-dtypes": ("same dtype", "('head_rows_grad', g, x.half(), b, 8, True)"),
    "rows-differ": ("same number of rows", "('head_cols_grad', g, x[:3], b, 8)"),
    "3-d-grad-out": (r"expected grad_out \[N, d_out\]", "('head_cols_grad', g[None], x, b, 8)"),
    "int32-blocks": ("blocks must be int64", "('head_rows_grad', g, x, b.int(), 8, True)"),
    "2-d-blocks": ("blocks must be 1-D", "('head_rows_grad', g, x, b[None], 8, True)"),
    "blocks-elsewhere": ("blocks must be on grad_out's device", "('head_rows_grad', g, x, other(b), 8, True)"),
    "int-dtype": ("dtype must be", "('head_rows_grad', g.int(), x.int(), b, 8, True)"),
    "negative-block-size": ("block_size must be >= 0", "('head_rows_grad', g, x, b, -1, True)"),
}

_BUILD = """
import os, sys, torch
from torch.utils import cpp_extension
csrc = sys.argv[1]
ext = cpp_extension.load(
    name="hifi_fast_cpu_bindings", sources=[f"{csrc}/bindings.cpp", f"{csrc}/testing/cpu_launcher.cpp"],
    extra_cflags=["-O1", "-DHIFI_FAST_CHECKS_ON_CPU", "-pthread"], build_directory=sys.argv[2], verbose=False)
"""


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    """The extension built once (a child process: the build's output stays out of this one)."""
    directory = tmp_path_factory.mktemp("cpu_bindings")
    result = subprocess.run([sys.executable, "-c", _BUILD, str(CSRC), str(directory)], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return directory


def _call(build_dir, code: str) -> subprocess.CompletedProcess:
    script = _BUILD + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script, str(CSRC), str(build_dir)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONFAULTHANDLER": "1"})


def error_case_script(setup: str, call: str) -> str:
    """A child process's script: ``setup`` defines ``ext`` (the ops), ``g``, ``x``, ``b`` and
    ``other``; the ``call`` is made and the first line of its ``RuntimeError`` printed as JSON
    (``null`` if none)."""
    return textwrap.dedent(setup) + textwrap.dedent(f"""
        import json
        op, *args = {call}
        try:
            getattr(ext, op)(*args)
        except RuntimeError as err:
            print(json.dumps(str(err).splitlines()[0]))
        else:
            print(json.dumps(None))
    """)


def check_error_case(case: str, result: subprocess.CompletedProcess, crash_report: str = "") -> None:
    """The child process of ``error_case_script`` for ``case`` raised the expected message."""
    message = ERROR_CASES[case][0]
    assert result.returncode == 0, f"{case}: the process died (rc {result.returncode}):\n{crash_report or result.stderr[-3000:]}"
    raised = json.loads(result.stdout.strip().splitlines()[-1])
    assert raised is not None and re.search(message, raised), f"{case}: {raised}"


@pytest.mark.parametrize("case", ERROR_CASES, ids=ERROR_CASES)
def test_every_error_case_raises_and_names_the_problem(build_dir, case):
    setup = """
        g, x, b = torch.randn(4, 8), torch.randn(4, 8), torch.tensor([0])
        other = lambda t: t.to("meta")
    """
    check_error_case(case, _call(build_dir, error_case_script(setup, ERROR_CASES[case][1])))


def test_bindings_compute_the_reference_gradients(build_dir):
    """Checks passed, the same bindings allocate and lay out what the (emulated) kernel writes:
    rows with the fused bias, columns through the swapped output strides, against float64."""
    result = _call(build_dir, """
        torch.manual_seed(0)
        g, x = torch.randn(37, 40), torch.randn(37, 24)
        blocks = torch.tensor([8, 24])
        index = torch.cat([torch.arange(8, 16), torch.arange(24, 32)])
        w, bias = ext.head_rows_grad(g, x, blocks, 8, True)
        torch.testing.assert_close(w.double(), g.double()[:, index].T @ x.double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bias.double(), g.double()[:, index].sum(0), rtol=1e-5, atol=1e-5)
        assert ext.head_rows_grad(g, x, blocks, 8, False)[1] is None
        cols = ext.head_cols_grad(x, g, blocks, 8)
        torch.testing.assert_close(cols.double(), x.double().T @ g.double()[:, index], rtol=1e-5, atol=1e-5)
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
