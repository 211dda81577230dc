"""Compile every Triton kernel of hifi_fast for real GPU targets, with or without a GPU.

    python -m hifi_fast.kernels.compile_check                      # cuda:80 and cuda:90, no GPU needed
    python -m hifi_fast.kernels.compile_check --targets native     # the GPU of this machine
    python -m hifi_fast.kernels.compile_check --json r.json --markdown r.md

The gate runs the real launchers (``head_grams``, ``head_rows_grad``, ``head_cols_grad``) on CPU
tensors of representative model shapes (``MODELS``) in every dtype they accept, under a stand-in
Triton driver (``TargetDriver``) that reports a GPU's compute capability and shared-memory limit
and launches nothing: Triton compiles exactly what the launchers would build on that GPU (their
block sizes, Triton's argument specialisation, every autotune config that survives pruning)
through its own pipeline, down to a cubin with its bundled ``ptxas``. ``native`` takes the
architecture and the shared-memory limit from this machine's GPU (and checks that the limit
this module assumes for it is right). Every compiled kernel is reported with its shared memory
against the device's limit, its registers and its spills.

Exit status 1 on: a compile error; a kernel reaching launch (or an autotune benchmark) with more
shared memory than the device has, i.e. a config that pruning should have dropped; register spills
in the scoring kernels (their fp64 accumulators are sized to fit in registers).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

# Shared memory per block (opt-in maximum, bytes) of the targets the gate compiles for.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
DEVICE_NAMES = {80: "A100", 86: "RTX 30xx / A10", 89: "RTX 40xx / L4", 90: "H100 / H200"}
DEFAULT_TARGETS = ("cuda:80", "cuda:90")
# Kernels whose registers must not spill (fp64 accumulators sized per head dimension); the
# autotuned sparse-head gradient kernel may spill in configs its autotuner would not pick.
NO_SPILL_KERNELS = ("_head_gram_kernel", "_centred_cross_kernel")


@dataclass(frozen=True)
class Model:
    """Attention shapes of one model family: what the launchers see for it."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    bias: bool
    fused_qkv: bool = False


MODELS = {
    "minilm-l6": Model(384, 12, 12, 32, bias=True),
    "bert-base": Model(768, 12, 12, 64, bias=True),
    "roberta-large": Model(1024, 16, 16, 64, bias=True),
    "gpt2": Model(768, 12, 12, 64, bias=True, fused_qkv=True),
    "phi-2": Model(2560, 32, 32, 80, bias=True),
    "gemma-2b": Model(2048, 8, 1, 256, bias=False),
    "gemma-7b": Model(3072, 16, 16, 256, bias=False),
    "phi-3-mini": Model(3072, 32, 32, 96, bias=False, fused_qkv=True),
    "llama-3.2-1b": Model(2048, 32, 8, 64, bias=False),
    "llama-3-8b": Model(4096, 32, 8, 128, bias=False),
}
# Precisions the launchers accept: fp32 uses TF32 when PyTorch's matmuls do (allow_tf32).
PRECISIONS = ("float32", "float32-tf32", "float16", "bfloat16")
BATCH, TOKENS = 2, 509  # token count not a multiple of any tile


@dataclass
class Launch:
    """One launcher call: what it was, and what happened."""

    op: str
    model: str
    precision: str
    shape: str
    target: str
    ok: bool = True
    error: str = ""


@dataclass
class Compiled:
    """One compiled kernel variant."""

    kernel: str
    target: str
    dtype: str
    constants: str
    num_warps: int
    num_stages: int
    shared: int
    shared_limit: int
    registers: int = -1
    spill_bytes: int = -1
    launched: bool = True

    @property
    def fits(self) -> bool:
        return self.shared <= self.shared_limit


@dataclass
class Report:
    launches: list[Launch] = field(default_factory=list)
    compiled: list[Compiled] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # e.g. a config benchmarked without fitting

    def failures(self) -> list[str]:
        out = [f"{l.target} {l.op} {l.model} {l.precision} {l.shape}: {l.error}" for l in self.launches if not l.ok]
        out += [f"{c.target} {c.kernel} {c.dtype} {c.constants}: launched with {c.shared} B of shared memory "
                f"> {c.shared_limit}" for c in self.compiled if c.launched and not c.fits]
        out += self.problems
        out += [f"{c.target} {c.kernel} {c.dtype} {c.constants} warps={c.num_warps}: {c.spill_bytes} B of register spills"
                for c in self.compiled if c.kernel in NO_SPILL_KERNELS and c.spill_bytes > 0]
        return out


