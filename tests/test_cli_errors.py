"""Bad input meets one `Error: ...` line, a documented exit code (ledgerbc.errors) and an intact ledger.

Most cases run the CLI in-process with click's CliRunner; a few run the installed `ledgerbc` script.
Tests run as root, and root ignores permission bits: "unreadable" and "not writable" are made real
either with paths the kernel refuses to root too (a folder under a regular file, procfs), or by
running the command under `setpriv` without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, where root obeys
mode bits like any user.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pod5
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from ledgerbc import models, schema
from ledgerbc.cli import cli
from ledgerbc.db import Ledger
from ledgerbc.testkit.synth import truncate_copy, write_pod5

FIXTURES = Path(__file__).resolve().parent / "fixtures"
DROP_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, prog_name="ledgerbc")


def assert_error(result, exit_code: int, *needles: str) -> str:
    """Exactly one `Error:` line on stderr, no traceback, the given exit code; returns the line."""
    output = result.output if hasattr(result, "output") else result.stdout + result.stderr
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert code == exit_code, f"exit {code}, wanted {exit_code}: {output}"
    assert "Traceback" not in output
    if hasattr(result, "exception"):
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), f"not one Error: line: {result.stderr!r}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rows(ledger_path: Path) -> dict:
    ledger = Ledger(ledger_path)
    return {r.rel_path: r for r in ledger.transact(lambda c: c.execute(sa.select(models.Pod5File)).all())}


def ledgerbc_script() -> list[str]:
    script = Path(sys.executable).with_name("ledgerbc")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ledgerbc.cli"]


def run_script(*args, prefix=(), cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *ledgerbc_script(), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)  # conftest.py removed the shell's LEDGERBC_*


def as_plain_user() -> list[str]:
    """A command prefix under which mode bits apply (root without DAC override), or skip."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without `setpriv` (util-linux): cannot make permission bits apply to root")
    return DROP_DAC


@pytest.fixture
def folders(tmp_path):
    """INPUT_DIR with two small real pod5 files; OUTPUT_DIR not yet created."""
    inp = tmp_path / "input"
    write_pod5(inp / "a.pod5", 3, seed=1)
    write_pod5(inp / "sub" / "b.pod5", 2, seed=2)
    return inp, tmp_path / "output"


# -- INPUT_DIR ------------------------------------------------------------------------------------------
def test_missing_input_dir(tmp_path):
    result = invoke("init", tmp_path / "nope", tmp_path / "out")
    assert_error(result, 3, "does not exist")
    assert not (tmp_path / "out").exists()


def test_input_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    assert_error(invoke("init", tmp_path / "file", tmp_path / "out"), 3, "not a folder")
    assert not (tmp_path / "out").exists()


def test_unreadable_input_dir(folders, tmp_path):
    inp, out = folders
    inp.chmod(0o000)
    try:
        proc = run_script("init", inp, out, prefix=as_plain_user())
    finally:
        inp.chmod(0o755)
    assert_error(proc, 3, "not readable")
    assert not out.exists()


# -- OUTPUT_DIR -----------------------------------------------------------------------------------------
def test_output_dir_under_a_regular_file(folders, tmp_path):
    inp, _ = folders
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder\n")
    assert_error(invoke("init", inp, blocker / "out"), 3, "OUTPUT_DIR", "Not a directory")
    assert blocker.read_text() == "a file, not a folder\n"


def test_output_dir_where_even_root_cannot_write(folders):
    inp, _ = folders
    target = Path("/proc/self/fdinfo")  # exists, is a folder, and procfs refuses new files to root too
    if not target.is_dir():
        pytest.skip("no procfs")
    assert_error(invoke("init", inp, target), 3, "OUTPUT_DIR", "not writable")


def test_output_dir_without_write_permission(folders, tmp_path):
    inp, _ = folders
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)
    proc = run_script("init", inp, locked, prefix=as_plain_user())
    assert_error(proc, 3, "OUTPUT_DIR", "not writable")
    assert list(locked.iterdir()) == []
    proc = run_script("init", inp, locked / "sub", prefix=as_plain_user())
    assert_error(proc, 3, "cannot create OUTPUT_DIR", "Permission denied")


# -- the ledger path --------------------------------------------------------------------------------------
def test_ledger_path_that_is_a_folder(folders, tmp_path):
    inp, out = folders
    folder = tmp_path / "ledger-folder"
    folder.mkdir()
    assert_error(invoke("init", inp, out, "--ledger", folder), 3, "is a folder")
    assert_error(invoke("status", "--ledger", folder), 3, "is a folder")
    assert_error(invoke("scan", "--ledger", folder), 3, "is a folder")
    assert list(folder.iterdir()) == []


