"""Fixtures for tests against the real Slurm and GlusterFS that ci/cluster-up.sh brings up.

What is up comes from the environment or, when absent there, from /run/ledgerbc-ci/env (written by
cluster-up.sh): LEDGERBC_TEST_SLURM=1, LEDGERBC_TEST_GLUSTER_A/B=<two mounts of one volume>. Missing
parts skip their tests with the reason; with LEDGERBC_REQUIRE_INTEGRATION=1 (CI) they fail instead.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from helpers import wait_for  # noqa: F401  (tests/ is on sys.path: re-exported for the integration tests)
from ledgerbc.testkit import install_fake_dorado

ENV_FILE = Path("/run/ledgerbc-ci/env")
JOBCOMP_LOG = Path(os.environ.get("LEDGERBC_TEST_JOBCOMP", "/var/log/slurm/jobcomp.log"))
# jobcomp states of a task that will run again (`scontrol requeue` writes PENDING, then the next run's end)
NOT_FINAL = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RUNNING", "SUSPENDED", "RESIZING"}


def ci_env() -> dict[str, str]:
    """LEDGERBC_TEST_* from the environment, completed from /run/ledgerbc-ci/env."""
    found = {}
    if ENV_FILE.is_file():
        for line in ENV_FILE.read_text().splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and key.startswith("LEDGERBC_TEST_"):
                found[key] = value
    found.update({k: v for k, v in os.environ.items() if k.startswith("LEDGERBC_TEST_") and v})
    return found


def unavailable(reason: str):
    if os.environ.get("LEDGERBC_REQUIRE_INTEGRATION") == "1":
        pytest.fail(f"integration tests are required here (LEDGERBC_REQUIRE_INTEGRATION=1) but {reason}")
    pytest.skip(reason)


def ledgerbc_exe() -> str:
    """The `ledgerbc` console script of this interpreter's environment (what Slurm tasks run)."""
    script = Path(sys.executable).with_name("ledgerbc")
    if not script.exists():
        pytest.fail(f"no ledgerbc console script beside {sys.executable}: install the package (pip install -e .)")
    return str(script)


