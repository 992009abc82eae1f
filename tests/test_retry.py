"""`ledgerbc retry`: failed files (all, or the ones named) go back to pending and are basecalled."""
import shutil

import pytest
from click.testing import CliRunner

from ledgerbc import models
from ledgerbc.cli import cli
from ledgerbc.testkit.synth import truncate_copy, write_pod5
from helpers import make_study, check_exactly_once, pod5_reads

BAD = ["bad/bad_one.pod5", "bad/bad_two.pod5"]


pytestmark = pytest.mark.usefixtures("no_stray_processes")


@pytest.fixture
def failed_study(tmp_path):
    """6 good files and 2 the stand-in dorado cannot read (LEDGERBC_SIM_FAIL_MATCH): failed after a run."""

    def bad_files(inp):
        for i, rel in enumerate(BAD):
            write_pod5(inp / rel, 4, seed=100 + i)

    study = make_study(tmp_path, 6, 4, prepare=bad_files)
    first = study.cli("run", "--worker-id", "first", env={**study.env(), "LEDGERBC_SIM_FAIL_MATCH": "bad_"})
    assert first.returncode == 0, first.stderr
    return study


def test_failed_files_keep_their_error_until_retried(failed_study):
    study = failed_study
    # Each bad file fails at its first attempt, then alone at its second and third (--max-attempts 3).
    report = study.status()
    assert report["files"]["failed"] == 2 and report["files"]["done"] == 6
    assert sorted(f["path"] for f in report["failed"]) == BAD
    for f in report["failed"]:
        assert f["attempts"] == 3
        assert "dorado returned no reads" in f["error"] and "Invalid signature" in f["error"]


def test_retry_all_failed_queues_every_failed_file_and_the_next_run_basecalls_them(failed_study):
    study = failed_study
    before = study.outputs()
    result = CliRunner().invoke(cli, ["retry", "--ledger", str(study.ledger_path), "--all-failed"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("2 failed files queued again;")
    state = study.files()
    assert [state[rel][0] for rel in BAD] == [models.PENDING, models.PENDING]
    assert study.status()["failed"] == []

    finish = study.cli("run", "--worker-id", "second")  # the stand-in reads them fine now
    assert finish.returncode == 0, finish.stderr
    assert {s for s, _b in study.files().values()} == {models.DONE}
    check_exactly_once(pod5_reads(study.input), study.output)
    after = study.outputs()
    assert {k: after[k] for k in before} == before  # the good files were not basecalled again


def test_retry_named_files_queues_only_those(failed_study):
    study = failed_study
    runner = CliRunner()
    result = runner.invoke(cli, ["retry", "--ledger", str(study.ledger_path), BAD[1]])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("1 failed files queued again;")
    state = study.files()
    assert (state[BAD[0]][0], state[BAD[1]][0]) == (models.FAILED, models.PENDING)
    # A file that is not failed (done, or unknown) is left alone.
    done = next(rel for rel, (s, _b) in state.items() if s == models.DONE)
    result = runner.invoke(cli, ["retry", "--ledger", str(study.ledger_path), done, "no/such.pod5"])
    assert result.exit_code == 0 and result.output.startswith("0 failed files queued again;")
    assert study.files()[done][0] == models.DONE

    finish = study.cli("run", "--worker-id", "second")
    assert finish.returncode == 0, finish.stderr
    state = study.files()
    assert (state[BAD[0]][0], state[BAD[1]][0]) == (models.FAILED, models.DONE)


def test_retry_needs_files_or_all_failed(failed_study):
    result = CliRunner().invoke(cli, ["retry", "--ledger", str(failed_study.ledger_path)])
    assert result.exit_code == 3
    assert result.stderr.strip() == "Error: name the files to retry, or pass --all-failed."


def test_retry_rechecks_a_file_that_failed_admission_once_it_is_complete(tmp_path):
    src = tmp_path / "src.pod5"
    ids = write_pod5(src, 5, seed=7)

    def truncated_copy(inp):
        (inp / "late").mkdir()
        truncate_copy(src, inp / "late" / "copy.pod5")

    study = make_study(tmp_path, 2, 4, prepare=truncated_copy)
    assert study.files()["late/copy.pod5"][0] == models.FAILED  # truncated at init: failed at once (no --follow)
    assert "Run `ledgerbc retry` once it is complete" in study.status()["failed"][0]["error"]
    shutil.copy(src, study.input / "late" / "copy.pod5")  # the copy is redone, complete this time
    result = CliRunner().invoke(cli, ["retry", "--ledger", str(study.ledger_path), "--all-failed"])
    assert result.exit_code == 0, result.output
    assert study.files()["late/copy.pod5"][0] == models.PENDING
    finish = study.cli("run", "--worker-id", "w")
    assert finish.returncode == 0, finish.stderr
    reads = pod5_reads(study.input)
    assert reads["late/copy.pod5"] == ids
    check_exactly_once(reads, study.output)
