"""Barcoded studies (DESIGN §2, §3, §5; issue 13): `init --kit-name KIT [--sample-sheet CSV]`, dorado told to
classify while it basecalls, outputs per barcode, the per-read summary the QC tools read, yields per barcode
in the ledger and in `status`.

The stand-in dorado classifies each record by its read id (`testkit.dorado.barcode_for`): the tests know
which `<barcode>` folder every read must end in.
"""
from __future__ import annotations

import datetime
import json
import shutil
import sqlite3
from collections import Counter
from pathlib import Path

import pysam
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from helpers import (
    Study, assert_work_tree_clean, check_outputs, collect_outputs, files_by_rel, query, read_summary,
)
from ledgerbc import db, dorado, models, split, status
from ledgerbc.batch import installer_for
from ledgerbc.cli import cli
from ledgerbc.layout import SUMMARY_COLUMNS, Layout
from ledgerbc.settings import SAMPLE_SHEET_COPY, Settings
from ledgerbc.testkit.synth import make_dataset

KIT = "SQK-NBD114-24"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# synth.py's run info: flow cell PAS00000, position 1A, experiment ledgerbc-synthetic.
SHEET = ("flow_cell_id,position_id,experiment_id,kit,barcode,alias\n"
         f"PAS00000,1A,ledgerbc-synthetic,{KIT},barcode01,patient_A\n"
         f"PAS00000,1A,ledgerbc-synthetic,{KIT},barcode02,patient_B\n"
         f"PAS00000,1A,ledgerbc-synthetic,{KIT},barcode04,barcode04_kept\n")
ALIASES = {"barcode01": "patient_A", "barcode02": "patient_B", "barcode04": "barcode04_kept"}


def init(tmp_path, *options, input_dir=None):
    input_dir = input_dir or tmp_path / "in"
    input_dir.mkdir(exist_ok=True)
    return CliRunner().invoke(cli, ["init", str(input_dir), str(tmp_path / "out"), *map(str, options)])


# -- init ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kit, hint", [("sqk-nbd114-24", "case-sensitive: SQK-NBD114-24"), ("SQK-NOPE-96", "")])
def test_init_refuses_a_kit_dorado_does_not_know_and_creates_nothing(tmp_path, kit, hint):
    result = init(tmp_path, "--kit-name", kit)
    assert result.exit_code == 3, result.output
    line = result.stderr.strip()
    assert line.startswith(f"Error: --kit-name '{kit}' is not a barcode kit dorado knows") and hint in line
    assert "\n" not in line and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_init_lists_every_problem_of_the_sample_sheet_one_per_line_and_creates_nothing(tmp_path):
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("flow_cell_id,experiment_id,kit,barcode,alias,colour\n"
                     f"PAS00000,exp,{KIT},barcode01,barcode07\n"
                     f"PAS00000,exp,{KIT},barcode02,unclassified,red\n"
                     f"PAS00000,other,{KIT},barcode03,has space,red\n")
    result = init(tmp_path, "--kit-name", KIT, "--sample-sheet", sheet)
    assert result.exit_code == 3, result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"Error: the sample sheet {sheet} has 5 problem(s) dorado would refuse it for")
    assert lines[1:] == [f"Error: {line}" for line in [
        f"{sheet}:1: invalid column 'colour' (allowed: protocol_run_id, flow_cell_id, position_id, sample_id, "
        "experiment_id, flow_cell_product_code, kit, alias, type, barcode)",
        f"{sheet}:2: 5 fields, the header has 6",
        f"{sheet}:3: alias 'unclassified' is forbidden (it looks like a barcode name or 'unclassified')",
        f"{sheet}:4: experiment_id 'other' differs from 'exp' (a sample sheet holds one experiment)",
        f"{sheet}:4: alias 'has space' is not valid (at most 40 characters, letters, digits, '-' and '_')",
    ]]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--dorado-arg", "--kit-name", "--dorado-arg", KIT], "--dorado-arg --kit-name is refused: it would break "
     "ledgerbc's contract or is ledgerbc's own option. Use `ledgerbc init --kit-name KIT` (outputs per barcode)"),
    (["--dorado-arg=--sample-sheet=s.csv", "--kit-name", KIT], "--dorado-arg --sample-sheet=s.csv is refused"),
    (["--sample-sheet", "s.csv"], "--sample-sheet needs --kit-name"),
])
def test_barcoding_options_only_through_init_and_a_sheet_only_with_a_kit(tmp_path, args, message):
    result = init(tmp_path, *args)
    assert result.exit_code == 3, result.output
    assert result.stderr.startswith(f"Error: {message}") and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_init_keeps_its_own_copy_of_the_sheet_and_dorado_is_told_kit_and_copy(tmp_path):
    sheet = tmp_path / "mine.csv"
    sheet.write_text(SHEET.replace(KIT, "SQK-NBD114-96", 1))  # dorado ignores the kit column: a warning
    result = init(tmp_path, "--kit-name", KIT, "--sample-sheet", sheet)
    assert result.exit_code == 0, result.output
    assert f"Warning: {sheet}:2: kit 'SQK-NBD114-96' is not --kit-name '{KIT}'" in result.stderr
    copy = tmp_path / "out" / SAMPLE_SHEET_COPY
    assert copy.read_bytes() == sheet.read_bytes()
    sheet.unlink()  # workers and rebuilds never read the user's file
    settings = db.Ledger(tmp_path / "out" / "ledgerbc.db").read_settings()
    assert (settings.kit_name, settings.sample_sheet, settings.sample_sheet_path) == (KIT, SAMPLE_SHEET_COPY, copy)
    assert json.loads((tmp_path / "out" / "ledgerbc.settings.json").read_text())["sample_sheet"] == SAMPLE_SHEET_COPY
    argv = dorado.build_argv(settings, tmp_path / "out" / "work" / "ASSIGNED_1_w", "cuda:0", "/opt/dorado")
    assert argv == ["/opt/dorado", "basecaller", "hac", str(tmp_path / "out" / "work" / "ASSIGNED_1_w"),
                    "--device", "cuda:0", "--kit-name", KIT, "--sample-sheet", str(copy)]
    unbarcoded = Settings(input_dir="i", output_dir="o")
    assert "--kit-name" not in dorado.build_argv(unbarcoded, Path("a"), None)


