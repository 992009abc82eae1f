"""The Slurm boundary: the one place that reads SLURM_* and calls sbatch.

`ledgerbc submit` runs `sbatch --parsable --array=0-<N-1> [options] slurm_array.sh LEDGER [run args]`:
an argv list built from `--flag=value` items (never a shell string), so any ledger path or option
value reaches sbatch as exactly one argument.
"""

import os
import re
import socket
import subprocess
from importlib import resources
from pathlib import Path

from .errors import BadInput, LedgerNotFound, SlurmError

SBATCH_TIMEOUT = 120  # seconds; sbatch hangs while slurmctld is unreachable


def hostname() -> str:
    return socket.gethostname().split(".")[0]


def default_worker_id(environ=None) -> str:
    """`<array job>_<task>@<host>` in an array task, `<job>@<host>` in a job, `<pid>@<host>` elsewhere."""
    env = os.environ if environ is None else environ
    host = hostname()
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        ident = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    elif env.get("SLURM_JOB_ID"):
        ident = env["SLURM_JOB_ID"]
    else:
        ident = str(os.getpid())
    return re.sub(r"[^A-Za-z0-9._@:+-]", "_", f"{ident}@{host}")


def array_script() -> Path:
    """The installed `slurm_array.sh` (sbatch copies it at submission: it need not be on shared storage)."""
    return Path(str(resources.files("ledgerbc") / "slurm_array.sh"))


def finalize_script() -> Path:
    """The installed `slurm_finalize.sh`: the finalize job `submit --finalize` chains after the array."""
    return Path(str(resources.files("ledgerbc") / "slurm_finalize.sh"))


def build_sbatch_argv(ledger, tasks: int, partition=None, time=None, gpus_per_task: int = 1, account=None,
                      cpus_per_task=None, mem=None, extra=(), run_args=()) -> list[str]:
    """The sbatch argv for an array of `tasks` workers on `ledger`; `extra` goes before the script
    (sbatch options), `run_args` after the ledger (`ledgerbc run` options).

    Each task is one worker: `--ntasks=1 --gpus-per-task=G` (Slurm refuses `--gpus-per-task` without
    `--ntasks`). `gpus_per_task=0` asks for no GPU (it overrides the script's `--gpus-per-task=1`)."""
    if tasks < 1:
        raise BadInput(f"--tasks must be at least 1, not {tasks}.")
    if gpus_per_task < 0:
        raise BadInput(f"--gpus-per-task must be 0 or more, not {gpus_per_task}.")
    if cpus_per_task is not None and cpus_per_task < 1:
        raise BadInput(f"--cpus-per-task must be at least 1, not {cpus_per_task}.")
    argv = ["sbatch", "--parsable", f"--array=0-{tasks - 1}"]
    for flag, value in (("--partition", partition), ("--time", time), ("--ntasks", 1), ("--gpus-per-task", gpus_per_task),
                        ("--account", account), ("--cpus-per-task", cpus_per_task), ("--mem", mem)):
        if value is not None and value != "":
            argv.append(f"{flag}={value}")
    argv += [str(a) for a in extra]
    argv += [str(array_script()), str(Path(ledger).absolute()), *[str(a) for a in run_args]]
    return argv


def build_finalize_argv(ledger, after_job: str, partition=None, account=None, extra=()) -> list[str]:
    """The sbatch argv of the finalize job: it starts when every task of `after_job` has ended
    (`afterany`: whatever their exit status), asks for no GPU, and runs `ledgerbc finalize`."""
    if not re.fullmatch(r"\d+", str(after_job)):
        raise BadInput(f"not a Slurm job id: {after_job!r}.")
    argv = ["sbatch", "--parsable", f"--dependency=afterany:{after_job}"]
    for flag, value in (("--partition", partition), ("--account", account)):
        if value is not None and value != "":
            argv.append(f"{flag}={value}")
    argv += [str(a) for a in extra]
    argv += [str(finalize_script()), str(Path(ledger).absolute())]
    return argv


def run_sbatch(argv: list[str], timeout: float = SBATCH_TIMEOUT) -> str:
    """Run an sbatch argv built with `--parsable`; return the job id (its output is `jobid[;cluster]`)."""
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(
            f"{argv[0]} not found on PATH. Run `ledgerbc submit` on a Slurm login node (or load the Slurm module)."
        ) from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{argv[0]} did not answer within {timeout:.0f}s. Check the cluster with `sinfo`, then retry.") from None
    if proc.returncode != 0:
        said = next((line.strip() for line in proc.stderr.splitlines() if line.strip()), "no message")
        if _asks_for_gpus(argv) and _GRES_REFUSED.search(proc.stderr):
            raise SlurmError(f"sbatch failed (exit status {proc.returncode}): {said}. This cluster (or partition) "
                             "offers no GPUs as generic resources: submit with `--gpus-per-task 0`, or pick a GPU "
                             "partition with `--partition`.")
        raise SlurmError(f"sbatch failed (exit status {proc.returncode}): {said}. Fix the sbatch options and resubmit.")
    job_id = proc.stdout.strip().split(";", 1)[0]
    if not re.fullmatch(r"\d+", job_id):
        raise SlurmError(f"sbatch printed {proc.stdout.strip()[:200]!r}, not a job id. Check `squeue --me` before resubmitting.")
    return job_id


# What sbatch says when a job asks for a GPU on a cluster whose slurm.conf has no `GresTypes=gpu`
# (Slurm 22.05: "Invalid generic resource (gres) specification").
_GRES_REFUSED = re.compile(r"generic resource|\bgres\b", re.IGNORECASE)


def _asks_for_gpus(argv: list[str]) -> bool:
    """Whether the argv's last `--gpus-per-task` (sbatch takes the last one) asks for any GPU."""
    asked = [a.split("=", 1)[1] for a in argv if a.startswith("--gpus-per-task=")]
    return bool(asked) and asked[-1].strip() not in ("0", "")


def submit(ledger, tasks: int, partition=None, time=None, gpus_per_task: int = 1, account=None,
           cpus_per_task=None, mem=None, extra=(), run_args=()) -> str:
    """Submit an array of `tasks` workers on `ledger`; return the array job id.

    Refuses a missing ledger and one on a known-unsafe mount before anything reaches the queue.
    """
    path = Path(ledger).absolute()
    if not path.is_file():
        raise LedgerNotFound(f"no ledger at {path}. Create it with `ledgerbc init`, or give the right --ledger.")
    from .mounts import refuse_unsafe_mount

    refuse_unsafe_mount(path.parent)
    argv = build_sbatch_argv(path, tasks, partition=partition, time=time, gpus_per_task=gpus_per_task,
                             account=account, cpus_per_task=cpus_per_task, mem=mem, extra=extra, run_args=run_args)
    return run_sbatch(argv)


def submit_finalize(ledger, after_job: str, partition=None, account=None, extra=()) -> str:
    """Submit the finalize job after the array job `after_job`; return its job id."""
    return run_sbatch(build_finalize_argv(ledger, after_job, partition=partition, account=account, extra=extra))
