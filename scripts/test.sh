#!/usr/bin/env bash
# The whole test suite, as the README's second command and CI run it: ruff and mypy (a finding
# fails), pytest (unit, real model, server, notebooks via nbval, JupyterLab in Chromium), then
# the JavaScript SDK's tests against a real server. Fails if any part fails; pytest's "no tests
# collected" (exit 5) counts as a failure. It runs in the environment scripts/setup.sh installed
# into (scripts/env.sh: the active virtual environment, else .venv/, else the Python on PATH).
#
# Without Chromium (/usr/bin/chromium) pytest skips the browser tests and says why; without Node
# it skips the JavaScript SDK's tests and says so. With REALM_NB_REQUIRE_ALL=1 (.ci/run sets it)
# either one missing is a failure instead: CI never skips them.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
realm_use_env
strict="${REALM_NB_REQUIRE_ALL:-0}"
missing=()
if ! [ -x /usr/bin/chromium ]; then
  missing+=("Chromium (/usr/bin/chromium) for the browser tests; as root: apt-get install chromium")
fi
if ! python -c 'import playwright.sync_api' 2>/dev/null; then
  missing+=("the playwright package for the browser tests; run scripts/setup.sh")
fi
if ! realm_node_ok; then
  missing+=("Node >= 18 with npm for the JavaScript SDK's tests; as root: apt-get install nodejs npm")
fi
for item in "${missing[@]}"; do
  if [ "$strict" = 1 ]; then
    echo "test: missing $item (REALM_NB_REQUIRE_ALL=1: nothing may be skipped)" >&2
  else
    echo "test: missing $item: those tests are skipped" >&2
  fi
done
if [ "$strict" = 1 ] && [ "${#missing[@]}" -gt 0 ]; then
  exit 1
fi
# Lint and types (STYLE.md: "ruff and mypy clean"). The versions are pinned so that a new
# release's new rules cannot fail an unchanged tree.
python -m pip install -q "ruff==0.17.6" "mypy==2.4.1"
python -m ruff check realm_nb tests benchmarks
python -m mypy realm_nb tests
set +e
python -m pytest -rs "$@"  # -rs: every skipped test is listed with its reason
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test: pytest collected no tests: that is a failure here" >&2
  rc=1
fi
js_rc=0
if realm_node_ok; then
  set +e
  (cd js && npm test)
  js_rc=$?
  set -e
else
  echo "test: skipped the JavaScript SDK's tests (js/): no Node >= 18 with npm here" >&2
fi
if [ "$rc" -ne 0 ]; then
  exit "$rc"
fi
exit "$js_rc"
