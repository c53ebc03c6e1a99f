#!/usr/bin/env bash
# GPU check for Glass Box LLM: the benchmark, a short pre-training run with its snapshots, and the
# GPU-marked tests, on CUDA, in under 5 minutes. Prints the figures; exits non-zero if a step fails.
#
#     scripts/gpu_check.sh            # from the repository root (python3 with a CUDA torch on PATH)
#     PYTHON=.venv/bin/python scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export GLASSBOX_CHECKPOINTS_DIR="$work/checkpoints" GLASSBOX_DOWNLOADS_DIR="$work/data"
out=${OUT:-$work}

"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: this check is for a GPU machine"
print(f"torch {torch.__version__} · {torch.cuda.get_device_name(0)} · bf16 {torch.cuda.is_bf16_supported()}")
PY

echo "== 1. bench (matmul, tiny, small, fast_vs_teaching, kv_cache, history) =="
timeout 180 "$PY" -m core bench --device cuda --only matmul,tiny,small,fast_vs_teaching,kv_cache,history \
    | tail -n 1 > "$out/bench.json"

echo "== 2. pre-training: small preset, 300 steps on python-docs characters (always on the machine) =="
timeout 120 "$PY" -m core pretrain --data python-docs --tokenizer char --preset small --steps 300 \
    --eval-every 100 --run-id gpu-check --device cuda | tail -n 1 > "$out/pretrain.json"
"$PY" -m core snapshots --run gpu-check | tail -n 1 > "$out/snapshots.json" || \
    echo '{"note": "snapshots command not registered in core/__main__.py"}' > "$out/snapshots.json"

echo "== 3. GPU-marked tests =="
timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_health.py tests/test_device.py \
    2>&1 | tee "$out/pytest.txt" | tail -n 5

echo "== figures =="
"$PY" - "$out" "$GLASSBOX_CHECKPOINTS_DIR" <<'PY'
import json, sys
from pathlib import Path
out, ck = Path(sys.argv[1]), Path(sys.argv[2])
bench = json.loads((out / "bench.json").read_text())
for key in ("matmul_gflops", "tokens_per_s_tiny", "mfu_tiny", "tokens_per_s_small", "mfu_small", "fast_vs_teaching",
            "kv_cache_speedup", "history_redraw_small_s", "history_redraw_base_s"):
    print(f"  {key:<24} {bench.get(key)}")
run = json.loads((out / "pretrain.json").read_text())
for key in ("steps", "train_loss", "val_loss", "tokens_per_s", "seconds"):
    print(f"  pretrain {key:<15} {run.get(key)}")
config = json.loads((ck / "gpu-check" / "config.json").read_text())
print(f"  device check             {config.get('device_check')}")
print(f"  snapshots                {(out / 'snapshots.json').read_text().strip()}")
PY
