#!/usr/bin/env bash
# Shared by scripts/demo and scripts/test: make this checkout runnable on a fresh machine.
# Installs the Debian tools the guest kit needs, a virtual environment with pinned Python
# dependencies, and builds the guest kit. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# tool -> Debian package: the guest kit's compiler, the tests' network namespaces (ip) and
# the migration certificate helper (openssl)
need=()
for pair in gcc:gcc make:make ld:binutils objcopy:binutils ip:iproute2 openssl:openssl; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp=.venv/.pyhyve-installed
if [ ! -x .venv/bin/python ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: creating .venv and installing pinned dependencies" >&2
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
# bytecode for our own modules: this environment sets PYTHONDONTWRITEBYTECODE, and
# compiling pyhyve on every start would cost ~20 ms of each VM's start-up
.venv/bin/python -m compileall -q src
make -s -C guests
