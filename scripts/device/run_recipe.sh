#!/bin/bash
# A recipe run on the lent GPU machine in one command (< 10 min), then the CUDA checks; see
# scripts/device/README.md. Runs in the repository root there, with .devpack carried.
#   RECIPE (scripts/device/recipe-v1-gpu.json)  LIMIT_S (380: the recipe's wall-clock cap; its
#   stage budgets sum to less)  DEVICE (cuda)  CHECKS (1: the CUDA benchmark and the gpu tests)
# Returns in $OUT: the model in fp16 as 15 MiB parts best.part<i> + best.sha256 (the recipe's export, else the
# best checkpoint of the last stage that has one) and logs.tgz (recipe log, each stage's
# metrics.jsonl, the benchmark's JSON and table, the gpu tests' output, the machine).
set -uo pipefail
: "${OUT:?OUT must be set (the device tool sets it)}"
T0=$(date +%s)
RECIPE=${RECIPE:-scripts/device/recipe-v1-gpu.json}
RUN=${RUN:-/tmp/delightsam-recipe}
DEVICE=${DEVICE:-cuda}
LOGS=/tmp/delightsam-logs
mkdir -p "$LOGS"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .devpack/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1
export DELIGHTSAM_LITEMEDSAM_WEIGHTS="$PWD/.devpack/litemedsam_encoder.safetensors"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; free -g | head -2
  python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"; } > "$LOGS/machine.txt" 2>&1
cat "$LOGS/machine.txt"
python3 scripts/device/unpack.py .devpack/data /tmp/devdata || exit 1
echo "setup: $(( $(date +%s) - T0 )) s"
timeout -s INT -k 30 "${LIMIT_S:-380}" python3 -m napari_delightsam.cli recipe "$RECIPE" --data /tmp/devdata \
    --out "$RUN" --splits .devpack/splits.json --device "$DEVICE" --progress-jsonl > "$LOGS/recipe.jsonl" 2> "$LOGS/recipe.stderr"
echo "recipe exit: $? after $(( $(date +%s) - T0 )) s"
tail -3 "$LOGS/recipe.stderr"
MODEL=""
for f in "$RUN/model.safetensors" "$RUN/fine/best.safetensors" "$RUN/controllers-2/best.safetensors" \
         "$RUN/controllers/best.safetensors" "$RUN/heads/best.safetensors"; do
  if [ -f "$f" ]; then MODEL=$f; break; fi
done
for d in "$RUN"/*/; do [ -f "$d/metrics.jsonl" ] && cp "$d/metrics.jsonl" "$LOGS/metrics-$(basename "$d").jsonl"; done
cp "$RUN/recipe.json" "$RUN/splits.json" "$LOGS/" 2>/dev/null
if [ -n "$MODEL" ]; then
  echo "model: $MODEL"
  python3 scripts/device/ship.py --file "$MODEL" "$OUT"
  if [ "${CHECKS:-1}" = 1 ]; then
    timeout 45 python3 -m napari_delightsam.cli benchmark --device "$DEVICE" --checkpoint "$MODEL" --skip-amg --repeats 10 \
        --skip-litemedsam --no-segment-process --json "$LOGS/benchmark-cuda.json" --markdown > "$LOGS/benchmark-cuda.md" 2>&1
    echo "benchmark exit: $?"; tail -25 "$LOGS/benchmark-cuda.md"
  fi
fi
if [ "${CHECKS:-1}" = 1 ]; then
  timeout 90 python3 -m pytest -q -m gpu -c /dev/null --rootdir . -p no:cacheprovider tests/test_gpu.py > "$LOGS/pytest-gpu.txt" 2>&1
  echo "gpu tests exit: $?"; tail -5 "$LOGS/pytest-gpu.txt"
fi
tar -czf "$OUT/logs.tgz" -C "$LOGS" .
echo "total: $(( $(date +%s) - T0 )) s"; ls -la "$OUT"