def resolve_target(text: str) -> tuple[str, int, int]:
    """``(name, arch, shared-memory limit)`` of ``cuda:NN``, or of this machine's GPU for ``native``."""
    if text == "native":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("target 'native': no CUDA device here")
        props = torch.cuda.get_device_properties(0)
        arch = 10 * props.major + props.minor
        return f"cuda:{arch}", arch, props.shared_memory_per_block_optin
    match = re.fullmatch(r"cuda:(\d+)", text)
    if not match or int(match.group(1)) not in SHARED_MEMORY_LIMIT:
        raise ValueError(f"target {text!r}: expected one of {', '.join(f'cuda:{a}' for a in SHARED_MEMORY_LIMIT)} or native")
    arch = int(match.group(1))
    return text, arch, SHARED_MEMORY_LIMIT[arch]


def _install_target_driver(arch: int, limit: int, report: Report) -> set[str]:
    """Make Triton compile for ``cuda:<arch>`` (``limit`` bytes of shared memory per block) and
    launch nothing; returns the set that will hold the hashes of the kernels "launched"."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.backends.nvidia.driver import ty_to_cpp
    from triton.runtime import driver as triton_driver
    from triton.runtime.errors import OutOfResources

    launched: set[str] = set()

    class Launcher:
        def __init__(self, src, metadata):
            self.hash = metadata.hash

        def __call__(self, *args):
            launched.add(self.hash)

    class Utils:
        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": limit, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

        @staticmethod
        def load_binary(name, kernel, shared, device):
            return None, None, 0, 0, 1024  # module, function, registers, spills, max threads

    class TargetDriver(DriverBase):
        """A Triton driver for a GPU that is not here: compiles for ``cuda:<arch>``, launches nothing."""

        utils = Utils()
        launcher_cls = Launcher

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            return ty_to_cpp(ty)

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

        def get_current_device(self):
            return arch  # one kernel cache per target

        def get_current_stream(self, device=None):
            return 0

        def get_benchmarker(self):
            def bench(kernel_call, quantiles=None, **kwargs):
                try:
                    kernel_call()
                except OutOfResources as err:
                    report.problems.append(f"cuda:{arch}: an autotune config reached its benchmark without fitting ({err})")
                    raise
                return [1.0, 1.0, 1.0] if quantiles else 1.0

            return bench

    triton_driver.set_active(TargetDriver())
    return launched


def _workloads(model: Model, precision: str):
    """``(op, shape description, call)`` for every launch this model makes in ``precision``: the
    scoring statistics, the row gradients of Q, all query heads and GQA's K/V (or the fused QKV),
    the column gradients of O for two heads and for one."""
    import torch

    from . import head_cols_grad, head_grams, head_rows_grad

    dtype, n = getattr(torch, precision.split("-")[0]), BATCH * TOKENS
    empty = lambda *shape: torch.empty(*shape, dtype=dtype)  # noqa: E731
    d, heads, kv = model.head_dim, model.heads, model.kv_heads
    blocks = lambda heads_: torch.tensor([h * d for h in heads_])  # noqa: E731
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    mask[1, TOKENS // 3:] = 0
    two = [1, heads - 1]
    kv_two = sorted({h * kv // heads for h in two})
    q_out = heads * d
    if model.fused_qkv:  # one [N, (H + 2 kv) d] output: q heads, then the k and v heads they read
        qkv_out = (heads + 2 * kv) * d
        fused = two + [heads + h for h in kv_two] + [heads + kv + h for h in kv_two]
        rows = [("qkv", qkv_out, fused)]
    else:
        rows = [("q", q_out, two), ("q-all-heads", q_out, list(range(heads))), ("k/v", kv * d, kv_two)]
    yield "head_grams", f"context [{BATCH}, {TOKENS}, {heads}, {d}]", lambda: head_grams(
        empty(BATCH, TOKENS, heads * d).view(BATCH, TOKENS, heads, d), mask)
    for label, d_out, selected in rows:
        yield "head_rows_grad", f"{label}: [{n}, {d_out}] x [{n}, {model.hidden}], {len(selected)} heads", (
            lambda d_out=d_out, selected=selected: head_rows_grad(
                empty(n, d_out), empty(n, model.hidden), blocks(selected), d, model.bias))
    for label, selected in (("o", two), ("o-one-head", [0])):
        yield "head_cols_grad", f"{label}: [{n}, {model.hidden}] x [{n}, {q_out}], {len(selected)} heads", (
            lambda selected=selected: head_cols_grad(empty(n, model.hidden), empty(n, q_out), blocks(selected), d))


def _kernels():
    from .head_statistics import _centred_cross_kernel, _head_gram_kernel
    from .sparse_head_grad import _head_block_grad_kernel

    return {"_head_gram_kernel": _head_gram_kernel, "_centred_cross_kernel": _centred_cross_kernel,
            "_head_block_grad_kernel": _head_block_grad_kernel.fn}


def _register_usage(kernel, arch: int) -> tuple[int, int]:
    """``(registers, spill bytes)`` of a compiled kernel's cubin (Triton's bundled cuobjdump; ptxas
    -v on its PTX only when the cubin has a stack frame, which is where spills live)."""
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = Path(tmp) / "k.cubin", Path(tmp) / "k.ptx"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        registers, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
        if stack == 0:
            return registers, 0
        ptx.write_text(kernel.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        log = subprocess.run([str(tools / "ptxas"), "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", str(ptx),
                              "-o", str(Path(tmp) / "again.cubin")], capture_output=True, text=True, check=True).stderr
    return registers, sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))


def _collect(report: Report, kernels: dict, target: str, arch: int, limit: int, launched: set[str]) -> None:
    """Add every compiled variant of ``kernels`` for ``cuda:<arch>`` to ``report``."""
    variants = [(name, fn, kernel) for name, fn in kernels.items() for kernel in fn.device_caches[arch][0].values()]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # the tools run outside the GIL
        usage = list(pool.map(lambda v: _register_usage(v[2], arch), variants))
    for (name, fn, kernel), (registers, spills) in zip(variants, usage):
        meta = kernel.metadata
        constants = {fn.arg_names[k[0]] if isinstance(k, tuple) else k: v for k, v in kernel.src.constants.items()}
        shown = " ".join(f"{k}={v}" for k, v in sorted(constants.items()) if k.isupper())
        pointer = next(t for t in kernel.src.signature.values() if str(t).startswith("*"))
        report.compiled.append(Compiled(
            name, target, str(pointer).lstrip("*"), shown, meta.num_warps, meta.num_stages, meta.shared, limit,
            registers, spills, launched=meta.hash in launched,
        ))


def run_launches(target: str, launches, kernels: dict) -> Report:
    """Make every call of ``launches`` (``(op, model, precision, shape, call)``) for ``target``
    (``cuda:NN`` or ``native``) under the stand-in driver and report the variants of ``kernels``
    (name -> ``JITFunction``) that they compiled."""
    import torch

    name, arch, limit = resolve_target(target)
    report = Report()
    from .sparse_head_grad import _head_block_grad_kernel

    # A worker process runs several jobs: start from no tuned configs and no in-memory kernels, so
    # this report holds exactly what these launches compile (Triton's disk cache keeps it cheap).
    _head_block_grad_kernel.cache.clear()
    for fn in kernels.values():
        fn.device_caches.pop(arch, None)
    if target == "native" and SHARED_MEMORY_LIMIT.get(arch, limit) != limit:
        report.problems.append(f"{name}: this GPU has {limit} B of shared memory per block, the gate assumes "
                               f"{SHARED_MEMORY_LIMIT[arch]} B for it (SHARED_MEMORY_LIMIT is wrong)")
    launched = _install_target_driver(arch, limit, report)
    for op, model, precision, shape, call in launches:
        torch.backends.cuda.matmul.allow_tf32 = precision.endswith("tf32")
        launch = Launch(op, model, precision, shape, name)
        try:
            call()
        except Exception as err:  # noqa: BLE001 - every failure is reported, the gate goes on
            launch.ok, launch.error = False, f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
        report.launches.append(launch)
    torch.backends.cuda.matmul.allow_tf32 = False
    _collect(report, kernels, name, arch, limit, launched)
    return report


def check_target(target: str, models: tuple[str, ...] = tuple(MODELS), precisions: tuple[str, ...] = PRECISIONS) -> Report:
    """Every launch of hifi_fast's kernels for ``models`` x ``precisions`` on ``target``."""
    launches = [(op, name, precision, shape, call)
                for precision in precisions for name in models
                for op, shape, call in _workloads(MODELS[name], precision)
                if not (op == "head_grams" and precision.endswith("tf32"))]  # the scoring kernels never use TF32
    return run_launches(target, launches, _kernels())


