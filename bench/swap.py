"""``python -m bench.swap``: task switching on one base model — ``hifi_fast.swap`` between two HiFi
checkpoints vs peft LoRA r=8 between two adapters — against one forward pass, side by side in one run.

For each model (MiniLM-L6 with its real weights; a Llama-shaped random classifier with grouped-query
attention), two HiFi tasks of 2 heads per layer are saved from a quick patch and two AdamW steps on
random tokens (the values do not matter, only their size and place). Then, in rounds:

- the plain forward (batch 16 x 64 tokens), which is also the swapped model's: it stays unpatched;
- ``swap(model, A)`` / ``swap(model, B)`` alternately, the checkpoints in memory (the default), and
  with ``cache=False`` (read and verified from disk on every swap);
- peft: ``set_adapter`` between two LoRA r=8 adapters (q/v, the task head in ``modules_to_save``),
  the forward with the active adapter unmerged, and a merged switch (``unmerge_adapter``,
  ``set_adapter``, ``merge_adapter``) with the forward it buys.

Memory per stored task: HiFi keeps the task's values and the base values of the slices it overwrites
(``SwapState``), beside the checkpoint files on disk; LoRA keeps the adapter's A/B matrices and its
own copy of the task head. Writes ``bench/results/swap/summary.md`` and ``results.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import hifi_fast
from hifi_fast.adapters import attention_layers, get_adapter
from hifi_fast.cli.baselines import lora_targets
from hifi_fast.storing.checkpoint import CONFIG_NAME, WEIGHTS_NAME

from .setup_methods import build_model, make_batch

HEADS_PER_LAYER = 2
LORA_R = 8
ADAPTERS = ("task_a", "task_b")


def build(name: str) -> torch.nn.Module:
    """``minilm`` (real pretrained MiniLM-L6) or ``llama`` (random, hidden 1024, 8 layers, 16 heads,
    4 key/value heads, intermediate 2816, vocabulary 32000), a 3-class sequence classifier in eval mode."""
    if name == "minilm":
        return build_model("minilm").eval()
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    config = LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=4, num_labels=3, pad_token_id=0,
    )
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config).eval()


def save_task(base: torch.nn.Module, directory: Path, seed: int) -> Path:
    """A HiFi checkpoint of ``HEADS_PER_LAYER`` random heads per layer after two AdamW steps."""
    generator = torch.Generator().manual_seed(seed)
    layers = attention_layers(base)
    selection = {
        layer.index: torch.randperm(layer.num_heads, generator=generator)[:HEADS_PER_LAYER].tolist() for layer in layers
    }
    model = hifi_fast.patch(copy.deepcopy(base).train(), hifi_fast.HeadSelection(selection))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(2):
        model(**make_batch(model, 4, 32, seed=seed * 10 + step, device=torch.device("cpu"))).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    hifi_fast.save(model, directory)
    return directory


def timed(fn, repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn(i)``, in ms."""
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append(1e3 * (time.perf_counter() - start))
    return times


def forward_fn(model: torch.nn.Module, batch: dict):
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def run(_=None):
        with torch.no_grad():
            return model(**inputs).logits

    return run


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    p20, p80 = (ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in (0.2, 0.8))
    return {"p50": statistics.median(times), "p20": p20, "p80": p80, "n": len(times)}


