"""``python -m bench.host_overhead``: what a training step costs the host, per method.

On a GPU, small and medium models are launch-bound: the step's cost is what the host does per op
(Python, dispatcher, autograd) and the number of ops (one launch each). This benchmark makes that
cost visible on a CPU by shrinking the compute to almost nothing: models of real depth (16 layers)
and tiny width (hidden 64), batch 2 x 16 tokens, one thread. Per method (frozen backbone with input
gradients, HiFi's ``patch(model)``, the same on the Python autograd Function rather than the C++
node (``hifi-python``: ``HIFI_FAST_NATIVE=0``), on a GPU the same with every slice gradient in ATen ops
on the C++ node rather than compact slices' in one Triton launch from the Python Function
(``hifi-torch``: ``HIFI_FAST_BACKEND=torch``; on a CPU that is ``hifi``), LoRA r=8 on q/v and on
q/k/v/o, full fine-tuning; the two HiFi variants eager only, since compiled graphs use neither
node), it reports

- leaf ops per step, counted by the profiler (views and metadata ops left out): forward + backward,
  and the optimizer step apart. Deterministic: no noise;
- host milliseconds per step (zero_grad, forward, backward, AdamW step: fused, or foreach where it
  is compiled; the CPU time of the one thread that runs it, garbage collection paused): each method
  in a process of its own (no dynamo cache shared between models), the processes taking turns
  round by round, each round's median step per method, and ratios paired round by round;
- the same with ``torch.compile`` of the model and of the optimizer step (``--compiled``; 4 layers,
  compiling costs minutes here), with the graph breaks and recompiles seen while timing.

On a GPU (``--device cuda``, a stage of ``bench/gpu_check.sh``) the steps are timed by CUDA events
(a launch-bound step's device time is its host time), and ``--cuda-graphs`` compiles with
``mode="reduce-overhead"``, which replays the compiled graphs as CUDA graphs.

Writes ``bench/results/host-overhead/host_overhead.{md,json}`` (``--out``).
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import statistics
import time
import traceback
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import hifi_fast
from hifi_fast.cli.baselines import apply_lora, freeze_backbone, train_everything

from .timing import step_times

METHODS = ("frozen", "hifi", "hifi-python", "hifi-torch", "lora-qv", "lora-qkvo", "full")
# HiFi variants: the environment their process runs under (read at its first patch)
VARIANT_ENV = {"hifi-python": {"HIFI_FAST_NATIVE": "0"}, "hifi-torch": {"HIFI_FAST_BACKEND": "torch"}}
SHAPES = ("llama", "bert")
# Ops that only make views or read metadata: no launch on a GPU.
METADATA_OPS = {
    "alias", "as_strided", "chunk", "contiguous", "detach", "detach_", "empty", "empty_like", "empty_strided",
    "expand", "expand_as", "flatten", "is_same_size", "lift_fresh", "narrow", "new_empty", "new_empty_strided",
    "permute", "reshape", "_reshape_alias", "resolve_conj", "resolve_neg", "result_type", "select", "slice",
    "split", "split_with_sizes", "squeeze", "t", "to", "transpose", "unbind", "unflatten", "unsqueeze", "view",
    "view_as", "_unsafe_view", "_has_compatible_shallow_copy_type", "numpy_T", "set_", "resize_",
}


def build_model(shape: str, layers: int) -> torch.nn.Module:
    """A randomly initialised sequence classifier of real depth and tiny width."""
    from transformers import AutoModelForSequenceClassification, BertConfig, LlamaConfig

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=8, num_labels=3)
    config = (LlamaConfig(num_key_value_heads=2, pad_token_id=0, **common) if shape == "llama"
              else BertConfig(max_position_embeddings=64, **common))
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config)


def prepare(model: torch.nn.Module, method: str) -> torch.nn.Module:
    """``model`` set up for ``method`` (see the module docstring)."""
    if method == "frozen":
        return freeze_backbone(model, input_grads=True)
    if method == "hifi" or method in VARIANT_ENV:
        return hifi_fast.patch(model)  # the default: 2 random heads per layer, no scoring pass
    if method == "full":
        return train_everything(model)
    return apply_lora(model, r=8, projections=method.split("-")[1])


class Run:
    """One method's model, optimizer and batch, and its training step."""

    def __init__(self, shape: str, method: str, layers: int, compiled: bool, compile_optimizer: bool = True,
                 device: str = "cpu", cuda_graphs: bool = False) -> None:
        self.cuda_graphs = cuda_graphs
        self.model = prepare(build_model(shape, layers), method).to(device).train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        # A compiled step compiles the foreach AdamW (inductor fuses it); dynamo does not trace the
        # fused one (``_fused_adam`` is ``compiler.disable``d: the step would break around it).
        compile_step = compiled and compile_optimizer
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, fused=not compile_step, foreach=compile_step or None)
        generator = torch.Generator().manual_seed(0)
        self.batch = {"input_ids": torch.randint(1, 256, (2, 16), generator=generator).to(device),
                      "labels": torch.randint(0, 3, (2,), generator=generator).to(device)}
        mode = "reduce-overhead" if cuda_graphs else None
        self.forward = torch.compile(self.model, mode=mode) if compiled else self.model
        self.optimizer_step = torch.compile(self.optimizer.step, mode=mode) if compile_step else self.optimizer.step

    def forward_backward(self) -> None:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: last step's graph outputs are done with
        self.optimizer.zero_grad(set_to_none=True)
        self.forward(**self.batch).loss.backward()

    def step(self) -> None:
        self.forward_backward()
        self.optimizer_step()