# -- the splitter --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bc, folder", [
    (None, "unclassified"), ("unclassified", "unclassified"),  # basecaller: no tag; dorado demux: the word
    (f"{KIT}_barcode07", "barcode07"), (f"{KIT.lower()}_barcode07", "barcode07"),  # kit compared in any case
    ("patient_A", "patient_A"), (f"{KIT}-x_barcode07", f"{KIT}-x_barcode07"),  # aliases as they are
    ("../../etc", ".._.._etc"), ("a/b", "a_b"), ("..", "__"),  # never a folder outside pass/ or fail/
])
def test_barcode_folder_of_a_bc_value(bc, folder):
    assert split.barcode_folder(bc, KIT) == folder


def record_with(header, **tags):
    r = pysam.AlignedSegment(header)
    r.query_name, r.flag, r.query_sequence = "read-1", 4, "ACGTACGT"
    r.query_qualities = pysam.qualitystring_to_array("IIIIIIII")
    r.set_tags([(k, v) for k, v in tags.items()])
    return r


def test_summary_line_from_dorado_tags_and_read_groups():
    header = pysam.AlignmentHeader.from_text(
        "@HD\tVN:1.6\n"
        "@RG\tID:run9_dna_hac@v5.0.0\tDT:2024-01-01T00:00:00.000+00:00\tDS:basecall_model=dna_hac@v5.0.0 runid=run9\n"
        "@RG\tID:run8_m\tDS:runid=run8 acquisition_start_time=2024-01-01T10:00:00Z\n")
    groups = split._ReadGroups(header.to_dict())
    # dorado 1.4 may tag a record with a barcode read group its header does not list: the run's is found.
    r = record_with(header, RG="run9_dna_hac@v5.0.0_patient_A", ch=12, mx=3, st="2024-01-01T00:01:40.5+00:00",
                    du=1.25, ns=6250, pi="parent-1")
    line = split.summary_line(r, "a\tb.pod5", groups.run_of(r), True, 12.5, "patient_A")
    assert line == ("a\\tb.pod5\tread-1\tparent-1\trun9\t12\t3\t100.500000\t1.250000\tTRUE\t8\t12.500000\t6250"
                    "\tpatient_A\n")
    r = record_with(header, RG="run8_m", ch=1, mx=1, st="2024-01-01T10:00:02", du=0.5, ns=10)  # no zone: UTC
    assert split.summary_line(r, "x.pod5", groups.run_of(r), False, 3.0, "unclassified").split("\t")[2:9] == [
        "read-1", "run8", "1", "1", "2.000000", "0.500000", "FALSE"]
    unknown = record_with(header, RG="run7_other", ch=1, mx=1, st="2024-01-01T10:00:02Z")
    assert groups.run_of(unknown) == ("run7", None)  # no start known: start_time left empty
    assert split.summary_line(unknown, "x.pod5", groups.run_of(unknown), True, 9.0, "unclassified").split("\t")[6] == ""


