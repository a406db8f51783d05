#!/usr/bin/env bash
# The 2-vCPU continuity tests, N times in a row (default 20) with two CPU-bound processes
# running beside them: the check that the kit's console lock is fair on a loaded host.
# Usage: bench/two_vcpu_under_load.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
n=${1:-20}
hogs=()
for _ in 1 2; do
  timeout 3600 sh -c 'while :; do :; done' &
  hogs+=($!)
done
trap 'kill "${hogs[@]}" 2>/dev/null || true' EXIT
tests=(tests/test_snapshot.py::test_hashchain_two_vcpus_continue_exactly
       tests/test_migration.py::test_hashchain_two_vcpus_continue_exactly)
pass=0
for i in $(seq 1 "$n"); do
  if .venv/bin/python -m pytest -q -p no:cacheprovider "${tests[@]}" >/tmp/two-vcpu-$i.log 2>&1; then
    pass=$((pass + 1))
  else
    echo "run $i failed: see /tmp/two-vcpu-$i.log" >&2
  fi
done
echo "two_vcpu_under_load: $pass passed, $((n - pass)) failed"
[ "$pass" -eq "$n" ]
