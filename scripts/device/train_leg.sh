#!/bin/bash
# One GPU training leg (< 10 min) on the device machine; see scripts/device/README.md.
# Runs in the repository root there, with .devpack carried. The run folder lives in /tmp and
# survives between legs while the machine stays warm; each leg resumes it.
#   LEG_S (default 500) seconds of training, then a clean stop (SIGINT: finish the step, validate, save)
#   IMG (1024) BATCH (16) LR (4e-4) STEPS (100 per epoch) EPOCHS (200) WORKERS (12)
set -uo pipefail
: "${OUT:?OUT must be set (the device tool sets it)}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .devpack/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1
export DELIGHTSAM_LITEMEDSAM_WEIGHTS="$PWD/.devpack/litemedsam_encoder.safetensors"
RUN=${RUN:-/tmp/delightsam-run}
DEVICE=${DEVICE:-cuda}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
cat > /tmp/leg_cfg.json <<JSON
{"save_init": false, "log_every": 20, "amp": true}
JSON
ARGS=(--data .devpack/data --out "$RUN" --config /tmp/leg_cfg.json --img-size "${IMG:-1024}"
      --epochs "${EPOCHS:-200}" --steps-per-epoch "${STEPS:-100}" --batch-size "${BATCH:-16}"
      --lr "${LR:-4e-4}" --num-workers "${WORKERS:-12}" --device "$DEVICE" --val-max-per-dataset 30
      --progress-jsonl)
if [ -f "$RUN/run.json" ]; then
  ARGS+=(--resume)
else
  ARGS+=(--init "${INIT:-litemedsam}" --splits .devpack/splits.json)
fi
timeout -s INT -k 60 "${LEG_S:-500}" python3 -m napari_delightsam.cli train "${ARGS[@]}" > "$OUT/leg.jsonl" 2> /tmp/leg.stderr
echo "train exit: $?"
tail -5 /tmp/leg.stderr
python3 scripts/device/ship.py "$RUN" "$OUT"
