#!/usr/bin/env bash
# Set up the virtualenv with the test extra and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# The demo page's browser test drives Debian's Chromium (never a downloaded browser); it skips, saying so, without it.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "scripts/test.sh: could not install chromium; the browser test will be skipped" >&2
fi
export RNR_DATA="${RNR_DATA:-$(cd .. && pwd)/shared/data}"
set +e
# Two workers, each taking whole files (module fixtures are built once); pass -n 0 to run in one process.
.venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
rc=$?
set -e
# pytest exit code 5 = no tests collected (e.g. a -k filter matching nothing): not a failure.
if [[ $rc -eq 5 ]]; then rc=0; fi
exit $rc
