"""Faults: ``hifi-fast finetune --save-every N`` killed (SIGKILL) mid-run continues with ``--resume``
and ends bit-identical to the uninterrupted run (CPU, one thread): metrics, losses, trained weights.
"""
import copy
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hifi_fast import cli
from hifi_fast.storing.training_state import STATE_NAME

from conftest import tiny_batch
from test_cli import finetune_argv, tiny_csv, tiny_model_dir  # noqa: F401 - fixtures
from test_errors import unchanged

TESTS = Path(__file__).resolve().parent
# Kill the run at its N-th optimizer step ("step N": in the middle of epoch 2 of 11 steps, two
# steps after its last save) or while writing its N-th training state ("save N": the temporary file
# written, not yet renamed; the state of the save before must survive).
CHILD = textwrap.dedent("""
    import json, os, signal, sys
    from hifi_fast import cli
    from hifi_fast.storing import training_state
    from hifi_fast.tuning import guard

    what, n = sys.argv[2].split()
    calls = []
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if what == "step":
        step = guard.NonFiniteGuard.step

        def step_then_die(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == int(n):
                die()
            return step(self, *args, **kwargs)

        guard.NonFiniteGuard.step = step_then_die
    else:
        atomic_write = training_state.atomic_write

        def write_then_die(path, write):
            calls.append(1)
            atomic_write(path, (lambda tmp: (write(tmp), die())) if len(calls) == int(n) else write)

        training_state.atomic_write = write_then_die
    cli.main(json.loads(sys.argv[1]))
""")
SAME = ("accuracy", "macro_f1", "eval_loss", "final_train_loss", "epoch_losses", "steps", "skipped_steps",
        "confusion_matrix", "selected_heads", "trainable_params")


def _argv(model_dir, data, out, *extra):
    return finetune_argv(model_dir, data, out, "--heads-per-layer", "1", "--threads", "1", *extra)


@pytest.mark.parametrize("method, kill", [("hifi", "step 18"), ("lora", "step 18"), ("hifi", "save 5")])
def test_killed_run_resumes_to_the_uninterrupted_result(tiny_model_dir, tiny_csv, tmp_path, method, kill):  # noqa: F811
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert cli.main(_argv(tiny_model_dir, tiny_csv, whole, "--method", method)) == 0
    argv = _argv(tiny_model_dir, tiny_csv, broken, "--method", method, "--save-every", "3")
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv), kill], capture_output=True, text=True,
                           timeout=600, cwd=TESTS)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    assert not (broken / "metrics.json").exists() and (broken / STATE_NAME).is_file()

    assert cli.main(["finetune", "--resume", str(broken), "--quiet", "--threads", "1"]) == 0
    want, got = (json.loads((run / "metrics.json").read_text()) for run in (whole, broken))
    assert {k: got[k] for k in SAME} == {k: want[k] for k in SAME}
    weights = "hifi_weights.safetensors" if method == "hifi" else "adapter_model.safetensors"
    want, got = (load_file(str(run / weights)) for run in (whole, broken))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_resume_refuses_what_it_cannot_continue(tiny_model_dir, tiny_csv, tmp_path, capsys):  # noqa: F811
    def refused(run_dir, message):
        assert cli.main(["finetune", "--resume", str(run_dir), "--quiet"]) == 2
        assert message in capsys.readouterr().err

    refused(tmp_path / "nowhere", "no run_config.json there, so it is not a hifi-fast run directory")
    finished = tmp_path / "finished"
    assert cli.main(_argv(tiny_model_dir, tiny_csv, finished, "--epochs", "1")) == 0
    refused(finished, "that run has finished (metrics.json is there)")
    (finished / "metrics.json").unlink()
    refused(finished, "no saved training state (training_state.pt); a run saves one every N steps when started "
                      "with --save-every N")
    assert cli.main(_argv(tiny_model_dir, tiny_csv, tmp_path / "x", "--save-every", "-1")) == 2
    assert "--save-every must be >= 0, got -1" in capsys.readouterr().err


def test_load_state_refuses_a_state_it_cannot_continue_and_changes_nothing(tmp_path):
    """Trained tensors of another dtype, or an optimizer state of other parameter groups: refused
    before the model, the optimizer or the scheduler changed."""
    from hifi_fast.storing.training_state import LoopPosition, load_state, save_state
    from conftest import trained_model

    def set_up(model):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params if len(params) < 3 else [{"params": params[:2]}, {"params": params[2:]}])
        model(**tiny_batch()).loss.backward()
        optimizer.step()
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    model = trained_model("bert", {0: [1]})
    save_state(tmp_path, model, *set_up(model), LoopPosition(steps=1))
    other = trained_model("bert", {0: [1]}, seed=1)
    optimizer, scheduler = set_up(other)
    other.classifier.to(torch.float64)
    with unchanged(other), pytest.raises(ValueError, match="other trained parameters than this run.s .names, shapes or dtypes"):
        load_state(tmp_path, other, optimizer, scheduler)
    regrouped = trained_model("bert", {0: [1]}, seed=1)
    optimizer, scheduler = set_up(regrouped)
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    with unchanged(regrouped), pytest.raises(ValueError, match="parameter group"):
        load_state(tmp_path, regrouped, optimizer, scheduler)
    assert len(optimizer.param_groups) == 3
    torch.testing.assert_close(optimizer.state_dict()["state"], optimizer_state["state"], rtol=0, atol=0)


def test_a_method_run_by_compare_resumes(tiny_model_dir, tiny_csv, tmp_path):  # noqa: F811
    """``compare`` saves its own arguments (``--methods``, no ``--method``) in each method's run:
    ``finetune --resume`` on one takes the method from the run (it raised AttributeError)."""
    out = tmp_path / "cmp"
    argv = finetune_argv(tiny_model_dir, tiny_csv, out, "--heads-per-layer", "1", "--threads", "1",
                         "--methods", "hifi", "--in-process", "--save-every", "3")
    assert cli.main(["compare", *argv[1:]]) == 0
    run = out / "hifi"
    want = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").unlink()  # as if interrupted after its last saved state
    assert (run / STATE_NAME).is_file()
    assert cli.main(["finetune", "--resume", str(run), "--quiet", "--threads", "1"]) == 0
    got = json.loads((run / "metrics.json").read_text())
    assert got["trainable_params"] == want["trainable_params"] and got["selected_heads"] == want["selected_heads"]
