"""Per training method (hifi, lora, full, frozen): set the model up, and save what it trained."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .console import CLIError, Console
from .parse import METHODS
from .runs import FROZEN_WEIGHTS, RUN_CONFIG, SELECTION


def setup_method(model, method: str, args, train_data, console: Console, progress: bool) -> dict:
    """Make ``model`` ready to train with ``method``; returns what to record (selection, timings)."""
    import hifi_fast
    from hifi_fast.cli.baselines import apply_lora, freeze_backbone, train_everything
    from hifi_fast.cli.data import iter_batches
    from hifi_fast.selecting.scoring import select_for_config

    info: dict = {}
    if method == "hifi" and args.resume:  # the heads the interrupted run selected
        selection = hifi_fast.HeadSelection.from_json((Path(args.resume) / SELECTION).read_text())
        hifi_fast.patch(model, selection)
        config = json.loads((Path(args.resume) / RUN_CONFIG).read_text())["hifi_config"]
        return {"selection": selection, "hifi_config": config, "scoring_time_s": 0.0}
    if method == "hifi":
        config = hifi_fast.HiFiConfig(
            heads_per_layer=args.heads_per_layer, score=args.score, selection=args.selection,
            num_scoring_examples=args.scoring_examples, damping=args.damping, seed=args.seed,
            keep_warmed_head=args.task_head == "warmed",
        )
        start = time.perf_counter()
        selection = select_for_config(model, iter_batches(train_data, args.batch_size), config, progress=progress)
        info["scoring_time_s"] = time.perf_counter() - start
        hifi_fast.patch(model, selection)
        info["selection"] = selection
        info["hifi_config"] = config.to_dict()
        return info
    if method == "lora":
        try:
            info["peft_model"] = apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=0.1)
        except ImportError as err:
            raise CLIError(str(err)) from None
        return info
    if method == "full":
        train_everything(model)
        return info
    if method == "frozen":
        freeze_backbone(model)
        return info
    raise CLIError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def save_method(model, method: str, run_dir: Path, tokenizer) -> list[Path]:
    """Write the trained part of ``model``; returns the files/folders that make up the checkpoint."""
    import hifi_fast

    if method == "hifi":
        hifi_fast.save(model, run_dir)
        from hifi_fast.storing.checkpoint import CONFIG_NAME, WEIGHTS_NAME

        return [run_dir / CONFIG_NAME, run_dir / WEIGHTS_NAME]
    if method == "lora":
        model.save_pretrained(run_dir)
        return [run_dir / "adapter_config.json", run_dir / "adapter_model.safetensors"]
    if method == "full":
        model.save_pretrained(run_dir / "model")
        tokenizer.save_pretrained(run_dir / "model")
        return [run_dir / "model"]
    from safetensors.torch import save_file

    tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(run_dir / FROZEN_WEIGHTS), metadata={"format": "pt"})
    return [run_dir / FROZEN_WEIGHTS]
