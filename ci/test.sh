#!/usr/bin/env bash
# The whole test suite, as CI runs it (`.ci/run` execs this) and as the README tells developers to.
#   - a venv with ledgerbc installed from this checkout (a real install, as on compute nodes);
#   - as root: a real single-node Slurm and a GlusterFS volume mounted twice (ci/cluster-up.sh),
#     torn down on exit; elsewhere, or with LEDGERBC_CI_NO_CLUSTER=1, integration tests skip;
#   - pytest over tests/ (unit, CLI, multi-process, end-to-end, integration).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(realpath -m "${LEDGERBC_VENV:-.venv}")

python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check '.[test]'
# The installed copy (what a worker on a compute node runs) must carry its migrations and batch script.
(cd / && "$VENV/bin/python" -c '
import ledgerbc, pathlib
root = pathlib.Path(ledgerbc.__file__).parent
for needed in ("migrations/env.py", "migrations/versions/0001_baseline.py", "slurm_array.sh"):
    assert (root / needed).exists(), f"installed package lacks {needed}"
print("installed package ok:", root)')

cleanup() { [ "${CLUSTER_UP:-0}" = 1 ] && bash ci/cluster-down.sh || true; }
trap cleanup EXIT
if [ "$(id -u)" = 0 ] && [ "${LEDGERBC_CI_NO_CLUSTER:-0}" != 1 ]; then
  if bash ci/cluster-up.sh; then
    CLUSTER_UP=1
    set -a; . /run/ledgerbc-ci/env; set +a
  elif [ "${CI:-}" = true ]; then
    echo "ci/test.sh: cluster bring-up failed; CI must run the integration tests" >&2
    exit 1
  else
    echo "ci/test.sh: cluster bring-up failed; integration tests will skip" >&2
  fi
fi
# In CI the integration tests must run, not skip (tests/integration/conftest.py honours this).
# CI also runs the fresh-venv install test (`pip install .` into a new venv, then init on real data).
if [ "${CI:-}" = true ]; then export LEDGERBC_REQUIRE_INTEGRATION=1 LEDGERBC_TEST_FRESH_VENV=1; fi
export PATH="$VENV/bin:$PATH"
"$VENV/bin/python" -m pytest -q -ra "$@"