def lora_model(base: torch.nn.Module):
    """peft LoRA r=8 on the query/value projections with two adapters, ``ADAPTERS``, randomly
    initialised (so that merging does real work), the task head in ``modules_to_save``."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0, init_lora_weights=False,
        target_modules=lora_targets(base), modules_to_save=get_adapter(base).default_modules_to_save(base),
    )
    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name=ADAPTERS[0])
    model.add_adapter(ADAPTERS[1], config)
    return model.eval()


def adapter_bytes(model, adapter: str) -> int:
    return sum(p.nbytes for name, p in model.named_parameters() if f".{adapter}." in name)


def lora_drift(model, reference: dict[str, torch.Tensor]) -> float:
    """Largest change of a LoRA-wrapped base weight after the merge/unmerge switches (0: bit-exact)."""
    drift = 0.0
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            weight = module.base_layer.weight.detach()
            drift = max(drift, (weight - reference[name + ".weight"]).abs().max().item())
    return drift


def bench_model(name: str, rounds: int, switches: int, forwards: int, workdir: Path) -> dict:
    model = build(name)
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    peft = lora_model(model)  # from the base model, before any swap
    tasks = [save_task(model, workdir / f"{name}-{t}", seed) for t, seed in (("a", 1), ("b", 2))]
    batch = make_batch(model, 16, 64, seed=0, device=torch.device("cpu"))
    forward = forward_fn(model, batch)

    def flip(i, **kwargs):
        hifi_fast.swap(model, tasks[i % 2], **kwargs)

    first = timed(lambda _: hifi_fast.swap(model, tasks[0]), 1)[0]  # fingerprint + read + verify
    second = timed(lambda _: hifi_fast.swap(model, tasks[1]), 1)[0]  # read + verify
    state = model.hifi_swap_state
    task_bytes = [{"values": t.value_bytes, "base": t.base_bytes} for t in state.tasks.values()]
    checkpoint_bytes = [sum((p / f).stat().st_size for f in (CONFIG_NAME, WEIGHTS_NAME)) for p in tasks]

    peft_forward = forward_fn(peft, batch)
    lora = peft.base_model

    def merged_flip(i):
        lora.unmerge_adapter()
        peft.set_adapter(ADAPTERS[i % 2])
        lora.merge_adapter()

    times: dict[str, list[float]] = {}
    for _ in range(rounds):  # every measurement in every round, so drift hits all alike
        forward(), peft_forward()  # warm-up
        for key, fn, n in [
            ("forward_ms", forward, forwards),
            ("hifi_switch_ms", flip, switches),
            ("hifi_switch_from_disk_ms", lambda i: flip(i, cache=False), max(4, switches // 10)),
            ("lora_set_adapter_ms", lambda i: peft.set_adapter(ADAPTERS[i % 2]), switches),
            ("lora_unmerged_forward_ms", peft_forward, forwards),
        ]:
            times.setdefault(key, []).extend(timed(fn, n))
        lora.merge_adapter()
        times.setdefault("lora_merged_switch_ms", []).extend(timed(merged_flip, max(4, switches // 10)))
        times.setdefault("lora_merged_forward_ms", []).extend(timed(peft_forward, forwards))
        lora.unmerge_adapter()
    drift = lora_drift(peft, base_weights)
    to_base = timed(lambda _: hifi_fast.swap(model, None), 1)[0]
    exact = all(torch.equal(v, model.state_dict()[k]) for k, v in base_weights.items())

    stats = {key: summary(value) for key, value in times.items()}
    fwd = stats["forward_ms"]["p50"]
    return {
        "model": name,
        "config": {k: getattr(model.config, k) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                          "num_attention_heads", "num_key_value_heads") if hasattr(model.config, k)},
        "parameters": sum(p.numel() for p in model.parameters()),
        "heads_per_layer": HEADS_PER_LAYER,
        "times": stats,
        "ratios_vs_forward": {key: s["p50"] / fwd for key, s in stats.items() if key != "forward_ms"},
        "lora_unmerged_forward_vs_plain": stats["lora_unmerged_forward_ms"]["p50"] / fwd,
        "lora_merged_forward_vs_plain": stats["lora_merged_forward_ms"]["p50"] / fwd,
        "hifi_first_swap_ms": first,
        "hifi_first_read_ms": second,
        "hifi_swap_to_base_ms": to_base,
        "hifi_back_to_base_bit_exact": exact,
        "lora_base_weight_drift": drift,
        "hifi_task_bytes": task_bytes,
        "hifi_checkpoint_bytes": checkpoint_bytes,
        "lora_adapter_bytes": [adapter_bytes(peft, a) for a in ADAPTERS],
    }


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def render(results: dict) -> str:
    lines = [
        f"# Task switching: hifi_fast.swap vs peft LoRA r={LORA_R} ({results['device']})",
        "",
        (f"`{results['command']}` — torch {results['torch']}, peft {results['peft']}, transformers "
         f"{results['transformers']}; {results['rounds']} rounds, each measurement in every round "
         "(medians over all rounds; p20-p80 in results.json). Forward: batch 16 x 64 tokens, no_grad. "
         f"HiFi tasks: {HEADS_PER_LAYER} heads per layer; LoRA: q/v, r={LORA_R}, two adapters."),
        "",
        ("| model | forward ms | hifi switch ms (A↔B, in memory; p20-p80) | vs forward | hifi switch, read from disk ms "
         "| LoRA set_adapter ms | vs forward | LoRA unmerged forward vs plain | LoRA merged switch ms (unmerge+set+merge) "
         "| vs forward |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        t, q = r["times"], r["ratios_vs_forward"]
        switch = t["hifi_switch_ms"]
        lines.append(
            f"| {r['model']} ({r['parameters'] / 1e6:.1f} M) | {t['forward_ms']['p50']:.1f} | {switch['p50']:.3f} "
            f"({switch['p20']:.3f}-{switch['p80']:.3f}) | **{100 * q['hifi_switch_ms']:.2f} %** | "
            f"{t['hifi_switch_from_disk_ms']['p50']:.2f} | {t['lora_set_adapter_ms']['p50']:.3f} | "
            f"{100 * q['lora_set_adapter_ms']:.2f} % | {r['lora_unmerged_forward_vs_plain']:.3f}x | "
            f"{t['lora_merged_switch_ms']['p50']:.2f} | {100 * q['lora_merged_switch_ms']:.2f} % |"
        )
    lines += ["", "Memory per stored task (MiB; the first task of each model):", "",
              ("| model | hifi: task values | hifi: base values kept | hifi: in memory, total | hifi: checkpoint on disk "
               "| LoRA r=8: adapter + its task head copy |"),
              "|---|---|---|---|---|---|"]
    for r in results["models"]:
        task = r["hifi_task_bytes"][0]
        lines.append(f"| {r['model']} | {mib(task['values'])} | {mib(task['base'])} | {mib(task['values'] + task['base'])} | "
                     f"{mib(r['hifi_checkpoint_bytes'][0])} | {mib(r['lora_adapter_bytes'][0])} |")
    lines += ["", "Notes:", ""]
    for r in results["models"]:
        lines.append(
            f"- {r['model']}: first swap {r['hifi_first_swap_ms']:.0f} ms (hashes the base weights once, reads and verifies "
            f"the checkpoint), first read of the second task {r['hifi_first_read_ms']:.1f} ms, back to base "
            f"{r['hifi_swap_to_base_ms']:.3f} ms, bit-exact: {r['hifi_back_to_base_bit_exact']}; LoRA merged forward "
            f"{r['lora_merged_forward_vs_plain']:.3f}x plain, base weights after the merge/unmerge switches off by up to "
            f"{r['lora_base_weight_drift']:.2e} (HiFi: 0, restores are copies)."
        )
    lines += [
        ("- The swapped model is the plain transformers model (no patch, no extra GEMM), so its forward *is* the plain "
         "forward. LoRA's `set_adapter` switch is as cheap, but its unmerged forward pays the adapters' extra GEMMs on "
         "every call; merged, it pays a `B @ A` per target and layer on every switch, and unmerging does not give "
         "the base weights back bit for bit."),
        "- Memory: a HiFi task of 2 heads per layer trains more parameters than LoRA r=8 on q/v ("
        + ", ".join(f"{r['hifi_task_bytes'][0]['values'] / r['lora_adapter_bytes'][0]:.1f}x on {r['model']}" for r in results["models"])
        + "), and HiFi keeps the base values of its slices beside them: memory per task = 2 x its slices.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="minilm,llama", help="comma-separated: minilm, llama")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--switches", type=int, default=100, help="timed switches per kind and round")
    parser.add_argument("--forwards", type=int, default=5, help="timed forwards per kind and round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/swap")
    args = parser.parse_args(argv)
    import peft
    import transformers

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        models = [bench_model(m, args.rounds, args.switches, args.forwards, Path(tmp)) for m in args.models.split(",")]
    results = {
        "device": f"cpu, {torch.get_num_threads()} threads ({platform.machine()})",
        "command": " ".join(["python -m bench.swap", *(sys.argv[1:] if argv is None else argv)]),
        "torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
        "rounds": args.rounds, "switches": args.switches, "forwards": args.forwards, "models": models,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "summary.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
