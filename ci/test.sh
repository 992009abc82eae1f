#!/usr/bin/env bash
# The whole test suite, as CI runs it (`.ci/run` execs this) and as the README tells developers to.
#   - a venv with ledgerbc installed from this checkout (a real install, as on compute nodes);
#   - as root: a real single-node Slurm and a GlusterFS volume mounted twice (ci/cluster-up.sh),
#     torn down on exit; elsewhere, or with LEDGERBC_CI_NO_CLUSTER=1, integration tests skip;
#   - the real clients of the outputs (tests/clients.py): Debian's chromium and samtools (installed as
#     root when missing), playwright (a test extra; it never downloads a browser), pycoQC and NanoPlot
#     each in its own venv under .venv-qc/ (pinned in ci/qc/; reused while the pins are unchanged);
#   - pytest over tests/ (unit, CLI, multi-process, end-to-end, integration, real clients).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(realpath -m "${LEDGERBC_VENV:-.venv}")
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
step_t0=$(date +%s.%N)
took() {  # took WHAT: print the seconds since the last call
    local now; now=$(date +%s.%N)
    awk -v a="$step_t0" -v b="$now" -v w="$1" 'BEGIN{printf "ci/test.sh: %s in %.1fs\n", w, b-a}'
    step_t0=$now
}

# Debian packages of the real clients (CI runs as root, with network to package registries only).
client_debs=(chromium samtools)
missing_debs=()
for p in "${client_debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing_debs+=("$p")
done
if ((${#missing_debs[@]})); then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null && export LEDGERBC_APT_UPDATED=1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 \
      "${missing_debs[@]}" >/dev/null \
      || { echo "ci/test.sh: apt-get install ${missing_debs[*]} failed" >&2; [ "${CI:-}" != true ] || exit 1; }
    took "apt-get install ${missing_debs[*]}"
  else
    echo "ci/test.sh: ${missing_debs[*]} missing and not root: tests of those clients will skip" >&2
  fi
fi

python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check '.[test]'
took "venv with ledgerbc[test]"
# pycoQC and NanoPlot, each in its own venv (tests/clients.py; a failure here fails their tests in CI).
"$VENV/bin/python" tests/clients.py install || [ "${CI:-}" != true ] || exit 1
took "QC client venvs"
# The installed copy (what a worker on a compute node runs) must carry its migrations and batch script.
(cd / && "$VENV/bin/python" -c '
import ledgerbc, pathlib
root = pathlib.Path(ledgerbc.__file__).parent
for needed in ("migrations/env.py", "migrations/versions/0001_baseline.py", "slurm_array.sh"):
    assert (root / needed).exists(), f"installed package lacks {needed}"
print("installed package ok:", root)')

cleanup() { [ "${CLUSTER_UP:-0}" = 1 ] && bash ci/cluster-down.sh || true; }
step_t0=$(date +%s.%N)
trap cleanup EXIT
if [ "$(id -u)" = 0 ] && [ "${LEDGERBC_CI_NO_CLUSTER:-0}" != 1 ]; then
  if bash ci/cluster-up.sh; then
    CLUSTER_UP=1
    took "cluster-up"
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
# CI is repeatable: the random-history test runs its fixed seeds only (new seeds are for developers' runs and the
# soak, bench/history_soak.py, whose finds become fixed seeds and named tests in tests/test_history.py).
if [ "${CI:-}" = true ]; then
  export LEDGERBC_REQUIRE_INTEGRATION=1 LEDGERBC_TEST_FRESH_VENV=1 LEDGERBC_TEST_RANDOM_HISTORIES=0
fi
export PATH="$VENV/bin:$PATH"
"$VENV/bin/python" -m pytest -q -ra --durations=25 "$@"
