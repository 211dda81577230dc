"""``python -m bench.selection_study``: see the package's docstring."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .plan import BY_NAME, GROUPS, SEEDS, SIZES, TASKS
from .runs import SelectionStudy, selection_code_hash


def parse_list(text: str, kind=str) -> list:
    out = []
    for part in text.split(","):
        if kind is int and "-" in part:
            lo, hi = part.split("-")
            out += list(range(int(lo), int(hi) + 1))
        elif part:
            out.append(kind(part))
    return out


def expand_methods(names: Sequence[str]) -> list[str]:
    out = []
    for name in names:
        for member in GROUPS.get(name, (name,)):
            if member not in BY_NAME:
                raise SystemExit(f"unknown method {member!r}; choose from {', '.join(BY_NAME)} or {', '.join(GROUPS)}")
            out.append(member)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated (default: {','.join(TASKS)})")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="training-set sizes (default: 64,256,1024)")
    parser.add_argument("--seeds", default=f"{SEEDS[0]}-{SEEDS[-1]}", help="e.g. 0-4 or 0,2 (default: 0-4)")
    parser.add_argument("--methods", default="hifi,baselines",
                        help="method names or groups: hifi (the selection variants), baselines (LoRA, full, "
                        "frozen); default: all. " + ", ".join(BY_NAME))
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/selection_study"),
                        help="scratch: data files and run directories (default: runs/selection_study)")
    parser.add_argument("--docs-dir", type=Path, default=Path("docs"),
                        help="selection_study.md and selection_study/ (records, CSV, plot) go here (default: docs)")
    parser.add_argument("--model", default=None, help="model directory (default: MiniLM-L6)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the free cores per run)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run, rounded up to epochs")
    parser.add_argument("--eval-size", type=int, default=2000)
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--plan", action="store_true", help="print what is done and what remains; run nothing")
    parser.add_argument("--report", action="store_true", help="rewrite the report from the records; run nothing")
    parser.add_argument("--forget", action="append", default=[], metavar="GLOB",
                        help="drop the records whose key (task/nSIZE/split/method/lrLR/seedS) matches, e.g. "
                        "'*/hifi-pagerank/*' after a score's definition changed; they run again")
    parser.add_argument("--verbose", action="store_true", help="the runs' own progress output")
    args = parser.parse_args(argv)
    tasks, sizes, seeds = parse_list(args.tasks), parse_list(args.sizes, int), parse_list(args.seeds, int)
    methods = expand_methods(parse_list(args.methods))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    study = SelectionStudy(args.runs_dir, args.docs_dir, model=args.model, threads=args.threads, steps=args.steps,
                           eval_size=args.eval_size, val_size=args.val_size, quiet=not args.verbose)
    if args.forget:
        print(f"forgot {study.forget(args.forget)} record(s)")
    if args.plan:
        done, left, keys = study.plan(tasks, sizes, seeds, methods)
        print("\n".join(keys))
        print(f"{done} runs finished, {left} remaining (rates not yet tuned: their base grid and 'lr?')")
    elif args.report:
        study.report()
    else:
        study._code = selection_code_hash()
        study.execute(tasks, sizes, seeds, methods)
    print(f"report: {study.docs_dir / 'selection_study.md'}")


if __name__ == "__main__":
    sys.exit(main())
