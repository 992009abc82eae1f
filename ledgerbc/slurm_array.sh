#!/usr/bin/env bash
# One ledgerbc worker per Slurm array task (DESIGN §6):
#
#     sbatch --array=0-N slurm_array.sh LEDGER [ledgerbc run options]
#
# (`ledgerbc submit --tasks N+1` builds this call.) Options given to sbatch on its command line
# override the defaults below, e.g. `--gpus-per-task=0` on a cluster without GPUs. Each task is one
# worker with one GPU: Slurm refuses `--gpus-per-task` without `--ntasks`, and sets the task's
# CUDA_VISIBLE_DEVICES to the GPU it got.
#
# Environment:
#   LEDGERBC_EXE   the ledgerbc executable to run (default: `ledgerbc` on PATH)
#
# The job needs the environment the ledgerbc and dorado executables live in: sbatch passes the
# submitting shell's environment on by default (--export=ALL).
#SBATCH --job-name=ledgerbc
#SBATCH --ntasks=1
#SBATCH --gpus-per-task=1
#SBATCH --signal=B:TERM@300
#SBATCH --output=ledgerbc-%A_%a.out
set -euo pipefail

if [[ $# -lt 1 || -z $1 ]]; then
    echo "Error: no ledger given. Submit with: sbatch --array=0-N slurm_array.sh LEDGER [run options]" >&2
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

# dorado uses the GPU(s) Slurm gave this task (Slurm sets CUDA_VISIBLE_DEVICES), unless the user
# chose a device (run option or LEDGERBC_DEVICE).
device_given=${LEDGERBC_DEVICE:+yes}
for arg in "$@"; do
    case $arg in
        --device | --device=*) device_given=yes ;;
    esac
done
if [[ -z $device_given ]]; then
    set -- --device cuda:all "$@"
fi

# exec: the Python worker replaces this shell, so Slurm's --signal=B:TERM (time limit) and scancel's
# SIGTERM reach it directly; it releases its batch and exits.
exec "$exe" run "$@"
