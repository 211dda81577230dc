"""Figures written by ``hifi-fast``: the head scores of a run and the method comparison (matplotlib,
``Agg`` backend, no display needed)."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_heads(scores, selection_heads: Mapping[int, Sequence[int]], path: str | os.PathLike,
               title: str = "") -> None:
    """``heads.png``: PageRank score (layer x head) with the selected heads boxed, information
    richness (layer x head), and every layer's head-correlation (CKA) matrix side by side."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    pagerank = np.asarray(scores.pagerank, dtype=np.float64)
    richness = np.asarray(scores.richness, dtype=np.float64)
    correlation = np.asarray(scores.correlation, dtype=np.float64)
    layers, heads = pagerank.shape
    width = max(10.0, 0.55 * heads * 2 + 3)
    fig = plt.figure(figsize=(width, 0.5 * layers + 2 + max(2.2, width / layers * 0.9)))
    grid = fig.add_gridspec(2, 2, height_ratios=[max(layers, 2), max(2.0, heads / layers * 1.2 * 2)])
    ax_pr, ax_ri = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    ax_co = fig.add_subplot(grid[1, :])

    def heat(ax, values, label, cmap):
        image = ax.imshow(values, aspect="auto", cmap=cmap, origin="upper")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(heads))
        ax.set_yticks(range(layers))
        ax.tick_params(labelsize=7)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
        ax.set_title(label, fontsize=10)

    heat(ax_pr, pagerank, "PageRank score (selected heads boxed)", "viridis")
    for layer, chosen in selection_heads.items():
        for head in chosen:
            ax_pr.add_patch(Rectangle((head - 0.5, int(layer) - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    heat(ax_ri, richness, "information richness (singular-value entropy)", "magma")

    tiled = np.concatenate([np.pad(correlation[l], ((0, 0), (0, 1)), constant_values=np.nan)
                            for l in range(layers)], axis=1)[:, :-1]
    image = ax_co.imshow(tiled, aspect="equal", cmap="cividis", vmin=0.0, vmax=1.0, origin="upper")
    ax_co.set_xticks([l * (heads + 1) + (heads - 1) / 2 for l in range(layers)])
    ax_co.set_xticklabels([f"layer {l}" for l in range(layers)], fontsize=7)
    ax_co.set_yticks([])
    ax_co.set_ylabel("head")
    ax_co.set_title("head x head correlation (linear CKA) per layer", fontsize=10)
    fig.colorbar(image, ax=ax_co, fraction=0.02, pad=0.01).ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COMPARE_PANELS = (
    ("accuracy", "eval accuracy", False),
    ("macro_f1", "eval macro-F1", False),
    ("trainable_params", "trainable parameters", True),
    ("train_time_s", "training time (s)", False),
    ("peak_memory_mb", "peak memory (MiB)", False),
    ("checkpoint_mb", "checkpoint size (MiB)", True),
)


def plot_comparison(rows: Sequence[Mapping], path: str | os.PathLike, title: str = "",
                    baseline: float | None = None) -> None:
    """Bar chart of every ``COMPARE_PANELS`` figure per method (log scale for sizes)."""
    plt = _pyplot()
    methods = [str(r["method"]) for r in rows]
    colors = {"hifi": "#d62728", "lora": "#1f77b4", "full": "#7f7f7f", "frozen": "#2ca02c"}
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for ax, (key, label, log) in zip(axes.flat, COMPARE_PANELS):
        values = [float(r.get(key) or 0.0) for r in rows]
        bars = ax.bar(methods, values, color=[colors.get(m, "#9467bd") for m in methods])
        if log and all(v > 0 for v in values):
            ax.set_yscale("log")
        if key == "accuracy" and baseline is not None:
            ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label="majority class")
            ax.legend(fontsize=7, loc="lower right")
        for bar, value in zip(bars, values):
            text = f"{value:.3f}" if value < 10 and not float(value).is_integer() else f"{value:,.0f}"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7)
        ax.set_title(label, fontsize=10)
        ax.tick_params(labelsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
