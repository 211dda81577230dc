"""Plain float64 references written straight from DESIGN §1.2-1.6, deliberately unbatched and
independent of the package's code paths (own hooks, own module names, own slice masks)."""
from __future__ import annotations

import math

import torch

O_PROJ = {
    "bert": "bert.encoder.layer.{}.attention.output.dense",
    "distilbert": "distilbert.transformer.layer.{}.attention.out_lin",
    "gpt2": "transformer.h.{}.attn.c_proj",
    "llama": "model.layers.{}.self_attn.o_proj",
}


def geometry(model, family):
    """(layers, heads, kv_heads, head_dim, hidden)"""
    c = model.config
    if family == "gpt2":
        return c.n_layer, c.n_head, c.n_head, c.n_embd // c.n_head, c.n_embd
    if family == "distilbert":
        return c.n_layers, c.n_heads, c.n_heads, c.dim // c.n_heads, c.dim
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, c.num_attention_heads, kv, head_dim, c.hidden_size


def entropy_of(ctx: torch.Tensor) -> float:
    s = torch.linalg.svdvals(ctx.double())
    total = s.sum()
    if total == 0:
        return 0.0
    p = s / total
    return float(-sum(pi * math.log(pi) for pi in p.tolist() if pi > 0))


def cka_of(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double() - a.double().mean(0)
    b = b.double() - b.double().mean(0)
    num = torch.linalg.matrix_norm(a.T @ b) ** 2
    den = torch.linalg.matrix_norm(a.T @ a) * torch.linalg.matrix_norm(b.T @ b)
    return 0.0 if den == 0 else float(num / den)


def pagerank_ref(corr, teleport, damping=0.85, tol=1e-10, max_iter=100):
    """One layer: corr [H, H] (list of lists or tensor), teleport [H] or None."""
    corr = torch.as_tensor(corr, dtype=torch.float64)
    n = corr.shape[0]
    w = corr.clone()
    for i in range(n):
        w[i, i] = 0.0
    p = torch.empty_like(w)
    for j in range(n):
        col = w[:, j].sum()
        p[:, j] = w[:, j] / col if col > 0 else 1.0 / n
    if teleport is None:
        v = torch.full((n,), 1.0 / n, dtype=torch.float64)
    else:
        t = torch.as_tensor(teleport, dtype=torch.float64)
        v = t / t.sum() if t.sum() > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)
    s = v.clone()
    for _ in range(max_iter):
        new = (1 - damping) * v + damping * (p @ s)
        done = (new - s).abs().sum() < tol
        s = new
        if done:
            break
    return s


def score_reference(model, family, batches, damping=0.85):
    """Run every example alone, unpadded, and compute richness/CKA/PageRank per DESIGN §1.2-1.4."""
    num_layers, num_heads, _, head_dim, _ = geometry(model, family)
    examples = (
        {"input_ids": batch["input_ids"][row : row + 1, : int(batch["attention_mask"][row].sum())]}
        for batch in batches
        for row in range(batch["input_ids"].shape[0])
    )
    o_proj = [O_PROJ[family].format(i) for i in range(num_layers)]
    return examples_reference(model, model.base_model, o_proj, num_heads, head_dim, examples, damping)


