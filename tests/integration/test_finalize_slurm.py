"""`ledgerbc submit --finalize` on the real Slurm (ci/cluster-up.sh): the finalize job waits for the
whole array (`afterany`), then writes the products on GlusterFS from the outputs the tasks published."""
from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest

from helpers import collect_outputs, read_output
from ledgerbc.testkit.synth import make_dataset

from .conftest import JOBCOMP_LOG, cli, job_env, task_logs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def job_record(job_id: str, offset: int) -> dict | None:
    """The jobcomp fields of the (non-array) job `job_id`, once it ended."""
    with open(JOBCOMP_LOG, "rb") as fh:
        fh.seek(offset)
        text = fh.read().decode("utf-8", errors="replace")
    for line in text.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if fields.get("JobId") == job_id:
            return fields
    return None


def test_submit_finalize_runs_after_the_last_array_task(slurm, gluster_root, bin_dir, tmp_path):
    root, _ = gluster_root
    make_dataset(tmp_path / "input", 10, seed=31, hostile_names=False)
    shutil.copytree(tmp_path / "input", root / "input")
    env = job_env(bin_dir)
    ledger = root / "output" / "ledgerbc.db"
    cli("init", root / "input", root / "output", "--batch-files", 2, "--emit", "fastq.gz", "--min-qscore", 10,
        "--lease", "10m", "--heartbeat", "2s", env=env)
    offset = slurm.jobcomp_offset()
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    out = cli("submit", "--ledger", ledger, "--tasks", 3, "--gpus-per-task", 0, "--finalize", env=env, cwd=jobs).stdout
    array = re.search(r"^submitted array job (\d+) \(3 tasks\)$", out, re.M).group(1)
    final = re.search(rf"^submitted finalize job (\d+) \(starts when array job {array} has ended\)$", out, re.M).group(1)
    slurm.jobs += [array, final]

    tasks = slurm.wait_tasks(array, 3, offset, timeout=300, logs=jobs)
    deadline = time.monotonic() + 300
    while (record := job_record(final, offset)) is None:
        if time.monotonic() > deadline:
            queue = subprocess.run(["squeue", "-j", final], capture_output=True, text=True).stdout
            pytest.fail(f"finalize job {final} did not end\n{queue}{task_logs(jobs)}")
        time.sleep(0.5)
    assert record["JobState"] == "COMPLETED", task_logs(jobs)
    assert record["StartTime"] >= max(t["EndTime"] for t in tasks.values())  # ISO times: compare as text
    assert "gres/gpu" not in record["Tres"]  # it asked for no GPU
    log = (jobs / f"ledgerbc-finalize-{final}.out").read_text()
    assert "final/all.pass.fastq.gz" in log

    outputs = collect_outputs(root / "output", "fastq.gz")
    for kind, published in (("pass", outputs.passed), ("fail", outputs.failed)):
        product = root / "output" / "final" / f"all.{kind}.fastq.gz"
        assert [r.read_id for r in read_output(product)] == [r.read_id for rel in sorted(published) for r in published[rel]]
        assert subprocess.run(["gzip", "-t", str(product)]).returncode == 0
    assert (root / "output" / "final" / "report.html").stat().st_size > 0