NO_LEDGER = "Error: no ledger given. Pass --ledger PATH or set LEDGERBC_LEDGER (`ledgerbc init` prints the line)."
# The least each command needs besides its ledger; a command added later needs nothing more, or an entry here.
MINIMAL_ARGS = {"retry": ["--all-failed"], "submit": ["--tasks", "1"]}


def ledger_commands() -> list[str]:
    """Every command that works on an existing ledger (it has --ledger), init (which makes one) aside."""
    return sorted(name for name, command in cli.commands.items()
                  if name != "init" and any(p.name == "ledger_path" for p in command.params))


@pytest.mark.parametrize("command", ledger_commands())
def test_every_command_without_a_ledger_exits_4(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(command, *MINIMAL_ARGS.get(command, []))
    assert_error(result, 4)
    assert result.stderr == NO_LEDGER + "\n"
    assert list(tmp_path.iterdir()) == []


def test_ledger_that_does_not_exist(tmp_path):
    assert_error(invoke("status", "--ledger", tmp_path / "nope.db"), 4, "ledgerbc init")
    assert list(tmp_path.iterdir()) == []  # nothing created: neither a database nor a lock file


@pytest.mark.parametrize("content", [os.urandom(8192), b"SQLite format 3\0" + os.urandom(4080), b""],
                         ids=["random", "fake-header", "empty"])
def test_ledger_that_is_not_a_ledgerbc_sqlite_file(tmp_path, content):
    path = tmp_path / "ledgerbc.db"
    path.write_bytes(content)
    for command in ("status", "scan"):
        assert_error(invoke(command, "--ledger", path), 5, str(path))
    assert path.read_bytes() == content


# -- pod5 files that are not (yet) good -------------------------------------------------------------------
def test_a_file_named_pod5_that_is_not_pod5_is_failed_and_the_others_pending(folders):
    inp, out = folders
    (inp / "x.pod5").write_bytes(b"this is a text file, not pod5\n" * 100)
    signature = b"\x8bPOD\r\n\x1a\n"
    (inp / "y.pod5").write_bytes(signature + os.urandom(4096) + signature)  # looks complete, is not pod5
    result = invoke("init", inp, out)
    assert result.exit_code == 0, result.output
    assert "2 new pending" in result.stdout and "2 failed" in result.stdout
    r = rows(out / "ledgerbc.db")
    assert (r["a.pod5"].state, r["a.pod5"].read_count) == (models.PENDING, 3)
    assert (r["sub/b.pod5"].state, r["sub/b.pod5"].read_count) == (models.PENDING, 2)
    assert r["x.pod5"].state == models.FAILED and "no pod5 signature" in r["x.pod5"].last_error
    assert r["y.pod5"].state == models.FAILED and r["y.pod5"].last_error.startswith("pod5 cannot read it")

    data = json.loads(invoke("status", "--json", "--ledger", out / "ledgerbc.db").stdout)
    assert {f["path"]: f["error"] for f in data["failed"]} == {
        "x.pod5": r["x.pod5"].last_error, "y.pod5": r["y.pod5"].last_error}


def test_a_truncated_pod5_is_not_pending(folders):
    inp, out = folders
    truncate_copy(inp / "a.pod5", inp / "cut.pod5", keep_fraction=0.6)
    result = invoke("init", inp, out)
    assert result.exit_code == 0, result.output
    r = rows(out / "ledgerbc.db")
    assert r["cut.pod5"].state == models.FAILED and "signature" in r["cut.pod5"].last_error
    assert r["cut.pod5"].read_count is None
    assert r["a.pod5"].state == models.PENDING


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pod5's ReadRecord.to_read() uses deprecated fields
def test_a_pod5_still_being_written_is_admitted_only_once_complete(folders, tmp_path):
    inp, out = folders
    source = tmp_path / "source.pod5"
    write_pod5(source, 4, seed=5)
    with pod5.Reader(source) as reader:
        reads = [record.to_read() for record in reader.reads()]
    writer = pod5.Writer(inp / "live.pod5")
    try:
        writer.add_reads(reads)
        assert any(p.name.startswith(".") and ".tmp-" in p.name for p in inp.iterdir())  # as MinKNOW leaves it
        result = invoke("init", inp, out)
        assert result.exit_code == 0, result.output
        live = rows(out / "ledgerbc.db")["live.pod5"]
        assert live.state != models.PENDING and live.state == models.FAILED
        assert "ledgerbc retry" in live.last_error
    finally:
        writer.close()
    result = invoke("retry", "--all-failed", "--ledger", out / "ledgerbc.db")
    assert result.exit_code == 0, result.output
    live = rows(out / "ledgerbc.db")["live.pod5"]
    assert (live.state, live.read_count, live.last_error) == (models.PENDING, 4, None)


# -- schema ----------------------------------------------------------------------------------------------
def test_a_ledger_from_a_newer_ledgerbc_is_refused(folders):
    inp, out = folders
    assert invoke("init", inp, out).exit_code == 0
    path = out / "ledgerbc.db"
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    conn.close()
    before = digest(path)
    for command in ("status", "scan", "upgrade"):
        assert_error(invoke(command, "--ledger", path), 6, "9999", "newer")
    assert digest(path) == before


def test_an_old_ledger_names_the_upgrade_and_keeps_its_rows_through_it(tmp_path):
    path = tmp_path / "ledgerbc.db"
    shutil.copyfile(FIXTURES / "ledger-0001.db", path)
    before = digest(path)
    assert_error(invoke("status", "--ledger", path), 6, "0001", "ledgerbc upgrade")
    assert_error(invoke("scan", "--ledger", path), 6, "ledgerbc upgrade")
    assert digest(path) == before

    result = invoke("upgrade", "--ledger", path)
    assert result.exit_code == 0, result.output
    assert f"from schema 0001 to {schema.head_revision()}" in result.stdout
    backups = list(tmp_path.glob("ledgerbc.db.before-*"))
    assert len(backups) == 1 and digest(backups[0]) == before

    status = invoke("status", "--json", "--ledger", path)
    assert status.exit_code == 0, status.output
    data = json.loads(status.stdout)
    assert data["files"]["done"] == 1 and data["files"]["pending"] == 1 and data["files"]["failed"] == 1
    assert data["reads"]["pass"] == 4 and data["input_dir"] == "/data/study/pod5"
    r = rows(path)
    assert {rel: (x.state, x.read_count) for rel, x in r.items()} == {
        "run1/a.pod5": ("done", 4), "run1/b.pod5": ("pending", 7), "run1/c.pod5": ("failed", None)}
    assert r["run1/c.pod5"].last_error.startswith("not a complete pod5 file")
    again = invoke("upgrade", "--ledger", path)
    assert again.exit_code == 0 and "already at schema" in again.stdout


# -- init twice -------------------------------------------------------------------------------------------
def test_a_second_init_on_the_same_output_dir_changes_nothing(folders, tmp_path):
    inp, out = folders
    assert invoke("init", inp, out).exit_code == 0
    ledger, settings = out / "ledgerbc.db", out / "ledgerbc.settings.json"
    before = (digest(ledger), digest(settings))
    write_pod5(inp / "c.pod5", 1, seed=3)  # something a second scan would add
    assert_error(invoke("init", inp, out, "--batch-files", "7"), 8,
                 "already has a ledger", "ledgerbc scan")
    assert_error(invoke("init", inp, out, "--ledger", tmp_path / "elsewhere.db"), 8, "already has a ledger")
    assert (digest(ledger), digest(settings)) == before
    assert not (tmp_path / "elsewhere.db").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no leftover temp ledger


# -- the real console script ------------------------------------------------------------------------------
def test_console_script_errors_are_one_line(folders, tmp_path):
    inp, out = folders
    assert_error(run_script("init", tmp_path / "missing", out), 3, "does not exist")
    assert_error(run_script("status"), 4, "no ledger given")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(4096))
    assert_error(run_script("status", "--ledger", garbage), 5, "ledgerbc doctor")
    ok = run_script("init", inp, out)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[-1] == f"export LEDGERBC_LEDGER={out.resolve() / 'ledgerbc.db'}"
    assert_error(run_script("init", inp, out), 8, "already has a ledger")


