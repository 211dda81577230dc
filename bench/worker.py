"""One training-step measurement, run in its own process so peak memory is its own.

``python -m bench.worker '<json spec>'`` prints one JSON line: step times, peak memory, trainable
parameters and checkpoint size.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from .setup_methods import build_model, make_batch, prepare


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> None:
    """Reset the process's peak RSS (Linux ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _checkpoint_bytes(model, method: str) -> int:
    import hifi_fast

    with tempfile.TemporaryDirectory() as tmp:
        if method == "hifi":
            hifi_fast.save(model, tmp)
        elif method == "lora":
            model.save_pretrained(tmp)
        else:
            from safetensors.torch import save_file

            tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
            save_file(tensors, str(Path(tmp) / "model.safetensors"))
        return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())


def measure(spec: dict) -> dict:
    device = torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    model = build_model(spec["model"], device=device, dtype=getattr(torch, spec["dtype"]))
    batch = make_batch(model, spec["batch_size"], spec["seq_len"], spec["seed"], device)
    scoring = [{k: v for k, v in batch.items() if k != "labels"}] * 4
    # CPU: the baseline is the resident set before ``prepare``: memory a method's set-up leaves in the
    # heap (HiFi's scoring pass) is reused by training and would otherwise hide from the increment.
    cpu_base_mb = _status_mb("VmRSS") if device.type == "cpu" else 0.0
    model = prepare(model, spec["method"], heads_per_layer=spec["heads_per_layer"], lora_r=spec["lora_r"], scoring_batches=scoring)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if device.type == "cuda":
        base_mb = torch.cuda.memory_allocated() / 2**20
    else:
        _reset_cpu_peak()
        base_mb = cpu_base_mb
    times = []
    for step in range(spec["warmup"] + spec["steps"]):
        sync()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
        sync()
        if step >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = _status_mb("VmHWM")
    import hifi_fast

    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for n, p in model.named_parameters() if ".hifi_" not in n and "lora_" not in n)
    return {
        "step_times": times,
        "peak_mb": peak_mb,
        "base_mb": base_mb,
        "trainable_params": trainable,
        "total_params": total,
        "checkpoint_bytes": _checkpoint_bytes(model, spec["method"]),
        "backend": hifi_fast.backends.backend_name(device) if spec["method"] == "hifi" else "",
    }


def _naive_scoring(model, batches) -> None:
    """The baseline the scoring kernels replace: per example, a Python loop over heads calling
    ``torch.linalg.svdvals`` on each head's output."""
    import hifi_fast

    layers = hifi_fast.adapters.attention_layers(model)
    modules = dict(model.named_modules())
    outputs = []
    handles = [modules[l.o].register_forward_pre_hook(lambda m, a: outputs.append(a[0])) for l in layers]
    try:
        with torch.no_grad():
            for batch in batches:
                outputs.clear()
                model.base_model(**batch)
                for out in outputs:
                    heads = out.view(*out.shape[:2], layers[0].num_heads, -1)
                    for example in heads:
                        for h in range(heads.shape[2]):
                            s = torch.linalg.svdvals(example[:, h].double())
                            p = s / s.sum()
                            (-(p * p.clamp_min(1e-30).log()).sum()).item()
    finally:
        for handle in handles:
            handle.remove()


def measure_scoring(spec: dict) -> dict:
    """Seconds for the scoring pass, a plain forward over the same batches, and the naive loop."""
    import hifi_fast

    device = torch.device(spec["device"])
    model = build_model(spec["model"], device=device, dtype=getattr(torch, spec["dtype"])).eval()
    count = -(-spec["num_examples"] // spec["batch_size"])  # whole batches covering num_examples
    batches = [
        {k: v for k, v in make_batch(model, spec["batch_size"], spec["seq_len"], i, device).items() if k != "labels"}
        for i in range(count)
    ]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn) -> list[float]:
        fn()  # warm-up
        times = []
        for _ in range(spec["repeats"]):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return times

    def forward():
        with torch.no_grad():
            for batch in batches:
                model.base_model(**batch)

    results = {
        "forward": timed(forward),
        "scoring": timed(lambda: hifi_fast.score_heads(model, batches, num_examples=spec["num_examples"])),
    }
    if spec.get("naive", True):
        results["naive_svdvals_loop"] = timed(lambda: _naive_scoring(model, batches))
    return results


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    print(json.dumps(measure_scoring(spec) if spec.get("mode") == "scoring" else measure(spec)))
