"""The Triton compile gate (``python -m hifi_fast.kernels.compile_check``): every kernel the launchers
build compiles for sm_80 and sm_90 through Triton's real compiler and ptxas, with no GPU.

The gate runs in a subprocess because this test session defines the kernels for the interpreter
(``TRITON_INTERPRET=1``). Compiles are cached by Triton, so only the first run pays for them.
Also checked: the gate fails on a kernel that does not compile (the fp64 ``tl.dot`` fed by 16-bit
loads that the scoring kernel used before), autotune configs that do not fit a device's shared
memory are pruned before launch, and a launch with no config that fits fails with a clear error.
"""
import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest

from hifi_fast.kernels.compile_check import Compiled, Launch, Report

ENV = {**os.environ, "TRITON_INTERPRET": "0"}
KERNELS = ("_head_gram_kernel", "_centred_cross_kernel", "_head_block_grad_kernel")
DTYPES = ("fp32", "fp16", "bf16")
TARGETS = ("cuda:80", "cuda:90")
GRAD_CONFIGS = 8  # kernels/sparse_head_grad.py's autotune configs (the compiled-mode list)


def _gate(tmp_path, *args):
    out = tmp_path / "gate.json"
    result = subprocess.run([sys.executable, "-m", "hifi_fast.kernels.compile_check", "--json", str(out), *args],
                            capture_output=True, text=True, env=ENV, timeout=1200)
    return result, (json.loads(out.read_text()) if out.exists() else None)


@pytest.fixture(scope="module")
def full_gate(tmp_path_factory):
    return _gate(tmp_path_factory.mktemp("gate"), "--targets", ",".join(TARGETS),
                 "--markdown", str(tmp_path_factory.mktemp("md") / "gate.md"))


def test_every_kernel_compiles_for_sm80_and_sm90_in_every_dtype(full_gate):
    result, report = full_gate
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert report["failures"] == []
    assert report["launches"] and all(launch["ok"] for launch in report["launches"])
    compiled = {(c["kernel"], c["dtype"], c["target"]) for c in report["compiled"]}
    assert set(itertools.product(KERNELS, DTYPES, TARGETS)) <= compiled
    # Every launcher call of every op, model and precision on both targets.
    ops = {(launch["op"], launch["precision"], launch["target"]) for launch in report["launches"]}
    precisions = ("float32", "float32-tf32", "float16", "bfloat16")
    assert {(op, p, t) for op in ("head_rows_grad", "head_cols_grad") for p in precisions for t in TARGETS} <= ops
    assert {("head_grams", p, t) for p in precisions if p != "float32-tf32" for t in TARGETS} <= ops


def test_every_autotune_config_compiled_and_every_launch_fits(full_gate):
    _, report = full_gate
    grad = [c for c in report["compiled"] if c["kernel"] == "_head_block_grad_kernel"]
    tiles = lambda c: (c["constants"], c["num_warps"], c["num_stages"])  # noqa: E731
    by_target_dtype = {}
    for c in grad:
        by_target_dtype.setdefault((c["target"], c["dtype"]), set()).add(tiles(c))
    for key, variants in by_target_dtype.items():
        configs = {(v[1], v[2], tuple(sorted(p for p in v[0].split() if p.startswith(("BLOCK_N", "BLOCK_K")))))
                   for v in variants}
        assert len(configs) == GRAD_CONFIGS, key
    for c in report["compiled"]:
        assert not c["launched"] or c["shared"] <= c["shared_limit"], c
        if c["kernel"] != "_head_block_grad_kernel":
            assert c["spill_bytes"] == 0, c  # the scoring kernels' accumulators stay in registers
            assert c["launched"]


def test_configs_too_big_for_the_device_are_pruned_not_launched(tmp_path):
    # RTX 40xx / L4 (cuda:89) have 99 KB of shared memory per block: fp32 TF32 tiles of 64 x 128 x
    # 128 with 2-3 stages do not fit there. They are compiled, found too big and never launched.
    result, report = _gate(tmp_path, "--targets", "cuda:89", "--models", "llama-3-8b", "--precisions", "float32-tf32")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    too_big = [c for c in report["compiled"] if not c["fits"]]
    assert too_big and not any(c["launched"] for c in too_big)
    assert any(c["launched"] for c in report["compiled"] if c["kernel"] == "_head_block_grad_kernel")


def _run_script(tmp_path, source):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=ENV, timeout=600,
                          cwd=tmp_path)


