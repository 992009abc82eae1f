"""The Slurm boundary: the one place that reads SLURM_* and calls sbatch."""

import os
import re
import socket


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