# -- a wrong --ledger path: nothing is created beside it -------------------------------------------------------
@pytest.mark.parametrize("command", ["status", "doctor", "scan", "upgrade"])
@pytest.mark.parametrize("what,code", [("README.md", 5), ("folder", 3), ("missing.db", 4)])
def test_a_wrong_ledger_path_leaves_its_folder_as_it_was(command, what, code, tmp_path, monkeypatch):
    (tmp_path / "README.md").write_text("# a project\n")
    (tmp_path / "folder").mkdir()
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = invoke(command, "--ledger", what)
    assert result.exit_code == code, result.output
    if command != "doctor":  # doctor reports on every line, its verdict last
        assert_error(result, code)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_status_on_a_text_file_says_it_is_not_a_ledger(tmp_path, monkeypatch):
    (tmp_path / "README.md").write_text("# a project\n")
    monkeypatch.chdir(tmp_path)
    result = invoke("status", "--ledger", "README.md")
    assert_error(result, 5)
    assert result.stderr == (
        "Error: the ledger README.md is damaged or not a ledger (no SQLite header). Give the right --ledger, or run "
        "`ledgerbc doctor`, then `ledgerbc recover --rebuild --input DIR --output DIR`.\n")


def test_doctor_on_a_missing_ledger_still_checks_the_folder_and_leaves_nothing(tmp_path):
    result = invoke("doctor", "--ledger", tmp_path / "none.db")
    assert result.exit_code == 4
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [
        "ok    sqlite", "ok    mount", "ok    lock", "ok    clock", "FAIL  ledger"]
    assert list(tmp_path.iterdir()) == []