def _is_compute(event) -> bool:
    return event.name.startswith("aten::") and event.name[6:] not in METADATA_OPS


def _has_compute_below(event) -> bool:
    return any(_is_compute(child) or _has_compute_below(child) for child in event.cpu_children)


def leaf_ops(fn) -> dict[str, int]:
    """The compute ops ``fn`` runs, by name: aten ops (metadata and view ops left out) that call no
    other compute op, i.e. one per kernel a GPU would launch."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: dict[str, int] = {}
    for event in prof.events():
        if _is_compute(event) and not _has_compute_below(event):
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def trained_projections(model: torch.nn.Module) -> tuple[int, int]:
    """Projections with head slices, and how many of them run the C++ autograd node eagerly."""
    modules = [m for m in model.modules() if isinstance(m, hifi_fast.tuning.modules.HeadSliceMixin)]
    return len(modules), sum(m.hifi_native is not None for m in modules)


def _worker(conn, shape: str, method: str, layers: int, compiled: bool, compile_optimizer: bool, device: str,
            cuda_graphs: bool) -> None:
    """One method in a process of its own: set up, warm up (compile), count ops, then time ``n``
    steps whenever the parent sends ``n`` (``None``: stop), sending back the round's median."""
    from torch._dynamo.utils import counters

    try:
        os.environ.update(VARIANT_ENV.get(method, {}))  # a process of its own
        torch.set_num_threads(1)
        run = Run(shape, method, layers, compiled, compile_optimizer, device, cuda_graphs)
        for _ in range(3):  # warm-up (and compilation)
            run.step()
        ops = {"forward_backward": leaf_ops(run.forward_backward), "optimizer": leaf_ops(run.optimizer_step)}
        breaks, graphs = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
        projections, native = trained_projections(run.model)
        conn.send({"ops": ops, "trained_projections": projections, "native_projections": native,
                   "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"})
        gc.collect()
        gc.disable()  # a collection inside a timed step would land on whichever method ran then
        while (steps := conn.recv()) is not None:
            # CPU: the thread's CPU time, which is the host's work (a GPU: CUDA events)
            conn.send(statistics.median(step_times(run.step, steps, torch.device(device), time.thread_time)))
        conn.send({"graph_breaks": sum(counters["graph_break"].values()) - breaks,
                   "recompiles": counters["stats"]["unique_graphs"] - graphs})
    except Exception:  # noqa: BLE001 - the parent raises it, with this traceback
        conn.send({"error": traceback.format_exc()})


