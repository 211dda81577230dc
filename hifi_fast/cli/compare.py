"""``compare``: the same pipeline for several methods, side by side."""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from .classify import run_finetune
from .console import CLIError, Console
from .loading import auto_threads
from .parse import METHODS, build_parser, check_args
from .report import markdown_table
from .runs import METRICS, default_output_dir

COMPARE_COLUMNS = ("method", "accuracy", "macro_f1", "trainable_params", "trainable_percent", "train_time_s",
                   "peak_memory_mb", "checkpoint_mb", "tokens_per_s", "lr")


def argv_for(parser: argparse.ArgumentParser, args, skip: set[str]) -> list[str]:
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
    from hifi_fast.cli.plots import plot_comparison

    check_args(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise CLIError(f"--methods: {f'unknown {unknown}' if unknown else 'empty'}; choose from {', '.join(METHODS)}")
    if len(set(methods)) < len(methods):  # each method runs into its own folder, <output-dir>/<method>
        raise CLIError(f"--methods: {args.methods!r} names a method twice; each runs once")
    console = Console(args.quiet)
    args.threads = args.threads or auto_threads()[0]  # once, so that every method runs with the same
    out_dir = Path(args.output_dir or default_output_dir("compare"))
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
                    *argv_for(finetune_parser, args, {"method", "output_dir"})]
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
    table = markdown_table(rows)
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
