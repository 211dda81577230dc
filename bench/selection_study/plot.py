"""The study's figure: accuracy against training-set size per task and method."""
from __future__ import annotations

import math
from pathlib import Path

from .plan import METHODS, SIZES
from .stats import t_interval


def plot_accuracy(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({task for task, _, _ in runs})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks) + 2, 4.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, method in enumerate(m.name for m in METHODS):
            points = [(size, [100 * r["accuracy"] for r in runs[task, size, method].values()])
                      for size in SIZES if (task, size, method) in runs]
            if not points:
                continue
            sizes = [s * (1 + 0.025 * (i - 4)) for s, _ in points]  # a small offset: bars stay readable
            means, halves = zip(*(t_interval(v) for _, v in points))
            hifi = method.startswith("hifi-")  # baselines: dashed, square markers
            ax.errorbar(sizes, means, yerr=[0 if math.isnan(h) else h for h in halves], capsize=3, label=method,
                        color=plt.get_cmap("tab20")(i % 20), marker="o" if hifi else "s",
                        linestyle="-" if hifi else "--")
        ax.set_xscale("log", base=2)
        ax.set_xlim(SIZES[0] / 1.5, SIZES[-1] * 1.5)
        ax.set_xticks(SIZES, [str(s) for s in SIZES])
        ax.set_xlabel("training examples (class-balanced)")
        ax.set_ylabel("eval accuracy, % (mean, 95% t-interval over seeds)")
        ax.set_title(f"{task}: MiniLM-L6")
        ax.grid(alpha=0.3)
    if axes[0][-1].get_legend_handles_labels()[0]:
        axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: hides no line
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
