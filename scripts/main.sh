#!/usr/bin/env bash
# Set up the virtualenv and run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RNR_DATA="${RNR_DATA:-$(cd .. && pwd)/shared/data}"
exec .venv/bin/python -m infer.quickstart --data_dir "$RNR_DATA" "$@"