@torch.no_grad()
def examples_reference(model, forward, o_proj, num_heads, head_dim, examples, damping=0.85):
    """Richness/CKA/PageRank from the inputs of the output projections ``o_proj`` (module names,
    one per layer), each example (a dict of inputs, batch 1, no padding) run alone by ``forward``. A
    module that runs several times per forward (ALBERT's shared layers) counts the mean over its runs."""
    num_layers = len(o_proj)
    modules = dict(model.named_modules())
    captured = {}
    handles = [
        modules[name].register_forward_pre_hook(lambda m, args, i=i: captured.setdefault(i, []).append(args[0][0].double()))
        for i, name in enumerate(o_proj)
    ]
    ent = torch.zeros(num_layers, num_heads, dtype=torch.float64)
    cka = torch.zeros(num_layers, num_heads, num_heads, dtype=torch.float64)
    count = 0
    try:
        for example in examples:
            captured.clear()
            forward(**example)
            count += 1
            for layer in range(num_layers):
                for run in captured[layer]:
                    heads, share = run.view(-1, num_heads, head_dim), 1 / len(captured[layer])
                    for h in range(num_heads):
                        ent[layer, h] += share * entropy_of(heads[:, h])
                        for g in range(num_heads):
                            cka[layer, h, g] += share * cka_of(heads[:, h], heads[:, g])
    finally:
        for handle in handles:
            handle.remove()
    richness, corr = ent / count, cka / count
    for layer in range(num_layers):
        corr[layer].fill_diagonal_(1.0)
    pr = torch.stack([pagerank_ref(corr[l], richness[l], damping) for l in range(num_layers)])
    return richness, corr, pr


def trainable_masks(model, family, heads_by_layer, task_heads):
    """{param name: bool mask of the entries that HiFi trains} (DESIGN §1.6), built by hand."""
    num_layers, num_heads, kv_heads, d, hidden = geometry(model, family)
    group = num_heads // kv_heads
    masks = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in model.named_parameters()}
    for name in masks:
        if name.split(".")[0] in task_heads:
            masks[name][...] = True
    for layer, heads in heads_by_layer.items():
        groups = sorted({h // group for h in heads})
        if family == "bert":
            pre = f"bert.encoder.layer.{layer}.attention."
            for proj in ("query", "key", "value"):
                for h in heads:
                    masks[pre + f"self.{proj}.weight"][h * d : (h + 1) * d, :] = True
                    masks[pre + f"self.{proj}.bias"][h * d : (h + 1) * d] = True
            for h in heads:
                masks[pre + "output.dense.weight"][:, h * d : (h + 1) * d] = True
        elif family == "gpt2":
            pre = f"transformer.h.{layer}.attn."
            for h in heads:
                for part in range(3):  # Conv1D weight is [in, out]: head rows are columns
                    lo = part * hidden + h * d
                    masks[pre + "c_attn.weight"][:, lo : lo + d] = True
                    masks[pre + "c_attn.bias"][lo : lo + d] = True
                masks[pre + "c_proj.weight"][h * d : (h + 1) * d, :] = True
        elif family == "llama":
            pre = f"model.layers.{layer}.self_attn."
            for h in heads:
                masks[pre + "q_proj.weight"][h * d : (h + 1) * d, :] = True
                masks[pre + "o_proj.weight"][:, h * d : (h + 1) * d] = True
            for g in groups:
                masks[pre + "k_proj.weight"][g * d : (g + 1) * d, :] = True
                masks[pre + "v_proj.weight"][g * d : (g + 1) * d, :] = True
        else:
            raise ValueError(family)
    return masks


def slice_masks(model, slices, task_heads):
    """{param name: bool mask of the entries that ``slices`` (``ProjectionSlice``s) train}, plus every
    parameter of the top-level ``task_heads``: the masks of any layout, built from the slices alone
    (rows: output features and their bias entries; cols: input features)."""
    masks = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in model.named_parameters()}
    for name in masks:
        if name.split(".")[0] in task_heads:
            masks[name][...] = True
    modules = dict(model.named_modules())
    for spec in slices:
        module = modules[spec.module_name]
        features = [b + i for b in spec.blocks for i in range(spec.block_size)]
        weight = masks[spec.module_name + ".weight"]
        weight = weight if isinstance(module, torch.nn.Linear) else weight.t()  # Conv1D: [in, out]
        if spec.sliced == "rows":
            weight[features, :] = True
            if module.bias is not None:
                masks[spec.module_name + ".bias"][features] = True
        else:
            weight[:, features] = True
    return masks
