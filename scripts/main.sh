#!/usr/bin/env bash
# Set up the virtualenv and run the main job: the mini pipeline (data -> teacher -> filter -> student -> KD ->
# iterative finetuning -> compressed bundle -> report) on the shared data, in runs/mini (resumes if interrupted).
# Extra arguments go to train.pipeline (e.g. --config configs/smoke.py for a minutes-long run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RNR_DATA="${RNR_DATA:-$(cd .. && pwd)/shared/data}"
exec .venv/bin/python -m train.pipeline --config configs/mini.py --workdir "${RNR_WORKDIR:-runs/mini}" \
  --data_dir "$RNR_DATA" "$@"
