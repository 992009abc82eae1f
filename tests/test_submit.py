"""`ledgerbc submit` and slurm_array.sh, with Slurm faked: a fake `sbatch` on PATH records its argv.

The argv is golden-tested; hostile ledger paths must reach sbatch verbatim, as one argument, and never
through a shell. The real Slurm runs only in tests/integration/test_slurm.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ledgerbc import errors, slurm
from ledgerbc.cli import cli

REPO = Path(__file__).resolve().parents[1]
HOSTILE_DIR = "it's \"quoted\" $(touch pwned) `touch pwned2`; & | *"


class FakeSbatch:
    """An executable `sbatch` first on PATH: appends its argv (JSON) to a log, prints `out` or fails."""

    def __init__(self, tmp_path: Path, monkeypatch):
        self.bin = tmp_path / "fakebin"
        self.bin.mkdir()
        self.log = tmp_path / "sbatch-calls.jsonl"
        script = self.bin / "sbatch"
        script.write_text(
            f"#!{sys.executable}\n"
            "import json, os, sys\n"
            "with open(os.environ['FAKE_SBATCH_LOG'], 'a') as fh:\n"
            "    fh.write(json.dumps(sys.argv[1:]) + '\\n')\n"
            "if os.environ.get('FAKE_SBATCH_FAIL'):\n"
            "    sys.stderr.write(os.environ.get('FAKE_SBATCH_STDERR') or 'sbatch: error: Batch job submission failed: "
            "Invalid account or account/partition combination specified\\nsecond line\\n')\n"
            "    sys.exit(1)\n"
            "print(os.environ.get('FAKE_SBATCH_OUT', '4242;ci'))\n",
            encoding="utf-8",
        )
        script.chmod(0o755)
        monkeypatch.setenv("FAKE_SBATCH_LOG", str(self.log))
        monkeypatch.setenv("PATH", f"{self.bin}{os.pathsep}{os.environ['PATH']}")

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def sbatch(tmp_path, monkeypatch) -> FakeSbatch:
    return FakeSbatch(tmp_path, monkeypatch)


@pytest.fixture
def hostile_ledger(tmp_path) -> Path:
    folder = tmp_path / HOSTILE_DIR
    folder.mkdir()
    path = folder / "ledger $(id).db"
    path.write_bytes(b"SQLite format 3\0")  # submit only checks that the file is an SQLite file
    return path


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# -- the argv ---------------------------------------------------------------------------------------------
def test_golden_argv_every_option():
    script = str(slurm.array_script())
    argv = slurm.build_sbatch_argv(
        "/data/run 1/ledgerbc.db", 8, partition="gpu", time="12:00:00", gpus_per_task=2, account="lab",
        cpus_per_task=8, mem="32G", extra=["--qos=high", "--constraint", "a100"], run_args=["--follow", "--idle-exit", "1h"],
    )
    assert argv == [
        "sbatch", "--parsable", "--array=0-7", "--partition=gpu", "--time=12:00:00", "--ntasks=1", "--gpus-per-task=2",
        "--account=lab", "--cpus-per-task=8", "--mem=32G", "--qos=high", "--constraint", "a100",
        script, "/data/run 1/ledgerbc.db", "--follow", "--idle-exit", "1h",
    ]


def test_golden_argv_defaults_and_no_gpu():
    script = str(slurm.array_script())
    # one worker, one GPU per task: Slurm refuses --gpus-per-task without --ntasks on a node with GPU gres
    assert slurm.build_sbatch_argv("/l.db", 1) == [
        "sbatch", "--parsable", "--array=0-0", "--ntasks=1", "--gpus-per-task=1", script, "/l.db"]
    # 0 overrides the script's `#SBATCH --gpus-per-task=1` (verified on Slurm 22.05: no gres asked)
    assert slurm.build_sbatch_argv("/l.db", 3, gpus_per_task=0) == [
        "sbatch", "--parsable", "--array=0-2", "--ntasks=1", "--gpus-per-task=0", script, "/l.db"]


def test_relative_ledger_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert slurm.build_sbatch_argv("out/ledgerbc.db", 2)[-1] == str(tmp_path / "out" / "ledgerbc.db")


@pytest.mark.parametrize("kwargs", [dict(tasks=0), dict(tasks=2, gpus_per_task=-1), dict(tasks=2, cpus_per_task=0)])
def test_impossible_values_are_bad_input(kwargs):
    with pytest.raises(errors.BadInput):
        slurm.build_sbatch_argv("/l.db", **kwargs)


# -- the script ------------------------------------------------------------------------------------------
def test_array_script_is_installed_and_linked_at_top_level():
    script = slurm.array_script()
    assert script.is_file() and os.access(script, os.X_OK)
    top = REPO / "slurm_array.sh"
    assert top.is_symlink() and os.readlink(top) == "ledgerbc/slurm_array.sh"
    assert top.resolve() == script.resolve() or top.read_bytes() == script.read_bytes()
    directives = [line.split(None, 1)[1] for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert directives == ["--job-name=ledgerbc", "--ntasks=1", "--gpus-per-task=1", "--signal=B:TERM@300",
                          "--output=ledgerbc-%A_%a.out"]


def _run_script(tmp_path, *args, env_extra=None, script=None):
    """Run slurm_array.sh (or `script`) with a fake ledgerbc (LEDGERBC_EXE) that records argv, env and pid."""
    record = tmp_path / "exe-record.json"
    fake = tmp_path / "fake ledgerbc"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'ledger': os.environ.get('LEDGERBC_LEDGER'), 'pid': os.getpid()}}, "
        f"open({str(record)!r}, 'w'))\n",
        encoding="utf-8",
    )
    fake.chmod(0o755)
    env = dict(os.environ)  # conftest.py removed the shell's LEDGERBC_*
    env["LEDGERBC_EXE"] = str(fake)
    env.update(env_extra or {})
    proc = subprocess.Popen(["bash", str(script or slurm.array_script()), *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=30)
    data = json.loads(record.read_text()) if record.exists() else None
    return proc, data, err


def test_script_sets_ledger_adds_device_and_execs(tmp_path):
    ledger = f"/shared/{HOSTILE_DIR}/ledger.db"
    proc, data, err = _run_script(tmp_path, ledger, "--max-batches", "2", "--worker-id", "a b")
    assert proc.returncode == 0, err
    assert data["ledger"] == ledger
    assert data["argv"] == ["run", "--device", "cuda:all", "--max-batches", "2", "--worker-id", "a b"]
    assert data["pid"] == proc.pid, "ledgerbc must replace the batch shell (exec), or Slurm's signal never reaches it"
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("args,env", [(["--device", "cpu"], {}), (["--device=cuda:1"], {}), ([], {"LEDGERBC_DEVICE": "cpu"})])
def test_script_keeps_the_users_device(tmp_path, args, env):
    proc, data, err = _run_script(tmp_path, "/l.db", *args, env_extra=env)
    assert proc.returncode == 0, err
    assert data["argv"] == ["run", *args]


@pytest.mark.parametrize("script", ["array", "finalize"])
def test_script_without_ledger_or_executable(tmp_path, script):
    path = slurm.array_script() if script == "array" else slurm.finalize_script()
    proc, data, err = _run_script(tmp_path, script=path)
    assert proc.returncode == 4 and data is None and "no ledger given" in err
    proc, data, err = _run_script(tmp_path, "/l.db", env_extra={"LEDGERBC_EXE": str(tmp_path / "missing")}, script=path)
    assert proc.returncode == 3 and data is None and "LEDGERBC_EXE" in err


# -- submit, through the CLI ----------------------------------------------------------------------------------
def test_submit_passes_a_hostile_ledger_path_verbatim(sbatch, hostile_ledger, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("submit", "--ledger", hostile_ledger, "--tasks", 8, "--gpus-per-task", 0, "--time", "2",
                    "--run-arg=--max-batches", "--run-arg", "3", "--", "--job-name=x y", "--qos=$(touch pwned)")
    assert result.exit_code == 0, result.output
    assert sbatch.calls() == [[
        "--parsable", "--array=0-7", "--time=2", "--ntasks=1", "--gpus-per-task=0", "--job-name=x y", "--qos=$(touch pwned)",
        str(slurm.array_script()), str(hostile_ledger), "--max-batches", "3",
    ]]
    lines = result.stdout.splitlines()
    assert lines[0] == "submitted array job 4242 (8 tasks)"
    import shlex

    assert shlex.split(lines[1].split(": ", 1)[1]) == ["sbatch"] + sbatch.calls()[0]
    assert shlex.split(lines[2].split(": ", 1)[1]) == ["ledgerbc", "status", "--ledger", str(hostile_ledger), "--watch", "30"]
    assert not list(tmp_path.rglob("pwned*"))


def test_submit_takes_the_ledger_from_the_environment(sbatch, hostile_ledger, monkeypatch):
    monkeypatch.setenv("LEDGERBC_LEDGER", str(hostile_ledger))
    monkeypatch.setenv("FAKE_SBATCH_OUT", "977")
    result = invoke("submit", "--tasks", 2)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "submitted array job 977 (2 tasks)"
    assert sbatch.calls()[0][-1] == str(hostile_ledger)


def test_submit_without_ledger_says_so(sbatch):
    result = invoke("submit", "--tasks", 2)
    assert result.exit_code == 4
    assert result.stderr.startswith("Error: no ledger given") and not sbatch.calls()


def test_submit_refuses_a_missing_ledger_before_sbatch(sbatch, tmp_path):
    result = invoke("submit", "--ledger", tmp_path / "nope.db", "--tasks", 2)
    assert result.exit_code == errors.LedgerNotFound.exit_code
    assert result.stderr.count("\n") == 1 and "ledgerbc init" in result.stderr
    assert not sbatch.calls()


def test_sbatch_failure_is_one_line_with_its_first_stderr_line(sbatch, hostile_ledger, monkeypatch):
    monkeypatch.setenv("FAKE_SBATCH_FAIL", "1")
    result = invoke("submit", "--ledger", hostile_ledger, "--tasks", 2, "--account", "nolab")
    assert result.exit_code == errors.SlurmError.exit_code == 10
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert "sbatch failed (exit status 1): sbatch: error: Batch job submission failed: Invalid account" in result.stderr
    assert "second line" not in result.stderr


def test_default_submit_sends_one_task_with_one_gpu(sbatch, hostile_ledger):
    result = invoke("submit", "--ledger", hostile_ledger, "--tasks", 2)
    assert result.exit_code == 0, result.output
    assert sbatch.calls() == [["--parsable", "--array=0-1", "--ntasks=1", "--gpus-per-task=1",
                               str(slurm.array_script()), str(hostile_ledger)]]


# Slurm 22.05 on a cluster without `GresTypes=gpu` (the first line is all that is shown)
GRES_REFUSED = "sbatch: error: Invalid generic resource (gres) specification\n"


def test_gres_refusal_names_the_no_gpu_option(sbatch, hostile_ledger, monkeypatch):
    monkeypatch.setenv("FAKE_SBATCH_FAIL", "1")
    monkeypatch.setenv("FAKE_SBATCH_STDERR", GRES_REFUSED)
    result = invoke("submit", "--ledger", hostile_ledger, "--tasks", 2)
    assert result.exit_code == 10
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert result.stderr.startswith(
        "Error: sbatch failed (exit status 1): sbatch: error: Invalid generic resource (gres) specification. ")
    assert "`--gpus-per-task 0`" in result.stderr


def test_gres_refusal_without_a_gpu_request_gets_no_gpu_advice(sbatch, monkeypatch):
    monkeypatch.setenv("FAKE_SBATCH_FAIL", "1")
    monkeypatch.setenv("FAKE_SBATCH_STDERR", GRES_REFUSED)
    with pytest.raises(errors.SlurmError) as caught:  # e.g. the user's own `-- --gres=...`
        slurm.run_sbatch(slurm.build_sbatch_argv("/l.db", 2, gpus_per_task=0, extra=["--gres=foo:1"]))
    assert "--gpus-per-task 0" not in str(caught.value) and "Fix the sbatch options" in str(caught.value)


def test_missing_sbatch_is_one_line(hostile_ledger, tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    result = invoke("submit", "--ledger", hostile_ledger, "--tasks", 2)
    assert result.exit_code == 10
    assert result.stderr.startswith("Error: sbatch not found on PATH") and result.stderr.count("\n") == 1


@pytest.mark.parametrize("out,job", [("4242;ci\n", "4242"), ("17\n", "17"), ("  99 \n", "99")])
def test_parsable_output(sbatch, monkeypatch, out, job):
    monkeypatch.setenv("FAKE_SBATCH_OUT", out.rstrip("\n"))
    assert slurm.run_sbatch(["sbatch", "--parsable", "x"]) == job


def test_unexpected_sbatch_output_is_an_error(sbatch, monkeypatch):
    monkeypatch.setenv("FAKE_SBATCH_OUT", "Submitted batch job 12")
    with pytest.raises(errors.SlurmError, match="not a job id"):
        slurm.run_sbatch(["sbatch", "--parsable", "x"])


def test_submit_refuses_an_unsafe_mount_before_sbatch(sbatch, hostile_ledger, tmp_path, monkeypatch):
    from ledgerbc import mounts

    fake = tmp_path / "mountinfo"
    fake.write_text("27 1 0:50 / / rw,relatime - nfs fs01:/export rw,vers=3,nolock,local_lock=all,addr=10.0.0.1\n")
    monkeypatch.setattr(mounts, "MOUNTINFO", str(fake))
    result = invoke("submit", "--ledger", hostile_ledger, "--tasks", 2)
    assert result.exit_code == errors.UnsafeFilesystem.exit_code
    assert "nolock" in result.stderr and not sbatch.calls()


# -- submit --finalize: the finalize job chained after the array ------------------------------------------------
def test_golden_finalize_argv():
    script = str(slurm.finalize_script())
    assert slurm.build_finalize_argv("/data/run 1/ledgerbc.db", "4242") == [
        "sbatch", "--parsable", "--dependency=afterany:4242", script, "/data/run 1/ledgerbc.db"]
    assert slurm.build_finalize_argv("/l.db", "977", partition="io", account="lab", extra=["--time=2:00:00"]) == [
        "sbatch", "--parsable", "--dependency=afterany:977", "--partition=io", "--account=lab", "--time=2:00:00",
        script, "/l.db"]
    with pytest.raises(errors.BadInput):
        slurm.build_finalize_argv("/l.db", "12; rm -rf /")


def test_finalize_script_is_installed_asks_no_gpu_and_execs_finalize(tmp_path):
    script = slurm.finalize_script()
    assert script.is_file() and os.access(script, os.X_OK)
    top = REPO / "slurm_finalize.sh"
    assert top.is_symlink() and os.readlink(top) == "ledgerbc/slurm_finalize.sh"
    directives = [line.split(None, 1)[1] for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert directives == ["--job-name=ledgerbc-finalize", "--ntasks=1", "--output=ledgerbc-finalize-%j.out"]
    record = tmp_path / "exe-record.json"
    fake = tmp_path / "fake ledgerbc"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"json.dump({{'argv': sys.argv[1:], 'ledger': os.environ.get('LEDGERBC_LEDGER'), 'pid': os.getpid()}}, "
                    f"open({str(record)!r}, 'w'))\n", encoding="utf-8")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGERBC_")}
    env["LEDGERBC_EXE"] = str(fake)
    ledger = f"/shared/{HOSTILE_DIR}/ledger.db"
    proc = subprocess.Popen(["bash", str(script), ledger, "--partial"], env=env, cwd=tmp_path)
    assert proc.wait(timeout=30) == 0
    data = json.loads(record.read_text())
    assert data == {"argv": ["finalize", "--partial"], "ledger": ledger, "pid": proc.pid}
    assert not (tmp_path / "pwned").exists()


def test_submit_finalize_chains_a_second_sbatch_after_the_array(sbatch, hostile_ledger, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("submit", "--ledger", hostile_ledger, "--tasks", 4, "--partition", "gpu", "--account", "lab",
                    "--finalize", "--finalize-partition", "io")
    assert result.exit_code == 0, result.output
    assert sbatch.calls() == [
        ["--parsable", "--array=0-3", "--partition=gpu", "--ntasks=1", "--gpus-per-task=1", "--account=lab",
         str(slurm.array_script()), str(hostile_ledger)],
        ["--parsable", "--dependency=afterany:4242", "--partition=io", "--account=lab",
         str(slurm.finalize_script()), str(hostile_ledger)],
    ]
    lines = result.stdout.splitlines()
    assert lines[0] == "submitted array job 4242 (4 tasks)"
    assert lines[2] == "submitted finalize job 4242 (starts when array job 4242 has ended)"
    import shlex

    assert shlex.split(lines[3].split(": ", 1)[1]) == ["sbatch"] + sbatch.calls()[1]
    assert not list(tmp_path.rglob("pwned*"))


def test_submit_without_finalize_submits_one_job(sbatch, hostile_ledger):
    assert invoke("submit", "--ledger", hostile_ledger, "--tasks", 2).exit_code == 0
    assert len(sbatch.calls()) == 1


def test_submit_warns_when_the_tasks_approach_what_one_ledger_carries(sbatch, hostile_ledger, monkeypatch):
    from ledgerbc import limits

    monkeypatch.setattr(limits, "LEDGER_WORKERS_LIMIT", 100)
    result = invoke("submit", "--ledger", hostile_ledger, "--tasks", 10)
    assert result.exit_code == 0 and "Warning" not in result.stderr
    result = invoke("submit", "--ledger", hostile_ledger, "--tasks", 90)
    assert result.exit_code == 0, result.output  # a warning, not a refusal: the array is submitted
    assert result.stderr.startswith("Warning: --tasks 90: one ledger loses about 1% of GPU time")
    assert "bench/scale_limit.py" in result.stderr and "--batch-size" in result.stderr
    assert [c[1] for c in sbatch.calls()] == ["--array=0-9", "--array=0-89"]
