"""`ledgerbc init` on a copy of the real ONT pod5 files: every file recorded with the read count the
`pod5` library reports (and ../shared/testdata/real-pod5.tsv lists), and `status --json` agrees.

Three ways in: the CLI in-process (CliRunner), the installed console script of this environment, and
(with LEDGERBC_TEST_FRESH_VENV=1) a brand-new venv where `pip install .` is run first.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pod5
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from ledgerbc import models
from ledgerbc.cli import cli
from ledgerbc.db import Ledger

REPO = Path(__file__).resolve().parents[1]
TESTDATA = REPO.parent / "shared" / "testdata"
REAL_POD5 = TESTDATA / "real-pod5"
REAL_TSV = TESTDATA / "real-pod5.tsv"


def listed() -> dict[str, dict]:
    """real-pod5.tsv: {path: {reads, file_identifier, bytes}}."""
    with open(REAL_TSV, newline="", encoding="utf-8") as fh:
        return {
            row["path"]: {"reads": int(row["reads"]), "file_identifier": row["file_identifier"],
                          "bytes": int(row["bytes"])}
            for row in csv.DictReader(fh, delimiter="\t")
        }


@pytest.fixture
def real_input(tmp_path) -> Path:
    """A writable copy of the real pod5 files (the shared copy is read-only)."""
    if not REAL_TSV.exists():
        pytest.fail(f"missing test data {REAL_TSV}")
    dest = tmp_path / "input"
    shutil.copytree(REAL_POD5, dest, copy_function=shutil.copyfile)
    for folder in [dest, *(p for p in dest.rglob("*") if p.is_dir())]:
        folder.chmod(0o755)
    return dest


def clean_env(**extra) -> dict:
    return dict(os.environ, **{k: str(v) for k, v in extra.items()})  # conftest.py removed the shell's LEDGERBC_*


def check_ledger_against_pod5(ledger_path: Path, input_dir: Path) -> dict:
    """Every input file is in the ledger with the pod5 library's read count and identifier, and its size;
    one file per identifier is pending, the others are its duplicates. Returns the rows by path."""
    expected = listed()
    on_disk = {p.relative_to(input_dir).as_posix() for p in input_dir.rglob("*.pod5")}
    assert on_disk == set(expected), "the test data changed: real-pod5.tsv no longer lists every file"
    rows = {r.rel_path: r for r in Ledger(ledger_path).transact(lambda c: c.execute(sa.select(models.Pod5File)).all())}
    assert set(rows) == set(expected)
    for rel, row in rows.items():
        with pod5.Reader(input_dir / rel) as reader:
            reads, identifier = reader.num_reads, str(reader.file_identifier)
        assert (row.read_count, row.file_identifier) == (reads, identifier), rel
        assert (reads, identifier, row.size) == (expected[rel]["reads"], expected[rel]["file_identifier"],
                                                 expected[rel]["bytes"]), rel
    groups = defaultdict(list)
    for row in rows.values():
        groups[row.file_identifier].append(row)
    for group in groups.values():
        originals = [r for r in group if r.state == models.PENDING]
        assert len(originals) == 1, [r.rel_path for r in group]
        for r in group:
            if r is not originals[0]:
                assert (r.state, r.duplicate_of) == (models.DUPLICATE, originals[0].id)
    return rows


def check_status_agrees(data: dict, rows: dict) -> None:
    states = Counter(r.state for r in rows.values())
    assert data["files"] == {**{s: states.get(s, 0) for s in models.FILE_STATES}, "total": len(rows)}
    assert data["bytes"]["total"] == sum(r.size for r in rows.values())
    assert data["bytes"]["remaining"] == sum(r.size for r in rows.values() if r.state == models.PENDING)
    assert data["reads"]["total"] == sum(r.read_count for r in rows.values() if r.state != models.DUPLICATE)
    assert data["reads"]["out"] == 0 and data["bases_done"] == 0
    by_id = {r.id: r.rel_path for r in rows.values()}
    dups = sorted((r.rel_path, by_id[r.duplicate_of]) for r in rows.values() if r.state == models.DUPLICATE)
    assert sorted((d["path"], d["same_as"]) for d in data["duplicates"]) == dups
    assert data["failed"] == [] and data["running_batches"] == []


def test_init_records_every_real_file_with_its_pod5_read_count(real_input, tmp_path):
    out = tmp_path / "output"
    result = CliRunner().invoke(cli, ["init", str(real_input), str(out)])
    assert result.exit_code == 0, result.output
    rows = check_ledger_against_pod5(out / "ledgerbc.db", real_input)
    n_dup = sum(r.state == models.DUPLICATE for r in rows.values())
    summary = f"{len(rows)} pod5 files seen: {len(rows) - n_dup} new pending, {n_dup} duplicates, 0 failed"
    assert summary in result.stdout
    for folder in ("pass", "fail", "work", "logs"):
        assert (out / folder).is_dir()

    status = CliRunner().invoke(cli, ["status", "--json"], env={"LEDGERBC_LEDGER": str(out / "ledgerbc.db")})
    assert status.exit_code == 0, status.output
    data = json.loads(status.stdout)
    check_status_agrees(data, rows)
    assert (data["input_dir"], data["output_dir"]) == (str(real_input.resolve()), str(out.resolve()))


def installed_script(bin_dir: Path) -> Path:
    script = bin_dir / "ledgerbc"
    if not script.exists():
        pytest.skip(f"no installed `ledgerbc` console script beside {sys.executable}: pip install the package")
    return script


def run_init_and_status(script: Path, real_input: Path, out: Path, cwd: Path) -> None:
    init = subprocess.run([str(script), "init", str(real_input), str(out)], capture_output=True, text=True,
                          env=clean_env(), cwd=cwd, timeout=300)
    assert init.returncode == 0, init.stderr
    export = init.stdout.splitlines()[-1]
    assert export.startswith("export LEDGERBC_LEDGER=")
    ledger_path = out.resolve() / "ledgerbc.db"
    assert export == f"export LEDGERBC_LEDGER={ledger_path}"
    rows = check_ledger_against_pod5(ledger_path, real_input)
    status = subprocess.run([str(script), "status", "--json"], capture_output=True, text=True,
                            env=clean_env(LEDGERBC_LEDGER=ledger_path), cwd=cwd, timeout=120)
    assert status.returncode == 0, status.stderr
    check_status_agrees(json.loads(status.stdout), rows)


def test_console_script_init_then_status_json(real_input, tmp_path):
    """The console script this environment installed, run from outside the checkout."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    run_init_and_status(installed_script(Path(sys.executable).parent), real_input, tmp_path / "output", cwd)


@pytest.mark.skipif(os.environ.get("LEDGERBC_TEST_FRESH_VENV") != "1",
                    reason="set LEDGERBC_TEST_FRESH_VENV=1 to build a new venv and `pip install .` into it (~25 s)")
def test_fresh_venv_pip_install_then_init(real_input, tmp_path):
    source = tmp_path / "src"  # install from a copy: the build leaves nothing in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "demo-run"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          str(source)], capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import ledgerbc; print(ledgerbc.__file__)"],
                           capture_output=True, text=True, cwd=cwd, check=True).stdout.strip()
    assert Path(where).is_relative_to(venv), f"ledgerbc imported from {where}, not the new venv"
    run_init_and_status(venv / "bin" / "ledgerbc", real_input, tmp_path / "output", cwd)