def job_env(bin_dir: Path, **extra) -> dict[str, str]:
    """The environment of `ledgerbc` commands and, through sbatch's default --export=ALL, of the tasks:
    no LEDGERBC_* from the developer's shell, the stand-in dorado first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGERBC_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cli(*args, env, cwd=None, timeout=300, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([ledgerbc_exe(), *[str(a) for a in args]], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"ledgerbc {args[0]} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


class Slurm:
    """The real cluster: submit through `ledgerbc submit`, read task ends from jobcomp.log."""

    def __init__(self):
        self.jobs: list[str] = []

    @staticmethod
    def jobcomp_offset() -> int:
        """Only jobcomp lines written after this offset belong to jobs submitted from now on."""
        try:
            return JOBCOMP_LOG.stat().st_size
        except FileNotFoundError:
            return 0

    def submit(self, ledger: Path, tasks: int, *options, env, cwd: Path) -> str:
        cwd.mkdir(parents=True, exist_ok=True)
        out = cli("submit", "--ledger", ledger, "--tasks", tasks, *options, env=env, cwd=cwd).stdout
        m = re.search(rf"^submitted array job (\d+) \({tasks} tasks\)$", out, re.M)
        assert m, f"unexpected submit output:\n{out}"
        self.jobs.append(m.group(1))
        return m.group(1)

    @staticmethod
    def task_records(job_id: str, offset: int) -> dict[int, dict[str, str]]:
        """{array task id: jobcomp fields} of the tasks of `job_id` that ended (for good: a requeued
        task's record says PENDING and is followed by the record of its next run)."""
        try:
            with open(JOBCOMP_LOG, "rb") as fh:
                fh.seek(offset)
                text = fh.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return {}
        records = {}
        for line in text.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            if fields.get("ArrayJobId") == job_id and fields.get("ArrayTaskId", "").isdigit():
                task = int(fields["ArrayTaskId"])
                if fields.get("JobState") in NOT_FINAL:
                    records.pop(task, None)
                else:
                    records[task] = fields
        return records

    def wait_tasks(self, job_id: str, tasks: int, offset: int, timeout: float, logs: Path | None = None):
        deadline = time.monotonic() + timeout
        while True:
            records = self.task_records(job_id, offset)
            if len(records) >= tasks:
                return records
            if time.monotonic() > deadline:
                queue = subprocess.run(["squeue", "-j", job_id], capture_output=True, text=True).stdout
                pytest.fail(f"array {job_id}: {len(records)} of {tasks} tasks ended after {timeout:.0f}s\n{queue}"
                            + (task_logs(logs) if logs else "") + stuck_in_kernel())
            time.sleep(0.5)

    def cancel_all(self) -> None:
        """Cancel the jobs this test submitted (by id), if any task is left."""
        for job in self.jobs:
            subprocess.run(["scancel", job], capture_output=True, timeout=30)


def stuck_in_kernel(limit: int = 12) -> str:
    """Processes in uninterruptible sleep (state D) with their kernel stacks, and the Gluster clients'
    disconnects: what a wedged mount looks like (docs/locking.md), for a failure message."""
    out = []
    for proc in sorted(Path("/proc").glob("[0-9]*"), key=lambda p: int(p.name)):
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "D":
                continue
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
            stack = (proc / "stack").read_text(errors="replace").splitlines()[:4]
        except (OSError, IndexError):
            continue
        out.append(f"  {proc.name} D {cmd}\n" + "".join(f"      {line}\n" for line in stack))
        if len(out) >= limit:
            break
    for log in sorted(Path("/var/log/glusterfs").glob("mnt-*.log")):
        try:
            lines = [line for line in log.read_text(errors="replace").splitlines() if "has not responded" in line]
        except OSError:
            continue
        out.extend(f"  {log.name}: {line}\n" for line in lines[-2:])
    return ("\n--- processes stuck in the kernel, Gluster disconnects ---\n" + "".join(out)) if out else ""


def task_logs(folder: Path, limit: int = 4000) -> str:
    out = []
    for path in sorted(folder.glob("ledgerbc-*.out")):
        out.append(f"\n--- {path.name} ---\n" + path.read_text(errors="replace")[-limit:])
    return "".join(out)


@pytest.fixture
def slurm():
    env = ci_env()
    if env.get("LEDGERBC_TEST_SLURM") != "1":
        unavailable("LEDGERBC_TEST_SLURM is not 1: no Slurm cluster (run ci/cluster-up.sh as root)")
    if not shutil.which("sbatch"):
        unavailable("sbatch is not on PATH")
    cluster = Slurm()
    yield cluster
    cluster.cancel_all()


@pytest.fixture
def gluster_root():
    """A fresh folder on the Gluster volume, as (path through mount A, the same through mount B)."""
    env = ci_env()
    a, b = env.get("LEDGERBC_TEST_GLUSTER_A"), env.get("LEDGERBC_TEST_GLUSTER_B")
    if not (a and b):
        unavailable("LEDGERBC_TEST_GLUSTER_A/B are not set: no GlusterFS volume (run ci/cluster-up.sh as root)")
    for mount in (a, b):
        if not os.path.ismount(mount):
            pytest.fail(f"{mount} (from LEDGERBC_TEST_GLUSTER_*) is not a mount point")
    sub = f"ledgerbc-it-{uuid.uuid4().hex[:12]}"
    (Path(a) / sub).mkdir()
    yield Path(a) / sub, Path(b) / sub
    shutil.rmtree(Path(a) / sub, ignore_errors=True)


@pytest.fixture
def bin_dir(tmp_path) -> Path:
    """A folder with the stand-in `dorado`, to put first on PATH."""
    folder = tmp_path / "bin"
    install_fake_dorado(folder)
    return folder


def install_gpu_probe(bin_dir: Path) -> Path:
    """Put a `dorado` in `bin_dir` that writes the CUDA_VISIBLE_DEVICES it was started with to its stderr
    (the batch log) before it execs the stand-in: evidence from dorado's side, beside the
    `[ledgerbc] running: ... (CUDA_VISIBLE_DEVICES=<n>)` line that ledgerbc writes."""
    standin = install_fake_dorado(bin_dir / "standin")
    probe = bin_dir / "dorado"
    probe.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = basecaller ]; then\n'
        '  echo "[gpu-probe] dorado started with CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}" >&2\n'
        "fi\n"
        f'exec {shlex.quote(str(standin))} "$@"\n',
        encoding="utf-8",
    )
    probe.chmod(0o755)
    return probe


def write_task_wrapper(bin_dir: Path, odd_ledger: Path) -> Path:
    """A LEDGERBC_EXE for slurm_array.sh that sends odd array tasks to the ledger through `odd_ledger`
    (the same file through the second mount): two Gluster clients on one machine stand for two hosts."""
    wrapper = bin_dir / "ledgerbc-task"
    wrapper.write_text(
        "#!/bin/sh\n"
        'case "${SLURM_ARRAY_TASK_ID:-0}" in\n'
        f"  *[13579]) LEDGERBC_LEDGER={shlex.quote(str(odd_ledger))}; export LEDGERBC_LEDGER ;;\n"
        "esac\n"
        f'exec {shlex.quote(ledgerbc_exe())} "$@"\n',
        encoding="utf-8",
    )
    wrapper.chmod(0o755)
    return wrapper
