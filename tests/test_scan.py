"""Admitting pod5 files (scan.py): what is never scanned, duplicates, idempotence, hostile names.

Every pod5 here is real, written by `pod5.Writer` (ledgerbc.testkit.synth) or copied from the ONT test data.
"""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pod5
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from ledgerbc import models, status
from ledgerbc.cli import cli
from ledgerbc.create import init_ledger
from ledgerbc.db import Ledger
from ledgerbc.scan import Scanner
from ledgerbc.settings import Settings
from ledgerbc.testkit.synth import HOSTILE_NAMES, make_dataset, write_pod5


def rows_by_rel(ledger) -> dict:
    return {r.rel_path: r for r in ledger.transact(lambda c: c.execute(sa.select(models.Pod5File)).all())}


def pod5_facts(path: Path) -> tuple[int, str]:
    with pod5.Reader(path) as reader:
        return reader.num_reads, str(reader.file_identifier)


def init(input_dir: Path, output_dir: Path):
    ledger_path, report, _warnings = init_ledger(Settings(input_dir=str(input_dir), output_dir=str(output_dir)))
    return Ledger(ledger_path), report


def test_hidden_files_writer_temporaries_and_the_output_tree_are_never_scanned(tmp_path):
    inp = tmp_path / "input"
    write_pod5(inp / "a.pod5", 3, seed=1)
    write_pod5(inp / "sub" / "c.pod5", 2, seed=2)
    # Each of these is a complete, readable pod5: only its name or place keeps it out.
    write_pod5(inp / ".hidden.pod5", 2, seed=3)
    write_pod5(inp / "sub" / "._c.pod5", 2, seed=4)  # macOS AppleDouble name
    write_pod5(inp / f".{uuid.uuid4()}.tmp-reads.pod5", 2, seed=5)  # MinKNOW/pod5 writer temporary
    (inp / f".{uuid.uuid4()}.tmp-run-info").write_bytes(b"\0" * 64)
    write_pod5(inp / ".cache" / "d.pod5", 2, seed=6)  # hidden folder
    out = inp / "output"  # OUTPUT_DIR inside INPUT_DIR
    write_pod5(out / "stray.pod5", 2, seed=7)

    ledger, report = init(inp, out)
    assert set(rows_by_rel(ledger)) == {"a.pod5", "sub/c.pod5"}
    assert (report.seen, report.added) == (2, 2)

    # The work tree of a running batch (links to inputs) and more stray files: still never scanned.
    assigned = out / "work" / "ASSIGNED_1_w1"
    assigned.mkdir(parents=True)
    (assigned / "00000_a.pod5").symlink_to(inp / "a.pod5")
    write_pod5(out / "pass" / "x.pod5", 1, seed=8)
    report = Scanner(ledger, ledger.read_settings()).scan()
    assert (report.seen, report.added) == (2, 0)
    assert set(rows_by_rel(ledger)) == {"a.pod5", "sub/c.pod5"}


def test_duplicates_by_file_identifier_are_recorded_and_shown_by_status(tmp_path):
    inp = tmp_path / "input"
    write_pod5(inp / "run1" / "a.pod5", 4, seed=1)
    write_pod5(inp / "run1" / "b.pod5", 2, seed=2)
    (inp / "run2").mkdir()
    shutil.copyfile(inp / "run1" / "a.pod5", inp / "run2" / "a.pod5")
    shutil.copyfile(inp / "run1" / "a.pod5", inp / "run2" / "a-copy.pod5")

    ledger, report = init(inp, tmp_path / "output")
    rows = rows_by_rel(ledger)
    original = rows["run1/a.pod5"]
    assert (original.state, original.read_count) == (models.PENDING, 4)
    for rel in ("run2/a.pod5", "run2/a-copy.pod5"):
        dup = rows[rel]
        assert (dup.state, dup.duplicate_of, dup.file_identifier) == (
            models.DUPLICATE, original.id, pod5_facts(inp / rel)[1])
    assert rows["run1/b.pod5"].state == models.PENDING
    assert (report.added, report.duplicates) == (2, 2)

    # A copy that arrives later is a duplicate too.
    shutil.copyfile(inp / "run1" / "b.pod5", inp / "late-b.pod5")
    assert Scanner(ledger, ledger.read_settings()).scan().duplicates == 1
    assert rows_by_rel(ledger)["late-b.pod5"].duplicate_of == rows["run1/b.pod5"].id

    data = status.report(ledger)
    assert data["files"]["duplicate"] == 3 and data["files"]["pending"] == 2
    assert sorted((d["path"], d["same_as"]) for d in data["duplicates"]) == [
        ("late-b.pod5", "run1/b.pod5"), ("run2/a-copy.pod5", "run1/a.pod5"), ("run2/a.pod5", "run1/a.pod5")]
    assert data["reads"]["total"] == 4 + 2  # a duplicate's reads are not counted twice
    text = CliRunner().invoke(cli, ["status", "--ledger", str(ledger.path)])
    assert text.exit_code == 0, text.output
    assert "duplicates (3)" in text.stdout and "run2/a-copy.pod5  = run1/a.pod5" in text.stdout


def test_a_second_scan_is_idempotent(tmp_path):
    inp = tmp_path / "input"
    make_dataset(inp, 8, seed=3, hostile_names=False, size_spread=False)
    (inp / "junk.pod5").write_bytes(b"not a pod5 file")
    ledger, first = init(inp, tmp_path / "output")
    before = rows_by_rel(ledger)
    assert (first.added, first.failed) == (8, 1)

    again = Scanner(ledger, ledger.read_settings()).scan()
    assert (again.seen, again.added, again.duplicates, again.failed, again.unchanged) == (9, 0, 0, 0, 9)
    assert rows_by_rel(ledger) == before

    result = CliRunner().invoke(cli, ["scan", "--ledger", str(ledger.path)])
    assert result.exit_code == 0 and "0 new pending" in result.stdout
    assert rows_by_rel(ledger) == before

    write_pod5(inp / "new" / "late.pod5", 5, seed=9)  # a new file is picked up, once
    assert Scanner(ledger, ledger.read_settings()).scan().added == 1
    assert Scanner(ledger, ledger.read_settings()).scan().added == 0
    assert rows_by_rel(ledger)["new/late.pod5"].read_count == 5


def test_hostile_names_are_recorded_with_their_exact_relative_paths(tmp_path):
    inp = tmp_path / "input"
    dataset = make_dataset(inp, len(HOSTILE_NAMES) + 2, seed=7)
    ledger, report = init(inp, tmp_path / "output")
    rows = rows_by_rel(ledger)
    assert set(rows) == set(dataset)
    assert set(HOSTILE_NAMES) <= set(rows)
    for rel, read_ids in dataset.items():
        count, identifier = pod5_facts(inp / rel)
        assert (rows[rel].state, rows[rel].read_count, rows[rel].file_identifier) == (
            models.PENDING, count, identifier)
        assert count == len(read_ids)
    assert report.added == len(dataset)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


@pytest.mark.parametrize("name", ["._x.pod5", ".x.pod5"])
def test_a_hidden_name_alone_in_a_folder_is_not_a_file_to_scan(tmp_path, name):
    inp = tmp_path / "input"
    write_pod5(inp / "deep" / name, 1, seed=1)
    ledger, report = init(inp, tmp_path / "output")
    assert rows_by_rel(ledger) == {} and report.seen == 0