def test_an_unbarcoded_publication_never_takes_another_inputs_output_for_a_stale_one(tmp_path):
    """Flat study: pass/a/x.fastq is the output of input a/x.pod5, never a barcode folder of x.pod5."""
    layout = Layout(tmp_path / "out")
    other = layout.pass_path("a/x.pod5", "fastq")
    other.parent.mkdir(parents=True)
    other.write_text("@r\nA\n+\nI\n")
    staged = tmp_path / "staging" / "pass" / "x.fastq"
    staged.parent.mkdir(parents=True)
    staged.write_text("")
    out = split.FileOutput("00000_x.pod5", "x.pod5")
    out.written[("pass", None)] = split.Written("pass", None, "pass/x.fastq", staged)
    result = split.SplitResult({"00000_x.pod5": out}, {}, 0)

    class Claimed:
        rel = "x.pod5"

    installer = installer_for(layout, "fastq", result, {"x.pod5"}, {"00000_x.pod5": Claimed()})
    assert installer.stale == []
    installer.run()
    assert other.read_text() == "@r\nA\n+\nI\n" and layout.pass_path("x.pod5", "fastq").exists()


# -- barcoded runs -------------------------------------------------------------------------------------
def concatenated_summaries(output: Path, into: Path) -> int:
    """One header and the data lines of every summary/<rel>.tsv (what finalize's sequencing_summary.txt is)."""
    rows = 0
    with open(into, "w", encoding="utf-8") as out:
        out.write("\t".join(SUMMARY_COLUMNS) + "\n")
        for path in sorted((output / "summary").rglob("*.tsv")):
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            out.writelines(lines[1:])
            rows += len(lines) - 1
    return rows


def output_rows(ledger) -> list:
    o, f = models.Output, models.Pod5File
    return query(ledger, sa.select(f.rel_path, o.kind, o.barcode, o.path, o.reads, o.bases, o.bytes)
                 .join(f, f.id == o.file_id))


def check_ledger_counts(study: Study, outputs) -> None:
    """The `outputs` rows are the files on disk (reads, bases, size), one per file; summaries one row per record."""
    rows = output_rows(study.ledger)
    assert len({r.path for r in rows}) == len(rows), "an output recorded twice"
    on_disk = {p.relative_to(study.output).as_posix() for kind in ("pass", "fail", "summary")
               for p in (study.output / kind).rglob("*") if p.is_file()}
    assert {r.path for r in rows} == on_disk
    for r in rows:
        assert (study.output / r.path).stat().st_size == r.bytes, r.path
        if r.kind == "summary":
            assert (r.barcode, r.reads) == (None, len(read_summary(study.output / r.path))), r.path
        else:
            records = outputs.files[(r.kind, r.barcode, r.rel_path)]
            assert (r.reads, r.bases) == (len(records), sum(len(x.sequence) for x in records)), r.path


def check_status(study: Study, outputs, aliases: dict[str, str]) -> dict:
    """status --json and the text table give the yields per barcode folder that the outputs hold."""
    data = study.status()
    assert data["schema"] == "ledgerbc.status/2"
    section = data["barcoding"]
    per = Counter()
    files = Counter()
    for (kind, barcode, _rel), records in outputs.files.items():
        per[(barcode, kind)] += len(records)
        files[barcode] += kind == "pass"
    reported = {e["barcode"]: e for e in section["barcodes"]}
    assert set(reported) == {b for b, _k in per}
    for barcode, e in reported.items():
        assert (e["reads"]["pass"], e["reads"]["fail"], e["files"]) == (per[(barcode, "pass")], per[(barcode, "fail")],
                                                                        files[barcode])
        assert e["kit_barcode"] == ({v: k for k, v in aliases.items()}.get(barcode) or
                                    (barcode if barcode.startswith("barcode") and barcode[7:].isdigit() else None))
    total = sum(per.values())
    assert section["reads"] == total == data["reads"]["out"]
    assert section["unclassified_fraction"] == round(sum(n for (b, _k), n in per.items() if b == "unclassified") / total, 4)
    assert 0.03 < section["unclassified_fraction"] < 0.6
    assert [e["barcode"] for e in section["barcodes"]][-1] == "unclassified"
    text = study.cli("status", "--ledger", study.ledger_path).stdout
    assert f"barcodes: kit {KIT}" in text and f"unclassified {section['unclassified_fraction']:.1%}" in text
    for barcode in reported:
        assert f"\n  {barcode} " in text
    return section