# -- bad option values and bad command lines: one line, exit 3 or 2 -------------------------------------------
BAD_VALUES = [
    (["init", "IN", "OUT", "--lease", "abc"],
     "Error: invalid value for --lease: 'abc' is not a duration. Write it like 90s, 15m or 2h."),
    (["init", "IN", "OUT", "--batch-size", "2X"],
     "Error: invalid value for --batch-size: '2X' is not a size. Write it like 20G or 500M."),
    (["init", "IN", "OUT", "--emit", "nope"],
     "Error: invalid value for --emit: 'nope' is not one of 'fastq', 'fastq.gz', 'bam'."),
    (["init", "IN", "OUT", "--max-attempts", "0"], "Error: invalid value for --max-attempts: 0 is too small. Give 1 or more."),
    (["init", "IN", "OUT", "--batch-files", "x"],
     "Error: invalid value for --batch-files: 'x' is not a whole number. Give one of at least 1, like 2."),
    (["init", "IN", "OUT", "--min-qscore", "high"], "Error: invalid value for --min-qscore: 'high' is not a valid float."),
    (["status", "--watch", "soon"],
     "Error: invalid value for --watch: 'soon' is not a duration. Write it like 90s, 15m or 2h."),
    (["run", "--idle-exit", "5 min"],
     "Error: invalid value for --idle-exit: '5 min' is not a duration. Write it like 90s, 15m or 2h."),
    (["run", "--max-batches", "0"], "Error: invalid value for --max-batches: 0 is too small. Give 1 or more."),
    (["run", "--log-level", "LOUD"],
     "Error: invalid value for --log-level: 'LOUD' is not one of 'DEBUG', 'INFO', 'WARNING', 'ERROR'."),
    (["submit", "--tasks", "0"], "Error: invalid value for --tasks: 0 is too small. Give 1 or more."),
    (["submit", "--tasks", "2", "--gpus-per-task", "-1"],
     "Error: invalid value for --gpus-per-task: -1 is too small. Give 0 or more."),
    (["demo", "--testdata", "nowhere"], "Error: invalid value for --testdata: Directory 'nowhere' does not exist."),
    (["demo", "--workers", "none"],
     "Error: invalid value for --workers: 'none' is not a whole number. Give one of at least 1, like 2."),
]


@pytest.mark.parametrize("args,line", BAD_VALUES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_VALUES])
def test_a_bad_option_value_is_one_line_exit_3(args, line, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    assert_error(result, 3)
    assert result.stderr == line + "\n"
    assert list(tmp_path.iterdir()) == []


def test_a_bad_value_from_the_environment_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("init", "IN", "OUT", env={"LEDGERBC_LEASE": "5x"})
    assert_error(result, 3)
    assert result.stderr == ("Error: invalid value for --lease (from LEDGERBC_LEASE): '5x' is not a duration. "
                             "Write it like 90s, 15m or 2h.\n")


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_an_unknown_option_is_one_line_exit_2_for_every_command(command):
    result = invoke(command, "--no-such-option")
    assert_error(result, 2)
    assert result.stderr == f"Error: no such option '--no-such-option'. See `ledgerbc {command} --help`.\n"


def test_usage_errors_are_one_line_exit_2():
    result = invoke("stauts")
    assert_error(result, 2)
    assert result.stderr == "Error: no such command 'stauts'. Did you mean 'status'? See `ledgerbc --help`.\n"
    result = invoke("submit", "--ledger", "x.db")
    assert_error(result, 2)
    assert result.stderr == "Error: missing option '--tasks' (env var: 'LEDGERBC_TASKS'). See `ledgerbc submit --help`.\n"
    result = invoke("init")
    assert_error(result, 2)
    assert result.stderr == "Error: missing argument 'INPUT_DIR'. See `ledgerbc init --help`.\n"
