"""Printing results: the summary of one run and the table of a comparison."""
from __future__ import annotations

from .console import Console


def print_summary(m: dict, console: Console, quiet: bool) -> None:
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
        ("checkpoint", f"{fmt_mb(m['checkpoint_mb'])} MiB" if m["checkpoint_files"] else "not saved (--no-save)"),
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


def fmt_mb(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 or value == 0 else f"{value:.2g}"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | accuracy | macro-F1 | trainable params | trainable % | train time (s) | peak memory (MiB) "
             "| checkpoint (MiB) | lr |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['trainable_params']:,} | "
                     f"{r['trainable_percent']:.3f} | {r['train_time_s']:.1f} | {r['peak_memory_mb']:,.0f} | "
                     f"{fmt_mb(r['checkpoint_mb'])} | {r['lr']:g} |")
    return "\n".join(lines)