def read_with_pysam(path: Path) -> list[str]:
    """Read ids of an output, read by pysam (BAM, FASTQ, gzipped FASTQ)."""
    if path.name.endswith(".bam"):
        with pysam.AlignmentFile(str(path), "rb", check_sq=False) as bam:
            return [r.query_name for r in bam]
    with pysam.FastxFile(str(path)) as fastx:
        return [entry.name for entry in fastx]


@pytest.fixture(scope="module", params=[("fastq.gz", False), ("bam", True)], ids=["kit", "kit+sheet"])
def barcoded_run(request, tmp_path_factory):
    """24 synthetic files (hostile names, a split read) basecalled by 3 workers with --kit-name (and a sample
    sheet naming aliases, deleted once init has its copy), --min-qscore 10, in fastq.gz or bam."""
    emit, with_sheet = request.param
    study = Study(tmp_path_factory.mktemp("barcoded"))
    try:
        make_dataset(study.input, 24, seed=13, hostile_names=True, size_spread=True)
        options = ["--batch-files", 4, "--min-qscore", 10, "--emit", emit, "--kit-name", KIT]
        if with_sheet:
            sheet = study.root / "samples.csv"
            sheet.write_text(SHEET)
            options += ["--sample-sheet", sheet]
        study.init(*options)
        if with_sheet:
            sheet.unlink()  # the workers use init's copy
        # Reads over 50,000 samples are split by the stand-in (a few per run): pieces are classified on their own.
        workers = [study.start_worker(f"w{i}", LEDGERBC_SIM_SPLIT_SAMPLES=50_000) for i in range(3)]
        codes = study.wait_workers(workers, timeout=180)
        assert codes == {"w0": 0, "w1": 0, "w2": 0}, {w: study.worker_log(w)[-2000:] for w in codes}
        yield study, emit, ALIASES if with_sheet else {}
    finally:
        study.close()


@pytest.mark.slow
def test_a_barcoded_run_of_three_workers_puts_every_read_in_its_barcode_folder_once(barcoded_run):
    study, emit, aliases = barcoded_run
    assert {r.state for r in files_by_rel(study.ledger).values()} == {models.DONE}
    # Every read in exactly one pass|fail/<barcode>/<rel> output: the folder its stand-in barcode says; every
    # input's summary lists exactly its output records.
    outputs = check_outputs(study, emit, min_qscore=10)
    folders = {barcode for _kind, barcode, _rel in outputs.files}
    if aliases:
        # Listed barcodes under their aliases; every barcode the sheet does not list is unclassified.
        assert folders == set(aliases.values()) | {"unclassified"}
    else:
        assert "unclassified" in folders and len(folders - {"unclassified"}) >= 5
        assert all(b.startswith("barcode") for b in folders - {"unclassified"})
    assert outputs.n_fail > 0 and any(kind == "fail" for kind, _b, _r in outputs.files)
    assert any("pi" in r.tags for records in outputs.files.values() for r in records)  # a split read
    check_ledger_counts(study, outputs)
    for (kind, barcode, rel), records in outputs.files.items():
        path = study.output / kind / barcode / (rel[: -len("pod5")] + emit)
        assert read_with_pysam(path) == [r.read_id for r in records]
    check_status(study, outputs, aliases)
    assert_work_tree_clean(study)


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["pycoqc", "nanoplot"])
def test_pycoqc_and_nanoplot_read_the_concatenated_summaries_unchanged(barcoded_run, request, tool):
    study, _emit, _aliases = barcoded_run
    run = request.getfixturevalue(tool)  # tests/clients.py: the real tool (skips where it is missing, not in CI)
    out = study.root / f"{tool}-{request.node.callspec.id}"
    out.mkdir()
    summary = out / "sequencing_summary.txt"
    outputs = collect_outputs(study.output, _emit, barcoded=True)
    assert concatenated_summaries(study.output, summary) == outputs.n_pass + outputs.n_fail
    if tool == "pycoqc":  # its pass/fail is mean_qscore >= --min_pass_qual: ledgerbc's --min-qscore
        proc = run(summary, out / "pycoqc.html", "--min_pass_qual", "10")
        assert proc.returncode == 0 and (out / "pycoqc.html").stat().st_size > 0
    else:
        proc = run(summary, out / "all")
        assert proc.returncode == 0 and (out / "all" / "NanoPlot-report.html").is_file()
        proc = run(summary, out / "barcoded", "--barcoded")  # one report per barcode_arrangement value
        barcodes = {barcode for _k, barcode, _r in outputs.files}
        reports = {p.name.split("_NanoPlot-report.html")[0] for p in (out / "barcoded").glob("*_NanoPlot-report.html")}
        assert proc.returncode == 0 and reports and reports <= barcodes  # those of 5 reads or more