def test_no_config_that_fits_fails_the_launch_with_a_clear_error(tmp_path):
    result = _run_script(tmp_path, """
        import torch
        from hifi_fast.kernels import compile_check, head_rows_grad

        compile_check.SHARED_MEMORY_LIMIT[89] = 1024  # a device with 1 KB of shared memory
        call = lambda: head_rows_grad(torch.empty(64, 128), torch.empty(64, 64), torch.tensor([0]), 64, False)
        report = compile_check.run_launches("cuda:89", [("head_rows_grad", "tiny", "float32", "[64, 128]", call)], {})
        print(report.launches[0].error)
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no tile configuration of the sparse-head gradient kernel fits this device's 1024 bytes" in result.stdout
    assert "HIFI_FAST_BACKEND=torch" in result.stdout


def test_gate_fails_on_a_kernel_that_does_not_compile(tmp_path):
    # The scoring kernel's first form: an fp64 tl.dot whose operands come straight from a 16-bit
    # load. Triton's MMA lowering rejects it for sm_80/sm_90 ("fp64 don't support largeK MMA").
    (tmp_path / "fp64_dot_of_bf16.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl


        @triton.jit
        def gram(x_ptr, out_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tile = tl.load(x_ptr + offs[:, None] * BLOCK + offs[None, :]).to(tl.float64)
            acc = tl.dot(tl.trans(tile), tile, tl.zeros((BLOCK, BLOCK), tl.float64), input_precision="ieee",
                         out_dtype=tl.float64)
            tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], acc)
    """))
    result = _run_script(tmp_path, """
        import torch
        from hifi_fast.kernels import compile_check
        from fp64_dot_of_bf16 import gram

        x, out = torch.empty(32, 32, dtype=torch.bfloat16), torch.empty(32, 32, dtype=torch.float64)
        report = compile_check.run_launches("cuda:90", [("gram", "-", "bfloat16", "[32, 32]", lambda: gram[(1,)](x, out, BLOCK=32))],
                                            {"gram": gram})
        print("FAILURES", report.failures())
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FAILURES ['cuda:90 gram - bfloat16 [32, 32]:" in result.stdout


def test_report_failure_rules():
    launch = Launch("head_grams", "bert-base", "bfloat16", "[2, 509, 12, 64]", "cuda:90")
    fits = Compiled("_head_block_grad_kernel", "cuda:90", "bf16", "BLOCK_N=32", 4, 3, 1000, 2000, 100, 8)
    assert Report([launch], [fits]).failures() == []  # the autotuned kernel may spill in some configs
    pruned = Compiled("_head_block_grad_kernel", "cuda:90", "fp32", "BLOCK_N=128", 8, 2, 3000, 2000, launched=False)
    assert Report([launch], [pruned]).failures() == []
    launched_too_big = Compiled("_head_block_grad_kernel", "cuda:90", "fp32", "BLOCK_N=128", 8, 2, 3000, 2000)
    assert "3000 B of shared memory > 2000" in Report([launch], [launched_too_big]).failures()[0]
    spilling = Compiled("_head_gram_kernel", "cuda:80", "bf16", "BLOCK_D=64", 4, 3, 1000, 2000, 255, 12)
    assert "12 B of register spills" in Report([launch], [spilling]).failures()[0]
    failed = Launch("head_grams", "bert-base", "bfloat16", "[2, 509, 12, 64]", "cuda:90", ok=False, error="boom")
    assert Report([failed], []).failures() == ["cuda:90 head_grams bert-base bfloat16 [2, 509, 12, 64]: boom"]


def test_targets_and_filters_are_checked(tmp_path):
    result, _ = _gate(tmp_path, "--targets", "cuda:75")
    assert result.returncode == 2 and "target 'cuda:75'" in result.stderr
    result, _ = _gate(tmp_path, "--models", "gpt-5")
    assert result.returncode == 2 and "unknown model or precision gpt-5" in result.stderr


def test_the_gate_covers_the_head_dims_of_the_supported_families():
    """Every head width the adapters meet in released models compiles: 32 (MiniLM), 64 (BERT, GPT-2,
    Llama 3.2), 80 (Phi-2), 96 (Phi-3), 128 (Llama 3 8B), 256 (Gemma; its scoring statistics take
    PyTorch's path, ``MAX_HEAD_DIM``, and the gradient kernel compiles for it); GQA down to one
    key/value head (Gemma 2B)."""
    from hifi_fast.kernels.compile_check import MODELS

    assert {m.head_dim for m in MODELS.values()} >= {32, 64, 80, 96, 128, 256}
    assert min(m.kv_heads for m in MODELS.values()) == 1
