"""`ledgerbc submit` on a real Slurm (ci/cluster-up.sh), with its default request of one GPU per task
(the CI node declares 4 stand-in GPUs as generic resources): an array drains a study on GlusterFS with
half its tasks on a second mount; each task's dorado runs with the GPU Slurm gave that task; `scancel`
of a task and a task's time limit (`--signal=B:TERM@N`) release its batch at once; a task that Slurm
requeues comes back as a new worker. The stand-in dorado is on PATH; sbatch passes the environment on.
"""
from __future__ import annotations

import datetime
import json
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from ledgerbc import models
from ledgerbc.db import Ledger
from ledgerbc.testkit.synth import make_dataset
from helpers import check_exactly_once

from .conftest import cli, install_gpu_probe, job_env, ledgerbc_exe, task_logs, wait_for, write_task_wrapper

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # minutes of real Slurm jobs

LONG_LEASE = ["--lease", "10m", "--heartbeat", "2s", "--clock-skew", "10s"]


def batches(ledger: Ledger) -> list:
    return ledger.transact(lambda c: c.execute(sa.select(models.Batch).order_by(models.Batch.id)).all())


def files(ledger: Ledger) -> list:
    return ledger.transact(lambda c: c.execute(sa.select(models.Pod5File).order_by(models.Pod5File.id)).all())


def events(ledger: Ledger, kind: str) -> list:
    return ledger.transact(
        lambda c: c.execute(sa.select(models.Event).where(models.Event.kind == kind).order_by(models.Event.id)).all()
    )


def task_of(worker_id: str, job_id: str) -> int:
    m = re.fullmatch(rf"{job_id}_(\d+)@.+", worker_id)
    assert m, f"worker id {worker_id!r} is not <array job {job_id}>_<task>@<host>"
    return int(m.group(1))


RUNNING_LINE = re.compile(r"\[ledgerbc\] running: (.+) \(CUDA_VISIBLE_DEVICES=([^)]*)\)")
PROBE_LINE = re.compile(r"\[gpu-probe\] dorado started with CUDA_VISIBLE_DEVICES=(\S*)")