# -- an old ledger ----------------------------------------------------------------------------------------
def test_a_frozen_old_ledger_after_upgrade_reports_status_2_unbarcoded(tmp_path):
    path = tmp_path / "ledgerbc.db"
    shutil.copyfile(FIXTURES / "ledger-0001.db", path)
    result = CliRunner().invoke(cli, ["upgrade", "--ledger", str(path)])
    assert result.exit_code == 0, result.output
    data = status.report(db.Ledger(path))
    assert data["schema"] == "ledgerbc.status/2"
    assert data["barcoding"] == {"kit_name": None, "sample_sheet": None, "barcodes": [], "reads": 0,
                                 "unclassified_reads": 0, "unclassified_fraction": None}
    assert (data["files"]["done"], data["reads"]["pass"]) == (1, 4)  # every /1 field still there
    assert "barcodes:" not in status.render(data)


def test_a_study_begun_before_summaries_upgrades_and_its_workers_split_and_summarise(study):
    """A ledger of schema 0002 (the release before outputs, summaries and barcodes) with files scanned by
    it and a file published by it (pass/ only, no summary): after `ledgerbc upgrade`, workers publish the
    rest with summaries, and status reports it as the unbarcoded study it stays."""
    reads = make_dataset(study.input, 6, seed=4, hostile_names=False, size_spread=False)
    study.init("--batch-files", 2)
    ledger_path = study.ledger_path
    # Rewind it to what ledgerbc 0002 wrote: schema 0002, settings without the keys learnt since, and one
    # file published the old way.
    first = sorted(reads)[0]
    (study.output / "pass" / (first[: -len(".pod5")] + ".fastq")).parent.mkdir(parents=True, exist_ok=True)
    (study.output / "pass" / (first[: -len(".pod5")] + ".fastq")).write_text("")
    settings = db.Ledger(ledger_path).read_settings()
    old = ledger_path.with_name("old.db")
    db.create_ledger_file(old, settings, revision="0002")
    src, dst = sqlite3.connect(ledger_path), sqlite3.connect(old)
    with dst:
        dst.execute("DELETE FROM settings WHERE key IN ('kit_name', 'sample_sheet', 'dorado_version', "
                    "'allow_dorado_upgrade')")
        for row in src.execute("SELECT rel_path, size, mtime_ns, read_count, file_identifier, added_at "
                               "FROM pod5_files ORDER BY id"):
            dst.execute("INSERT INTO pod5_files (rel_path, size, mtime_ns, read_count, file_identifier, state, "
                        "attempts, added_at) VALUES (?, ?, ?, ?, ?, 'pending', 0, ?)", row)
        dst.execute("UPDATE pod5_files SET state = 'done', reads_pass = 0, reads_fail = 0, done_at = added_at "
                    "WHERE rel_path = ?", (first,))
    src.close()
    dst.close()
    old.replace(ledger_path)
    assert "ledgerbc upgrade" in study.cli("status", "--ledger", ledger_path, check=False).stderr

    study.cli("upgrade", "--ledger", ledger_path, check=True)
    worker = study.start_worker("w1")
    assert study.wait_workers([worker], timeout=120) == {"w1": 0}, study.worker_log("w1")
    rows = files_by_rel(study.ledger)
    assert {r.state for r in rows.values()} == {models.DONE}
    assert not (study.output / "summary" / (first[: -len(".pod5")] + ".tsv")).exists()  # published by 0002
    for rel in set(reads) - {first}:
        summary = read_summary(study.output / "summary" / (rel[: -len(".pod5")] + ".tsv"))
        assert {r["barcode_arrangement"] for r in summary} == {"unclassified"}
        assert {r["read_id"] for r in summary} == set(reads[rel])
        assert not any((study.output / k).is_dir() and (study.output / k / "unclassified").exists()
                       for k in ("pass", "fail"))
    data = study.status()
    assert data["schema"] == "ledgerbc.status/2" and data["barcoding"]["kit_name"] is None
    assert data["files"]["done"] == 6 and data["barcoding"]["barcodes"] == []


