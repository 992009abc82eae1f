#!/usr/bin/env bash
# The finalize job (DESIGN §3, §7): per-sample products, sequencing_summary.txt and report.html.
#
#     sbatch --dependency=afterany:<array job id> slurm_finalize.sh LEDGER [finalize options]
#
# (`ledgerbc submit --finalize` builds this call after the array's.) It needs no GPU: finalize only
# concatenates published outputs (I/O-bound). `afterany`: it starts once every array task has ended,
# whatever their exit status; if files are still unfinished then (tasks died with work left), finalize
# refuses with exit 12 and says how to go on (`ledgerbc finalize --partial`, or resubmit the workers).
#
# Environment:
#   LEDGERBC_EXE   the ledgerbc executable to run (default: `ledgerbc` on PATH)
#
# The checks below repeat slurm_array.sh's on purpose: sbatch copies only the script it is given to the
# node, so each script must stand alone.
#SBATCH --job-name=ledgerbc-finalize
#SBATCH --ntasks=1
#SBATCH --output=ledgerbc-finalize-%j.out
set -euo pipefail

if [[ $# -lt 1 || -z $1 ]]; then
    echo "Error: no ledger given. Submit with: sbatch slurm_finalize.sh LEDGER [finalize options]" >&2
    exit 4  # as `ledgerbc` itself without a ledger
fi
export LEDGERBC_LEDGER=$1
shift

exe=${LEDGERBC_EXE:-ledgerbc}
if ! command -v -- "$exe" >/dev/null 2>&1; then
    echo "Error: the ledgerbc executable '$exe' was not found on this node. Activate its environment" \
        "before sbatch, or set LEDGERBC_EXE to its full path." >&2
    exit 3
fi

exec "$exe" finalize "$@"
