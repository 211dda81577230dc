"""``bench/gpu_check.sh``: its dry run walks every stage on CPU, and the real run's commands are the
dry run's with only the known GPU/size arguments swapped, so a typo cannot waste a GPU window.

The dry run takes one to two minutes on two CPU cores (every stage starts Python processes).
"""
import difflib
import os
import re
import shlex
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STAGES = ["install", "environment", "headline", "cuda_ext", "kernel_tests", "host_overhead", "full_tests",
          "compile_gate", "kernel_bench", "profile"]
# What the dry run may change in a real command: (real tokens, dry tokens). Anything else that
# differs between the two plans is drift.
SWAPS = {
    ((), ("--dry-run",)),                                  # pip: resolve and run setup.py, install nothing
    (("1",), ("0",)),                                      # .whl/ not required on the CPU machine
    ((), ("echo", "[dry run, not run here]:")),            # nvidia-smi, nvcc, the forced CUDA build
    (("native",), ("cuda:90",)),                           # compile gate: stand-in driver for an H100
    ((), ("--models", "bert-base", "--precisions", "bfloat16")),
    (("TRITON_INTERPRET=0",), ("TRITON_INTERPRET=1",)),    # kernels under the interpreter
    (("cuda",), ("cpu",)),
    ((".whl/minilm-l6",), ("tiny-bert",)),
    ((), ("--dry-run", "--rounds", "1", "--steps", "1", "--warmup", "1")),  # headline: CPU, tiny models
    (("bert-base",), ("tiny-bert",)), (("5",), ("1",)),      # profile: --model, --steps
    ((), ("--layers", "2", "--rounds", "1", "--steps", "1")),  # host_overhead: smaller
    (("frozen,hifi,lora-qv",), ("frozen,hifi",)),           # host_overhead compiled: fewer compiles
}
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "OUT"}
    env.update(extra)
    return env


def _plan(dry: bool) -> dict[str, list[list[str]]]:
    env = _env(GPU_CHECK_PLAN="1", **({"GPU_CHECK_DRY_RUN": "1"} if dry else {}))
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    steps = defaultdict(list)
    for line in proc.stdout.splitlines():
        match = re.match(r"plan (\w+): (.*)$", line)
        assert match, f"unexpected plan line: {line!r}"
        steps[match[1]].append(shlex.split(match[2]))
    return dict(steps)


def _allowed(real: tuple, dry: tuple) -> bool:
    """Whether a differing chunk is a sequence of known swaps (adjacent swaps come as one chunk)."""
    if not real and not dry:
        return True
    for i in range(len(real) + 1):
        for j in range(len(dry) + 1):
            head = (real[:i], dry[:j])
            known = head in SWAPS or (i == 0 and j == 2 and dry[0] == "-k")  # -k: a test subset
            if (i or j) and known and _allowed(real[i:], dry[j:]):
                return True
    return False


def test_real_commands_equal_dry_ones_but_for_known_swaps():
    real, dry = _plan(dry=False), _plan(dry=True)
    assert list(real) == STAGES and list(dry) == STAGES
    for stage in STAGES:
        assert len(real[stage]) == len(dry[stage]), stage
        for real_cmd, dry_cmd in zip(real[stage], dry[stage]):
            matcher = difflib.SequenceMatcher(a=real_cmd, b=dry_cmd, autojunk=False)
            for tag, i1, i2, j1, j2 in matcher.get_opcodes():
                if tag != "equal":
                    chunk = (tuple(real_cmd[i1:i2]), tuple(dry_cmd[j1:j2]))
                    assert _allowed(*chunk), f"stage {stage}: real {real_cmd} vs dry {dry_cmd}: {chunk} is not a known swap"
    flat = [" ".join(cmd) for cmds in real.values() for cmd in cmds]
    assert not any("TRITON_INTERPRET=1" in c or c.startswith("echo ") for c in flat)
    assert any("--targets native" in c for c in flat) and any("--minilm .whl/minilm-l6" in c for c in flat)
    assert ".whl/minilm-l6" in (ROOT / "bench" / "gpu_pack.sh").read_text()  # the folder gpu_pack.sh writes


def test_dry_run_walks_every_stage(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["nice", "-n", "5", "bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env=_env(GPU_CHECK_DRY_RUN="1", OUT=str(out)))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    lines = (out / "stages.log").read_text().splitlines()
    assert len(lines) == len(STAGES), lines
    for name, line in zip(STAGES, lines):
        assert re.fullmatch(rf"stage {name}: ok in \d+ s", line), line
    entries = list(out.iterdir())
    assert len(entries) <= 8, entries
    assert all(e.is_file() and SAFE_NAME.match(e.name) for e in entries), entries
    assert re.search(r"\d+ passed", (out / "gpu_tests.log").read_text())
    assert "C++ autograd node: " in (out / "environment.txt").read_text()  # built (or found) at install
    headline = (out / "headline.md").read_text()
    assert headline.count("| hifi |") == 3 and "hifi/frozen" in headline  # the three dry-run cells
    assert (out / "headline.csv").read_text().count(",hifi,") == 3
    assert "stages.log" in proc.stdout and lines[-1] in proc.stdout  # printed at the end
    host = (out / "kernels_profile.md").read_text()
    assert host.count("hifi - frozen, forward + backward") == 3 and 'mode="reduce-overhead"' in host  # 2 eager, 1 compiled


def test_bench_run_refuses_an_unknown_model_before_any_work():
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--device", "cpu", "--model", "no-such-model"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown benchmark model 'no-such-model'" in proc.stderr, proc.stderr


def test_bench_run_reports_what_it_finished_within_max_seconds(tmp_path):
    """A time box too short for the plan: the first run still happens, no other starts, and the
    report says so (a GPU window that ends mid-benchmark keeps what it measured)."""
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--device", "cpu", "--model", "tiny-bert", "--methods",
                           "frozen,hifi", "--rounds", "2", "--steps", "1", "--max-seconds", "0.01", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "Partial: 1 of 4 runs finished (stopped by --max-seconds)" in summary, summary
    assert "| frozen |" in summary and "| hifi |" not in summary and "scoring pass: not measured" in summary
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) > 1 and all(r.startswith("frozen,") for r in rows[1:]), rows


def test_build_model_loads_a_local_directory_in_the_asked_dtype(tmp_path):
    import torch

    sys.path.insert(0, str(ROOT))
    try:
        from bench.setup_methods import build_model
    finally:
        sys.path.remove(str(ROOT))
    build_model("tiny-bert").save_pretrained(tmp_path)
    model = build_model(str(tmp_path), dtype=torch.bfloat16)
    assert type(model).__name__ == "BertForSequenceClassification" and model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="no config.json"):
        build_model(str(tmp_path.parent))