def test_barcode_yields_follow_every_change_of_outputs_rows(make_ledger):
    """The per-barcode counters (migration 0004's triggers) equal the sums over `outputs`, whoever writes it."""
    ledger, _ = make_ledger(n_files=2)

    def rows(conn):
        return sorted(conn.execute(sa.select(models.BarcodeYield.barcode, models.BarcodeYield.kind,
                                             models.BarcodeYield.outputs, models.BarcodeYield.reads,
                                             models.BarcodeYield.bases)).all())

    def write(conn):
        o = models.Output
        conn.execute(sa.insert(o), [
            dict(file_id=1, kind="pass", barcode="barcode01", path="pass/barcode01/a", reads=3, bases=30, bytes=1),
            dict(file_id=2, kind="pass", barcode="barcode01", path="pass/barcode01/b", reads=2, bases=20, bytes=1),
            dict(file_id=2, kind="fail", barcode="unclassified", path="fail/unclassified/b", reads=1, bases=5, bytes=1),
            dict(file_id=2, kind="summary", barcode=None, path="summary/b", reads=3, bases=0, bytes=1),
            dict(file_id=2, kind="pass", barcode=None, path="pass/b", reads=9, bases=90, bytes=1),  # unbarcoded
        ])
        assert rows(conn) == [("barcode01", "pass", 2, 5, 50), ("unclassified", "fail", 1, 1, 5)]
        conn.execute(sa.update(o).where(o.path == "pass/barcode01/a").values(reads=4, bases=44, barcode="patient_A"))
        conn.execute(sa.delete(o).where(o.file_id == 2))
        assert rows(conn) == [("barcode01", "pass", 0, 0, 0), ("patient_A", "pass", 1, 4, 44),
                              ("unclassified", "fail", 0, 0, 0)]

    ledger.transact(write)


def test_status_reads_the_counters_not_the_outputs(make_ledger, tmp_path):
    """A barcoded ledger with outputs rows: status's section comes from barcode_yields (a few rows)."""
    ledger, _ = make_ledger(n_files=3, kit_name=KIT)
    now = datetime.datetime.now().timestamp()

    def write(conn):
        conn.execute(sa.update(models.Pod5File).values(state=models.DONE, reads_pass=2, reads_fail=1, done_at=now))
        conn.execute(sa.insert(models.Output), [
            dict(file_id=i, kind=kind, barcode=b, path=f"{kind}/{b}/{i}", reads=n, bases=10 * n, bytes=1)
            for i in (1, 2, 3) for kind, b, n in (("pass", "barcode03", 1), ("pass", "unclassified", 1),
                                                  ("fail", "barcode03", 1))])

    ledger.transact(write)
    section = status.report(ledger)["barcoding"]
    assert section["barcodes"] == [
        {"barcode": "barcode03", "kit_barcode": "barcode03", "files": 3, "reads": {"pass": 3, "fail": 3, "total": 6},
         "bases": {"pass": 30, "fail": 30, "total": 60}},
        {"barcode": "unclassified", "kit_barcode": None, "files": 3, "reads": {"pass": 3, "fail": 0, "total": 3},
         "bases": {"pass": 30, "fail": 0, "total": 30}},
    ]
    assert (section["reads"], section["unclassified_reads"], section["unclassified_fraction"]) == (9, 3, 0.3333)
    text = "\n".join(status.render_barcodes(section))
    assert text.startswith(f"barcodes: kit {KIT}; 2 barcode folders, unclassified 33.3% of 9 reads")
    assert "  barcode03 " in text and "66.7%" in text


def test_init_with_a_sheet_then_a_worker_sees_no_users_file(study):
    """Short: one file, the user's sheet gone before the worker runs; dorado got init's copy."""
    make_dataset(study.input, 1, seed=2, hostile_names=False, size_spread=False)
    sheet = study.root / "s.csv"
    sheet.write_text(SHEET)
    study.init("--kit-name", KIT, "--sample-sheet", sheet)
    sheet.unlink()
    worker = study.start_worker("w1")
    assert study.wait_workers([worker], timeout=120) == {"w1": 0}, study.worker_log("w1")
    log = next((study.output / "logs").glob("*.log")).read_text()
    assert f"--sample-sheet {study.output / SAMPLE_SHEET_COPY}" in log and f"--kit-name {KIT}" in log
    check_outputs(study)

