#!/usr/bin/env bash
# Set up the virtualenv with the test extra and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export RNR_DATA="${RNR_DATA:-$(cd .. && pwd)/shared/data}"
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
# pytest exit code 5 = no tests collected (e.g. a -k filter matching nothing): not a failure.
if [[ $rc -eq 5 ]]; then rc=0; fi
exit $rc
