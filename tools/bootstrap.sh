#!/usr/bin/env bash
# Make (or reuse) trustgrad's virtual environment and print its python's path on stdout.
#
# The environment lives outside the clone, in a cache folder keyed by a hash of requirements.txt and the Python
# version, so fresh clones (CI) reuse it instead of reinstalling ~5 GB, and a change of pins makes a new one while the
# stale ones are removed (the disk does not fill up). The clone's .venv sees its packages (see below).
#
# Python: the newest on which `import openfhe` works. OpenFHE ships wheels for CPython 3.12 (glibc >= 2.38) and 3.10
# (glibc >= 2.35); TRUSTGRAD_PYTHON overrides the choice.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${TRUSTGRAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/trustgrad}"
log() { echo "[bootstrap] $*" >&2; }

glibc_at_least() {  # glibc_at_least 2 38
  local v; v=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}'); v=${v:-0.0}
  local major=${v%.*} minor=${v#*.}
  (( major > $1 || (major == $1 && minor >= $2) ))
}

find_python() {
  if [[ -n "${TRUSTGRAD_PYTHON:-}" ]]; then echo "$TRUSTGRAD_PYTHON"; return; fi
  local candidates=()
  glibc_at_least 2 38 && candidates+=(3.12)
  candidates+=(3.10)
  for ver in "${candidates[@]}"; do
    # pyenv's own interpreters first (they need no PYENV_VERSION), then whatever is on PATH.
    for exe in $(ls -d "$HOME"/.pyenv/versions/"$ver".*/bin/python"$ver" 2>/dev/null | sort -V -r) "python$ver"; do
      if "$exe" -c 'import venv' >/dev/null 2>&1; then echo "$exe"; return; fi
    done
  done
  log "no Python 3.10 or 3.12 found (OpenFHE publishes wheels only for those); set TRUSTGRAD_PYTHON"
  exit 2
}

py=$(find_python)
pyver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
key=$( (cat requirements.txt; echo "$pyver") | sha256sum | cut -c1-12)
venv="$cache/venv-py$pyver-$key"

if [[ ! -f "$venv/.complete" ]]; then
  log "creating $venv (Python $pyver; first time only, downloads about 5 GB)"
  rm -rf "$venv"
  mkdir -p "$cache"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet -r requirements.txt >&2
  "$venv/bin/python" -c 'import openfhe, torch' || { log "the environment does not import openfhe and torch"; exit 1; }
  touch "$venv/.complete"
  for old in "$cache"/venv-*; do  # stale pins: free the disk
    [[ "$old" != "$venv" ]] && { log "removing stale $old"; rm -rf "$old"; }
  done
fi
# The clone's own environment: .venv, a small venv of its own that sees the shared one's packages (a .pth line) and
# holds an editable install of this clone (seconds). The shared environment never holds trustgrad itself, so clones
# that share it cannot repoint each other's `trustgrad` (an editable install there follows whichever clone ran last).
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if compgen -G "$site/__editable__.trustgrad-*" >/dev/null; then  # put there by an older bootstrap
  "$venv/bin/python" -m pip uninstall --quiet --yes trustgrad >&2
fi
here=$(pwd -P)
if [[ "$(cat .venv/.shared 2>/dev/null)" != "$venv" ]] || ! (cd / && "$here/.venv/bin/python" -c "import sys, trustgrad, pathlib; sys.exit(str(pathlib.Path(trustgrad.__file__).resolve().parent) != '$here/trustgrad')") 2>/dev/null; then
  log "making .venv (on the packages of $venv) and installing this clone into it"
  rm -rf .venv
  "$py" -m venv --without-pip .venv
  own=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "import site; site.addsitedir('$site')" >"$own/trustgrad-shared.pth"
  # setuptools warns about every editable install; show pip's output only when it fails
  if ! out=$(.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1); then
    echo "$out" >&2
    log "installing this clone into .venv failed"
    exit 1
  fi
  echo "$venv" >.venv/.shared
fi
echo "$here/.venv/bin/python"