def markdown(report: Report) -> str:
    """The report as markdown: a summary line, one row per kernel configuration (its argument
    specialisations folded: the worst shared memory, registers and spills among them), failures."""
    targets = sorted({launch.target for launch in report.launches})
    ok = sum(launch.ok for launch in report.launches)
    lines = ["# Triton compile gate", "",
             f"{ok}/{len(report.launches)} launcher calls compiled for {', '.join(targets)}; "
             f"{len(report.compiled)} kernel variants; failures: {len(report.failures())}.", "",
             "| kernel | target | dtype | constants | warps | stages | variants | shared B (max) | limit B | fits | "
             "launched | regs (max) | spill B (max) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows: dict[tuple, list[Compiled]] = {}
    for c in report.compiled:
        rows.setdefault((c.kernel, c.target, c.dtype, c.constants, c.num_warps, c.num_stages), []).append(c)
    for key in sorted(rows):
        group = rows[key]
        launched = {c.launched for c in group}
        lines.append(
            "| " + " | ".join(str(k) for k in key) + f" | {len(group)} | {max(c.shared for c in group)} | "
            f"{group[0].shared_limit} | {'yes' if all(c.fits for c in group) else 'NO'} | "
            f"{'yes' if launched == {True} else 'pruned' if launched == {False} else 'some'} | "
            f"{max(c.registers for c in group)} | {max(c.spill_bytes for c in group)} |"
        )
    failures = report.failures()
    if failures:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n"


def _compiled_mode() -> bool:
    from . import head_statistics

    return not type(head_statistics._head_gram_kernel).__name__.startswith("Interpreted")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help="comma-separated cuda:NN targets (80, 86, 89, 90), or 'native' for this machine's GPU")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma-separated subset of {', '.join(PRECISIONS)}")
    parser.add_argument("--json", type=Path, help="write the full report as JSON")
    parser.add_argument("--markdown", type=Path, help="write the report as a markdown table")
    args = parser.parse_args(argv)
    targets, models, precisions = (tuple(x.split(",")) for x in (args.targets, args.models, args.precisions))
    unknown = sorted(set(models) - set(MODELS)) + sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        parser.error(f"unknown model or precision {', '.join(unknown)}")
    for target in targets:
        try:
            resolve_target(target)
        except ValueError as err:
            parser.error(str(err))
    if not _compiled_mode():  # the kernels were defined for the interpreter: start again without it
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        return subprocess.run([sys.executable, "-m", "hifi_fast.kernels.compile_check", *(argv or sys.argv[1:])],
                              env=env).returncode
    # One process per target and precision (compiles are serial within a process); spawned, since a
    # parent that queried its GPU must not fork.
    jobs = [(target, models, (precision,)) for target in targets for precision in precisions]
    with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1), mp_context=get_context("spawn")) as pool:
        reports = list(pool.map(check_target, *zip(*jobs)))
    report = Report([l for r in reports for l in r.launches], [c for r in reports for c in r.compiled],
                    [p for r in reports for p in r.problems])
    text = markdown(report)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"launches": [asdict(l) for l in report.launches],
                                         "compiled": [dict(asdict(c), fits=c.fits) for c in report.compiled],
                                         "failures": report.failures()}, indent=1))
    summary = text.split("\n\n")[1]
    print(summary)
    for failure in report.failures():
        print("FAIL", failure)
    return 1 if report.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
