#!/usr/bin/env bash
# Run every benchmark in bench/ (each `*.py` not starting with `_`), one after the other.
#   bash bench/run_all.sh              # with .venv/bin/python, else python3
#   PYTHON=/path/to/python bash bench/run_all.sh
# Benchmarks print their own tables; this stops at the first one that fails.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif [ -x "$root/.venv/bin/python" ]; then
    py=$root/.venv/bin/python
else
    py=python3
fi
status=0
for script in "$here"/*.py; do
    name=$(basename "$script")
    case $name in _*) continue ;; esac
    echo "=== $name ($(date -u +%H:%M:%S) UTC) ==="
    start=$(date +%s)
    "$py" "$script" || { status=$?; echo "=== $name FAILED (exit $status)" >&2; exit "$status"; }
    echo "=== $name done in $(( $(date +%s) - start )) s"
    echo
done
exit "$status"