def gpus_of_batches(output: Path) -> dict[int, tuple[str, list[str]]]:
    """{batch id: (CUDA_VISIBLE_DEVICES, dorado argv)} from each batch log's first line, checked against
    what dorado itself reported (install_gpu_probe)."""
    found = {}
    for log in sorted((output / "logs").glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()
        m = RUNNING_LINE.fullmatch(lines[0]) if lines else None
        assert m, f"{log.name} does not start with `[ledgerbc] running: ... (CUDA_VISIBLE_DEVICES=...)`: {lines[:1]}"
        seen = [p.group(1) for p in map(PROBE_LINE.search, lines) if p]
        assert seen == [m.group(2)], f"{log.name}: ledgerbc says {m.group(2)!r}, dorado saw {seen}"
        found[int(log.stem)] = (m.group(2), shlex.split(m.group(1)))
    return found


def test_array_drains_a_study_with_odd_tasks_on_the_second_mount(slurm, gluster_root, bin_dir, tmp_path):
    root_a, root_b = gluster_root
    t0 = time.monotonic()
    # written locally and copied in big writes: pod5's many small writes are slow through FUSE
    dataset = make_dataset(tmp_path / "input", 200, seed=21, size_spread=False)  # hostile names included
    shutil.copytree(tmp_path / "input", root_a / "input")
    t_data = time.monotonic() - t0
    env = job_env(bin_dir, LEDGERBC_EXE=write_task_wrapper(bin_dir, root_b / "ledger.db"))
    ledger_path = root_a / "ledger.db"
    cli("init", root_a / "input", root_a / "output", "--ledger", ledger_path, "--batch-files", 8, *LONG_LEASE, env=env)

    offset = slurm.jobcomp_offset()
    t1 = time.monotonic()
    job = slurm.submit(ledger_path, 8, env=env, cwd=tmp_path / "slurm")
    records = slurm.wait_tasks(job, 8, offset, timeout=400, logs=tmp_path / "slurm")
    t_run = time.monotonic() - t1
    states = {task: r.get("JobState") for task, r in records.items()}
    assert states == {t: "COMPLETED" for t in range(8)}, f"{states}{task_logs(tmp_path / 'slurm')}"

    status = json.loads(cli("status", "--ledger", ledger_path, "--json", env=env).stdout)
    assert status["files"]["done"] == 200 and status["files"]["total"] == 200, status["files"]
    assert not status["failed"] and not status["running_batches"]
    workers = {w["worker_id"] for w in status["workers"]}
    assert len(workers) == 8 and {task_of(w, job) for w in workers} == set(range(8)), workers
    assert {w["device"] for w in status["workers"]} == {"cuda:all"}  # slurm_array.sh's default

    counts = check_exactly_once(dataset, root_a / "output")

    # Odd tasks reached the study through mount B: their batch logs name ASSIGNED folders under B.
    by_mount = {0: set(), 1: set()}
    for log in (root_a / "output" / "logs").glob("*.log"):
        first = log.read_text(errors="replace").splitlines()[0]
        argv = shlex.split(first.split("running: ", 1)[1])
        assigned = Path(argv[3])
        worker = re.fullmatch(r"ASSIGNED_\d+_(.+)", assigned.name).group(1)
        task = task_of(worker, job)
        want = root_b if task % 2 else root_a
        assert assigned.parent.parent.parent == want, f"task {task} ran dorado on {assigned}"
        by_mount[task % 2].add(task)
    assert by_mount[0] and by_mount[1], f"batches by even/odd tasks: {by_mount}"
    print(f"\n200 files ({counts['reads']} reads) written to Gluster in {t_data:.1f}s; 8 tasks drained them "
          f"in {t_run:.1f}s; tasks with batches: even {sorted(by_mount[0])}, odd {sorted(by_mount[1])}")


def test_scancel_of_a_task_releases_its_batch_at_once(slurm, gluster_root, bin_dir, tmp_path):
    root, _ = gluster_root
    dataset = make_dataset(root / "input", 12, seed=22, hostile_names=False, size_spread=False)
    env = job_env(bin_dir, LEDGERBC_EXE=ledgerbc_exe(), LEDGERBC_SIM_DELAY=6)  # every dorado run takes 6 s+
    ledger_path = root / "ledger.db"
    cli("init", root / "input", root / "output", "--ledger", ledger_path, "--batch-files", 3, *LONG_LEASE, env=env)
    ledger = Ledger(ledger_path)

    offset = slurm.jobcomp_offset()
    job = slurm.submit(ledger_path, 2, env=env, cwd=tmp_path / "slurm")
    running = wait_for(
        lambda: (lambda rs: rs if {task_of(b.worker_id, job) for b in rs} == {0, 1} else None)(
            [b for b in batches(ledger) if b.state == models.RUNNING]),
        120, "both tasks in the middle of a batch")
    victim = next(b for b in running if task_of(b.worker_id, job) == 0)
    victim_files = {f.id for f in files(ledger) if f.batch_id == victim.id}
    t_cancel = time.time()
    subprocess.run(["scancel", f"{job}_0"], check=True, timeout=30)

    released = wait_for(lambda: next((b for b in batches(ledger) if b.id == victim.id and b.state != models.RUNNING), None),
                        60, f"batch {victim.id} to leave 'running'")
    assert released.state == models.RELEASED, released
    assert released.finished_at - t_cancel < 30, "the release must come with the signal, not with a lease"
    assert [e.message for e in events(ledger, "batch-released") if e.batch_id == victim.id] == ["worker stopped by signal"]

    records = slurm.wait_tasks(job, 2, offset, timeout=400, logs=tmp_path / "slurm")
    assert records[0]["JobState"] == "CANCELLED" and records[1]["JobState"] == "COMPLETED", records
    rows = {f.id: f for f in files(ledger)}
    assert all(r.state == models.DONE for r in rows.values()), [(r.rel_path, r.state) for r in rows.values()]
    by_batch = {b.id: b for b in batches(ledger)}
    for fid in victim_files:
        taker = by_batch[rows[fid].batch_id]
        assert task_of(taker.worker_id, job) == 1 and taker.claimed_at >= released.finished_at
        assert taker.claimed_at - t_cancel < 600, "picked up before the 10 min lease could have expired"
        assert rows[fid].attempts == 0  # a release counts no attempt
    assert not [b for b in by_batch.values() if b.state == models.RECLAIMED]
    check_exactly_once(dataset, root / "output")


def test_time_limit_signal_releases_the_batch(slurm, gluster_root, bin_dir, tmp_path):
    """--time=2 with --signal=B:TERM@60: the signal reaches the worker (exec'd by the batch shell) before
    the limit; Slurm may send it up to 60 s early, so dorado hangs and the batch is mid-way whenever it comes."""
    root, _ = gluster_root
    make_dataset(root / "input", 3, seed=23, hostile_names=False, size_spread=False)
    env = job_env(bin_dir, LEDGERBC_EXE=ledgerbc_exe(), LEDGERBC_SIM_HANG=1)
    ledger_path = root / "ledger.db"
    cli("init", root / "input", root / "output", "--ledger", ledger_path, "--batch-files", 1, *LONG_LEASE, env=env)
    ledger = Ledger(ledger_path)

    offset = slurm.jobcomp_offset()
    job = slurm.submit(ledger_path, 1, "--time", 2, "--", "--signal=B:TERM@60",
                       env=env, cwd=tmp_path / "slurm")
    (record,) = slurm.wait_tasks(job, 1, offset, timeout=240, logs=tmp_path / "slurm").values()

    def stamp(text):
        return datetime.datetime.fromisoformat(text).timestamp()

    lasted = stamp(record["EndTime"]) - stamp(record["StartTime"])
    assert record["JobState"] != "TIMEOUT" and lasted < 120, f"the task ran into its limit: {record}"
    got = batches(ledger)
    assert got, "the signal came before the worker claimed a batch (Slurm sent it very early); rerun" + task_logs(tmp_path / "slurm")
    assert [b.state for b in got] == [models.RELEASED], got
    assert got[0].error == "worker stopped by signal"
    assert [e.message for e in events(ledger, "worker-exit")] == ["stopped by signal"]
    out = task_logs(tmp_path / "slurm")
    assert "signal SIGTERM: releasing the current batch" in out, out
    assert {f.state for f in files(ledger)} == {models.PENDING} and all(f.attempts == 0 for f in files(ledger))
    print(f"\ntask {job}_0 signalled and released batch {got[0].id} after {lasted:.0f}s of its 120 s limit")


def test_each_task_runs_dorado_on_its_own_gpu(slurm, bin_dir, tmp_path):
    """Default submit: `--ntasks=1 --gpus-per-task=1`; Slurm gives each task one of the node's 4 GPUs
    (CUDA_VISIBLE_DEVICES) and dorado runs with it: tasks that ran at the same time had different GPUs."""
    install_gpu_probe(bin_dir)
    dataset = make_dataset(tmp_path / "input", 16, seed=24, hostile_names=False, size_spread=False)
    env = job_env(bin_dir, LEDGERBC_EXE=ledgerbc_exe(), LEDGERBC_SIM_DELAY=3)  # batches overlap in time
    ledger_path = tmp_path / "output" / "ledgerbc.db"
    cli("init", tmp_path / "input", tmp_path / "output", "--batch-files", 1, *LONG_LEASE, env=env)
    ledger = Ledger(ledger_path)

    offset = slurm.jobcomp_offset()
    job = slurm.submit(ledger_path, 4, env=env, cwd=tmp_path / "slurm")
    records = slurm.wait_tasks(job, 4, offset, timeout=400, logs=tmp_path / "slurm")
    assert {t: r["JobState"] for t, r in records.items()} == {t: "COMPLETED" for t in range(4)}, task_logs(tmp_path / "slurm")
    check_exactly_once(dataset, tmp_path / "output")

    gpus = gpus_of_batches(tmp_path / "output")
    rows = {b.id: b for b in batches(ledger)}
    assert set(gpus) == set(rows), "one batch log per batch"
    per_task: dict[int, set[str]] = {}
    for batch_id, (gpu, argv) in gpus.items():
        assert argv[argv.index("--device") + 1] == "cuda:all"  # dorado takes every GPU it can see: the task's
        assert rows[batch_id].gpus == gpu, "the ledger records the GPU each batch ran with"
        per_task.setdefault(task_of(rows[batch_id].worker_id, job), set()).add(gpu)
    assert all(len(v) == 1 for v in per_task.values()), f"a task changed GPU: {per_task}"
    gpu_of = {task: next(iter(v)) for task, v in per_task.items()}
    assert set(gpu_of.values()) <= {"0", "1", "2", "3"}, gpu_of

    overlapping = set()
    for a in rows.values():
        for b in rows.values():
            ta, tb = task_of(a.worker_id, job), task_of(b.worker_id, job)
            if ta < tb and a.claimed_at < b.finished_at and b.claimed_at < a.finished_at:
                overlapping.add((ta, tb))
                assert gpus[a.id][0] != gpus[b.id][0], f"batches {a.id} and {b.id} ran at once on one GPU"
    assert overlapping, "no two tasks ran batches at the same time"
    print(f"\nGPU per task: {dict(sorted(gpu_of.items()))}; tasks that overlapped: {sorted(overlapping)}")


def test_a_requeued_task_rejoins_as_a_new_worker(slurm, bin_dir, tmp_path):
    """`scontrol requeue` of a working task: its batch is released at once (SIGTERM), Slurm starts the task
    again (after AuthInfo cred_expire, 20 s on the CI cluster), the new run registers as a worker again,
    claims work, and the study ends with every read exactly once."""
    dataset = make_dataset(tmp_path / "input", 14, seed=25, hostile_names=False, size_spread=False)
    env = job_env(bin_dir, LEDGERBC_EXE=ledgerbc_exe(), LEDGERBC_SIM_DELAY=5)
    ledger_path = tmp_path / "output" / "ledgerbc.db"
    cli("init", tmp_path / "input", tmp_path / "output", "--batch-files", 1, *LONG_LEASE, env=env)
    ledger = Ledger(ledger_path)

    offset = slurm.jobcomp_offset()
    job = slurm.submit(ledger_path, 2, "--", "--requeue", "--open-mode=append", env=env, cwd=tmp_path / "slurm")
    victim = wait_for(lambda: next((b for b in batches(ledger) if b.state == models.RUNNING
                                    and task_of(b.worker_id, job) == 0), None), 120, "task 0 in the middle of a batch")
    victim_files = {f.id for f in files(ledger) if f.batch_id == victim.id}
    t_requeue = time.time()
    subprocess.run(["scontrol", "requeue", f"{job}_0"], check=True, timeout=30)

    released = wait_for(lambda: next((b for b in batches(ledger) if b.id == victim.id and b.state != models.RUNNING), None),
                        60, f"batch {victim.id} to leave 'running'")
    assert released.state == models.RELEASED and released.error == "worker stopped by signal", released

    records = slurm.wait_tasks(job, 2, offset, timeout=400, logs=tmp_path / "slurm")
    assert {t: r["JobState"] for t, r in records.items()} == {0: "COMPLETED", 1: "COMPLETED"}, task_logs(tmp_path / "slurm")
    counts = check_exactly_once(dataset, tmp_path / "output")

    worker0 = victim.worker_id
    starts = [e for e in events(ledger, "worker-start") if e.worker_id == worker0]
    assert len(starts) == 2, [(e.ts, e.message) for e in starts]
    pids = [re.search(r"pid (\d+)", e.message).group(1) for e in starts]
    assert pids[0] != pids[1] and starts[1].ts > t_requeue, "the requeued task must start a new worker process"
    rejoined = [b for b in batches(ledger) if b.worker_id == worker0 and b.claimed_at >= starts[1].ts]
    assert rejoined and all(b.state == models.DONE for b in rejoined), \
        f"the requeued task did no work after it came back: {rejoined}{task_logs(tmp_path / 'slurm')}"
    rows = {f.id: f for f in files(ledger)}
    assert all(r.state == models.DONE for r in rows.values())
    assert all(rows[fid].attempts == 0 for fid in victim_files)  # a release counts no attempt
    print(f"\ntask {job}_0 requeued {starts[1].ts - t_requeue:.0f}s before it came back; it then did "
          f"{len(rejoined)} batches; {counts['reads']} reads exactly once")
