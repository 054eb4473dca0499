# Sourced (not run) by scripts/setup.sh, scripts/test.sh and .ci/run: puts the Python environment
# that realm-nb is installed in first on PATH, so that `python`, `realm-nb` and `jupyter` are its
# own. The environment is, in this order:
#   1. the virtual environment already active ($VIRTUAL_ENV);
#   2. the repository's .venv/, which scripts/setup.sh makes where the interpreter on PATH cannot
#      take packages (an externally managed Python, PEP 668, as on current Debian and Ubuntu; or
#      one whose site-packages this user may not write);
#   3. the interpreter on PATH (`python`, else `python3`), as CI's root machine has.
# It also defines realm_node_ok, the one test of "Node >= 18 with npm" that both scripts use.

REALM_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REALM_VENV="$REALM_REPO/.venv"

# The interpreter on PATH, by command name: `python` where there is one, else `python3`.
realm_base_python() {
  if command -v python >/dev/null 2>&1; then echo python
  elif command -v python3 >/dev/null 2>&1; then echo python3
  else return 1
  fi
}

# Exit status 0 when "$1 -m pip install" may write into that interpreter itself; otherwise prints
# why not (one line) and fails. An active virtual environment is always fine.
realm_can_install_into() {
  "$1" - <<'EOF'
import os
import sys
import sysconfig

if sys.prefix != sys.base_prefix:
    sys.exit(0)
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
if os.path.exists(marker):
    print(f"{sys.executable} is externally managed (PEP 668: {marker})")
    sys.exit(1)
for key in ("purelib", "platlib", "scripts"):
    path = sysconfig.get_path(key)
    if not os.access(path, os.W_OK):
        print(f"{sys.executable} cannot be installed into by this user ({path} is not writable)")
        sys.exit(1)
EOF
}

# Make $1 (a virtual environment's folder) the active environment of this shell.
realm_activate() {
  export VIRTUAL_ENV="$1"
  export PATH="$1/bin:$PATH"
  unset PYTHONHOME
  hash -r
}

realm_use_env() {
  if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$REALM_VENV/bin/python" ]; then
    realm_activate "$REALM_VENV"
  fi
  if ! command -v python >/dev/null 2>&1 && command -v python3 >/dev/null 2>&1; then
    python() { python3 "$@"; }  # a system with only python3 that can take packages
  fi
}

realm_node_ok() {  # Node >= 18 and npm, what js/ needs
  command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 &&
    node -e 'process.exit(+process.versions.node.split(".")[0] >= 18 ? 0 : 1)' 2>/dev/null
}
