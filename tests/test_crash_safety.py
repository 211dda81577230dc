"""Faults: a checkpoint is whole or absent when the saving process is killed (SIGKILL) anywhere.

A child process saves checkpoint B over checkpoint A (same slice shapes, different heads) and is
killed at a chosen point inside ``hifi_fast.save`` or at a random moment of a save loop; every
outcome must load as A, load as B, or be refused with a clear error — never a silent mix.
"""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import hifi_fast
from hifi_fast.storing.checkpoint import CheckpointMismatchError

from conftest import tiny_batch, tiny_model, trained_model

TESTS = Path(__file__).resolve().parent
A, B = {0: [1], 2: [3]}, {0: [2], 2: [0]}  # same slice shapes, different heads

CHILD = textwrap.dedent("""
    import os, pathlib, signal, sys
    sys.path.insert(0, {tests!r})
    import hifi_fast
    from conftest import trained_model

    directory, point = sys.argv[1], sys.argv[2]
    models = [trained_model("bert", {a!r}), trained_model("bert", {b!r})]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if point == "loop":  # save B and A in turn until killed
        print("ready", flush=True)
        while True:
            for model in reversed(models):
                hifi_fast.save(model, directory)
    if point == "writing-weights":  # half of the weights' temporary file written
        write_bytes = pathlib.Path.write_bytes
        pathlib.Path.write_bytes = lambda self, data: (write_bytes(self, data[: len(data) // 2]), die())
    else:  # "before-rename-N" / "after-rename-N": around the N-th rename (1: weights, 2: config)
        when, _, number = point.rpartition("-rename-")
        replace, calls = os.replace, []

        def faulty_replace(src, dst):
            calls.append(dst)
            if len(calls) == int(number) and when == "before":
                die()
            replace(src, dst)
            if len(calls) == int(number) and when == "after":
                die()

        os.replace = faulty_replace
    hifi_fast.save(models[1], directory)
    print("save finished without the fault", flush=True)
""").format(tests=str(TESTS), a=A, b=B)


@pytest.fixture(scope="module")
def references():
    batch = {k: v for k, v in tiny_batch().items() if k != "labels"}
    models = {"A": trained_model("bert", A).eval(), "B": trained_model("bert", B).eval()}
    with torch.no_grad():
        return batch, {name: model(**batch).logits for name, model in models.items()}


def _outcome(directory: Path, references) -> str:
    """``"A"``, ``"B"``, ``"refused"`` or ``"MIXED"`` (what must never happen)."""
    batch, logits = references
    try:
        model = hifi_fast.load(tiny_model("bert"), directory).eval()
    except CheckpointMismatchError as err:
        assert "SHA-256 differs" in str(err) and "save the model again" in str(err)
        return "refused"
    with torch.no_grad():
        got = model(**batch).logits
    return next((name for name, want in logits.items() if torch.equal(got, want)), "MIXED")


def _old_checkpoint(tmp_path: Path) -> Path:
    directory = tmp_path / "ckpt"
    hifi_fast.save(trained_model("bert", A), directory)
    return directory


@pytest.mark.parametrize("point, expected", [
    ("writing-weights", "A"),
    ("before-rename-1", "A"),
    ("after-rename-1", "refused"),  # new weights beside the old config: refused by its hash
    ("before-rename-2", "refused"),
    ("after-rename-2", "B"),
])
def test_save_killed_at_each_point_leaves_old_new_or_refused(tmp_path, references, point, expected):
    directory = _old_checkpoint(tmp_path)
    child = subprocess.run([sys.executable, "-c", CHILD, str(directory), point], capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    assert _outcome(directory, references) == expected


def test_save_loop_killed_at_random_moments_never_mixes(tmp_path, references):
    rng = random.Random(0)
    directory = _old_checkpoint(tmp_path)
    outcomes = []
    for _ in range(8):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(directory), "loop"], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
        child.stdout.close()
        outcomes.append(_outcome(directory, references))
    assert "MIXED" not in outcomes, outcomes
