#!/usr/bin/env bash
# The whole test suite, as the README's second command and CI run it: ruff and mypy (a finding
# fails), pytest (unit, real model, server, notebooks via nbval, JupyterLab in Chromium), then
# the JavaScript SDK's tests against a real server. Fails if any part fails; pytest's "no tests
# collected" (exit 5) counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
# Lint and types (STYLE.md: "ruff and mypy clean"). The versions are pinned so that a new
# release's new rules cannot fail an unchanged tree.
python -m pip install -q "ruff==0.17.6" "mypy==2.4.1"
python -m ruff check realm_nb tests benchmarks
python -m mypy realm_nb tests
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test: pytest collected no tests: that is a failure here" >&2
  rc=1
fi
set +e
if command -v node >/dev/null && command -v npm >/dev/null; then
  (cd js && npm test)
  js_rc=$?
else
  echo "test: no Node >= 18 with npm, so the JavaScript SDK's tests cannot run: a failure" >&2
  js_rc=1
fi
set -e
if [ "$rc" -ne 0 ]; then
  exit "$rc"
fi
exit "$js_rc"