def _receive(conn, method: str):
    message = conn.recv()
    if isinstance(message, dict) and "error" in message:
        raise RuntimeError(f"{method}: the benchmark process failed:\n{message['error']}")
    return message


def measure(shape: str, layers: int, rounds: int, steps: int, compiled: bool, compile_optimizer: bool,
            methods: tuple[str, ...] = METHODS, device: str = "cpu", cuda_graphs: bool = False) -> dict:
    """Each method runs in a process of its own (dynamo's caches are per process and per code
    object: models of one class compiled in one process share entries, and one model's graph
    breaks leave frames the others then enter), the rounds interleaved through pipes."""
    context = multiprocessing.get_context("spawn")
    workers = {}
    for method in methods:
        conn, child = context.Pipe()
        process = context.Process(target=_worker, daemon=True,
                                  args=(child, shape, method, layers, compiled, compile_optimizer, device, cuda_graphs))
        process.start()
        workers[method] = conn, process
    setup = {method: _receive(conn, method) for method, (conn, _) in workers.items()}
    times: dict[str, list[float]] = {method: [] for method in methods}
    for round_index in range(rounds):
        order = methods if round_index % 2 == 0 else methods[::-1]  # no method always runs first
        for method in order:
            workers[method][0].send(steps)
            times[method].append(_receive(workers[method][0], method))
    after = {}
    for method, (conn, process) in workers.items():
        conn.send(None)
        after[method] = _receive(conn, method)
        process.join()
    return {
        "shape": shape, "layers": layers, "compiled": compiled, "compiled_optimizer": compiled and compile_optimizer,
        "device": setup["hifi"]["device"], "cuda_graphs": cuda_graphs,
        "rounds": rounds, "steps_per_round": steps,
        "trained_projections": setup["hifi"]["trained_projections"],
        "native_projections": setup["hifi"]["native_projections"],
        "graph_breaks_while_timing": sum(a["graph_breaks"] for a in after.values()),
        "recompiles_while_timing": sum(a["recompiles"] for a in after.values()),
        "ops": {m: {phase: sum(c.values()) for phase, c in setup[m]["ops"].items()} for m in methods},
        "op_names": {m: setup[m]["ops"] for m in methods},
        "ms": times,
    }


