"""The run directory: its files, its settings (for ``--resume``) and reading a finished run back."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from .console import CLIError
from .loading import load_classifier, load_tokenizer

RUN_CONFIG = "run_config.json"
METRICS = "metrics.json"
SELECTION = "selection.json"
FROZEN_WEIGHTS = "head_weights.safetensors"


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def dir_size_mb(paths: list[Path]) -> float:
    total = 0
    for path in paths:
        if path.is_dir():
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        elif path.is_file():
            total += path.stat().st_size
    return total / 2**20


def default_output_dir(prefix: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{prefix}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path("runs") / f"{prefix}-{stamp}-{n}"
    return path


def run_config_of(args, method: str, model_path: str, lr: float, info: dict, data: str,
                  label_names: list[str] | None) -> dict:
    """What ``run_config.json`` records: the settings (all of ``args``), data, model and versions."""
    import torch

    import hifi_fast

    run_config = {
        "command": "finetune",
        "task": getattr(args, "task", "classification"),
        "method": method,
        "base_model_name_or_path": model_path,
        "label_names": label_names,
        "max_length": args.max_length,
        "init_seed": args.seed,
        "lr": lr,
        "data": data,
        "args": {k: v for k, v in vars(args).items() if k not in ("func", "resume")},
        "hifi_fast_version": hifi_fast.__version__,
        "torch_version": torch.__version__,
    }
    if "hifi_config" in info:
        run_config["hifi_config"] = info["hifi_config"]
    return run_config


def record_start(run_dir: Path, run_config: dict, selection) -> None:
    """Write ``run_config.json`` (and the selected heads) before training, so that an interrupted
    run can be resumed with its own settings."""
    write_json(run_dir / RUN_CONFIG, run_config)
    if selection is not None:
        (run_dir / SELECTION).write_text(selection.to_json(indent=2) + "\n")


def resumed_args(args) -> argparse.Namespace:
    """The settings of the interrupted run in ``args.resume``, with this call's --quiet, --threads
    and --device; refuses a directory that is no run, has no saved state, or has finished."""
    from hifi_fast.storing.training_state import STATE_NAME

    run_dir = Path(args.resume)
    if not (run_dir / RUN_CONFIG).is_file():
        raise CLIError(f"--resume {run_dir}: no {RUN_CONFIG} there, so it is not a hifi-fast run directory")
    if (run_dir / METRICS).is_file():
        raise CLIError(f"--resume {run_dir}: that run has finished ({METRICS} is there)")
    if not (run_dir / STATE_NAME).is_file():
        raise CLIError(f"--resume {run_dir}: no saved training state ({STATE_NAME}); a run saves one every N "
                       "steps when started with --save-every N")
    run_config = json.loads((run_dir / RUN_CONFIG).read_text())
    saved = run_config["args"]
    ours = {k: getattr(args, k) for k in ("resume", "quiet", "threads", "device")}
    defaults = {"task": "classification", "prompt_column": None}  # runs saved before these options
    # a method run by `compare` saved compare's arguments, which name no single method
    method = {"method": run_config["method"]} if "method" not in saved else {}
    return argparse.Namespace(**{**defaults, **saved, **method, **ours, "output_dir": str(run_dir)})


def load_run(checkpoint: str | os.PathLike, model_path: str | None = None):
    """``(model, tokenizer, run_config)`` of a run directory written by ``finetune``."""
    import hifi_fast
    from hifi_fast.storing.checkpoint import CONFIG_NAME, read_config

    run_dir = Path(checkpoint)
    if not run_dir.is_dir():
        raise CLIError(f"--checkpoint {run_dir}: no such directory")
    run_config: dict = {}
    if (run_dir / RUN_CONFIG).is_file():
        run_config = json.loads((run_dir / RUN_CONFIG).read_text())
    method = run_config.get("method") or ("hifi" if (run_dir / CONFIG_NAME).is_file() else None)
    if method is None:
        raise CLIError(f"--checkpoint {run_dir}: neither {RUN_CONFIG} nor {CONFIG_NAME} is there; "
                       "is it a hifi-fast run directory?")
    if method == "full":
        path = run_dir / "model"
        if not path.is_dir():
            raise CLIError(f"--checkpoint {run_dir}: the run was saved with --no-save (no model/ folder)")
        tokenizer = load_tokenizer(str(path))
        return load_classifier(str(path), label_names_of(run_config, path), tokenizer, 0), tokenizer, run_config
    if method == "hifi":
        if not (run_dir / CONFIG_NAME).is_file():
            raise CLIError(f"--checkpoint {run_dir}: {CONFIG_NAME} is missing (saved with --no-save?)")
        base = model_path or read_config(run_dir).get("base_model_name_or_path") or run_config.get("base_model_name_or_path")
    else:
        base = model_path or run_config.get("base_model_name_or_path")
    if not base:
        raise CLIError(f"--checkpoint {run_dir}: the base model path is not recorded; pass --model DIR")
    # finetune records a local model as its absolute path and a hub name (cached) as given
    if os.path.isabs(base) and not os.path.exists(base) and model_path is None:
        raise CLIError(f"the base model {base} recorded in {run_dir} is not there any more; pass --model DIR")
    tokenizer = load_tokenizer(base)
    label_names = label_names_of(run_config, None, hifi_dir=run_dir if method == "hifi" else None)
    model = load_classifier(base, label_names, tokenizer, run_config.get("init_seed", 0))
    if method == "hifi":
        hifi_fast.load(model, run_dir, check_name=model_path is None)
    elif method == "lora":
        from peft import PeftModel

        if not (run_dir / "adapter_config.json").is_file():
            raise CLIError(f"--checkpoint {run_dir}: adapter_config.json is missing (saved with --no-save?)")
        model = PeftModel.from_pretrained(model, str(run_dir))
    elif method == "frozen":
        from safetensors.torch import load_file

        if not (run_dir / FROZEN_WEIGHTS).is_file():
            raise CLIError(f"--checkpoint {run_dir}: {FROZEN_WEIGHTS} is missing (saved with --no-save?)")
        missing, unexpected = model.load_state_dict(load_file(str(run_dir / FROZEN_WEIGHTS)), strict=False)
        if unexpected:
            raise CLIError(f"{run_dir / FROZEN_WEIGHTS} does not fit the base model: unexpected {unexpected}")
    return model.eval(), tokenizer, run_config


def label_names_of(run_config: dict, model_dir: Path | None, hifi_dir: Path | None = None) -> list[str]:
    if run_config.get("label_names"):
        return list(run_config["label_names"])
    if hifi_dir is not None:
        from safetensors import safe_open

        from hifi_fast.storing.checkpoint import WEIGHTS_NAME

        with safe_open(str(hifi_dir / WEIGHTS_NAME), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith("classifier.weight") or key.endswith("score.weight"):
                    return [f"LABEL_{i}" for i in range(handle.get_slice(key).get_shape()[0])]
    if model_dir is not None:
        config = json.loads((model_dir / "config.json").read_text())
        id2label = config.get("id2label") or {}
        return [id2label[str(i)] for i in range(len(id2label))]
    raise CLIError("the run directory records no label names")