def paired(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``a``'s step time divided by ``b``'s in the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def report(results: list[dict]) -> str:
    on_gpu = any(r.get("device", "cpu") != "cpu" for r in results)
    timing = ("ms: time between CUDA events around each step (a launch-bound step's device time is the "
              "host's), median over rounds of each round's median step" if on_gpu else
              "ms: CPU time of the step's thread, median over rounds of each round's median step")
    lines = [
        "# Host overhead per training step",
        "",
        f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
        f"{results[0].get('device', 'cpu') if on_gpu else platform.machine()}, {torch.get_num_threads()} thread; "
        "`python -m bench.host_overhead`. "
        "Models of tiny width (hidden 64, 8 heads; Llama: 2 KV heads), batch 2 x 16 tokens, AdamW (fused; "
        "foreach where `optimizer.step` is compiled, since dynamo does not trace the fused one): "
        "what is timed is the host's work. hifi = `hifi_fast.patch(model)` (2 random heads per layer). "
        f"{timing}; ratios: medians of per-round ratios.",
        "",
    ]
    for r in results:
        mode = "eager" if not r["compiled"] else "compiled (`torch.compile` of the model and of `optimizer.step`)" \
            if r.get("compiled_optimizer") else "compiled (`torch.compile` of the model; eager optimizer step)"
        if r.get("cuda_graphs"):
            mode += ", `mode=\"reduce-overhead\"` " + ("(CUDA graphs)" if r.get("device", "cpu") != "cpu" else "(no CUDA graphs on a CPU)")
        lines += [
            f"## {r['shape']}-like, {r['layers']} layers, {mode}",
            "",
            f"{r['rounds']} interleaved rounds x {r['steps_per_round']} steps; hifi trains "
            f"{r['trained_projections']} projections"
            + ("" if r["compiled"] else f", {r.get('native_projections', 0)} of them on the C++ autograd node"
               + (" (hifi-python: all on the Python autograd Function)" if "hifi-python" in r["ms"] else "")
               + (" (hifi-torch: all, every slice gradient in ATen ops)" if "hifi-torch" in r["ms"] else ""))
            + (f"; graph breaks while timing: {r['graph_breaks_while_timing']}, recompiles: "
               f"{r['recompiles_while_timing']}" if r["compiled"] else "") + ".",
            "",
            "| method | host ms/step | x frozen | x LoRA q/v | fwd+bwd ops | optimizer ops |",
            "|---|---|---|---|---|---|",
        ]
        ms = r["ms"]
        for method in (m for m in METHODS if m in ms):
            ops = r["ops"][method]
            vs_lora = f"{paired(ms, method, 'lora-qv'):.3f}" if "lora-qv" in ms else "-"
            lines.append(
                f"| {method} | {statistics.median(ms[method]):.2f} | {paired(ms, method, 'frozen'):.3f} | "
                f"{vs_lora} | {ops['forward_backward']} | {ops['optimizer']} |")
        extra = r["ops"]["hifi"]["forward_backward"] - r["ops"]["frozen"]["forward_backward"]
        lines += ["", f"hifi - frozen, forward + backward: {extra} ops, "
                  f"{extra / max(r['trained_projections'], 1):.2f} per trained projection.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--methods", default=None,
                        help=f"frozen and hifi at least, of {','.join(METHODS)} (default: all; hifi-torch on a GPU only)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per method per round (default 5 eager, 25 compiled: a compiled step "
                             "is short, and a round must outlast the machine's bursts of noise)")
    parser.add_argument("--compiled", action="store_true", help="also torch.compile'd (4 layers)")
    parser.add_argument("--compiled-only", action="store_true")
    parser.add_argument("--eager-optimizer", action="store_true", help="compiled: leave the optimizer step eager")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--cuda-graphs", action="store_true", help='compiled with mode="reduce-overhead"')
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "host-overhead")
    args = parser.parse_args(argv)
    methods = tuple(args.methods.split(",")) if args.methods else tuple(
        m for m in METHODS if m != "hifi-torch" or args.device == "cuda")
    if not {"frozen", "hifi"} <= set(methods) or not set(methods) <= set(METHODS):
        parser.error(f"--methods: frozen, hifi and any of {', '.join(METHODS)}; got {args.methods}")
    torch.set_num_threads(1)
    modes = ([] if args.compiled_only else [(args.layers, False)]) + ([(4, True)] if args.compiled or args.compiled_only else [])
    results = []
    for layers, compiled in modes:
        for shape in args.shapes.split(","):
            steps = args.steps or (25 if compiled else 5)
            timed = tuple(m for m in methods if not (compiled and m in VARIANT_ENV))
            results.append(measure(shape, layers, args.rounds, steps, compiled, not args.eager_optimizer,
                                   timed, args.device, args.cuda_graphs and compiled))
            text = report(results)
            print(text.split("## ")[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = ("host_overhead" + ("_compiled" if args.compiled_only else "") + ("_eager_optimizer" if args.eager_optimizer else "")
            + ("_cuda_graphs" if args.cuda_graphs else ""))
    (args.out / f"{name}.md").write_text(text)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1))
    print(f"written: {args.out / name}.md")


if __name__ == "__main__":
    main()
