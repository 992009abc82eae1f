"""`ledgerbc finalize`: per-sample products made by concatenating published outputs, checked with real
readers (pysam, samtools, gzip), on studies laid out by hand exactly per DESIGN §2 (barcoded and not,
`ledgerbc.testkit.finished`) and on one unbarcoded study run by the real worker and the stand-in dorado.
"""
from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pysam
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from helpers import collect_outputs, read_output
from ledgerbc import concat, db, finalize, models
from ledgerbc.cli import cli
from ledgerbc.layout import SUMMARY_COLUMNS
from ledgerbc.testkit.finished import FinishedStudy
from ledgerbc.testkit.synth import make_dataset

EMITS = ["fastq", "fastq.gz", "bam"]
RELS = ["run_b/pod5/PAS_2.pod5", "run_a/pod5/PAS_10.pod5", "run_a/pod5/PAS_1.pod5", "with space/it's.pod5",
        "run_a/pod5/PAS_0.pod5"]
SAMTOOLS = shutil.which("samtools")


def make_study(root: Path, emit: str, barcoded: bool = True, rels=RELS) -> FinishedStudy:
    s = FinishedStudy.create(root, emit=emit, barcodes=("barcode01", "barcode02", "unclassified") if barcoded else None)
    for i, rel in enumerate(rels):
        s.add_input(rel, n_reads=25 + 7 * i, worker=f"7_{i % 2}@gpu{i % 2}")
    return s


def run_finalize(ledger_path, *args):
    return CliRunner().invoke(cli, ["finalize", "--ledger", str(ledger_path), *map(str, args)])


def products(final: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(final.iterdir()) if not p.name.startswith(".")}


def bam_count(path: Path) -> int:
    if SAMTOOLS:
        return int(subprocess.run([SAMTOOLS, "view", "-c", str(path)], check=True, capture_output=True, text=True).stdout)
    with pysam.AlignmentFile(str(path), "rb", check_sq=False) as bam:
        return sum(1 for _ in bam)


def check_bam(path: Path) -> None:
    if SAMTOOLS:  # -u: unaligned BAM has no @SQ, which quickcheck otherwise reports
        proc = subprocess.run([SAMTOOLS, "quickcheck", "-u", "-v", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    with pysam.AlignmentFile(str(path), "rb", check_sq=False) as bam:
        assert sum(1 for _ in bam) == bam_count(path)


@pytest.mark.parametrize("barcoded", [True, False], ids=["barcoded", "unbarcoded"])
@pytest.mark.parametrize("emit", EMITS)
def test_every_read_is_in_exactly_one_product_of_its_sample(tmp_path, emit, barcoded):
    s = make_study(tmp_path, emit, barcoded)
    result = run_finalize(s.ledger.path)
    assert result.exit_code == 0, result.output
    final = s.output / "final"
    samples = ["barcode01", "barcode02", "unclassified"] if barcoded else ["all"]
    names = {f"{x}.{k}.{emit}" for x in samples for k in ("pass", "fail")}
    assert set(products(final)) == names | {"sequencing_summary.txt", "report.html"}
    seen: dict[str, str] = {}
    for sample in samples:
        for kind in ("pass", "fail"):
            path = final / f"{sample}.{kind}.{emit}"
            records = read_output(path)
            ids = [r.read_id for r in records]
            # every record of every output of this sample and kind, once, in input path order
            assert ids == s.ids(sample, kind), path.name
            for r in records:
                assert r.read_id not in seen, f"{r.read_id} in {seen.get(r.read_id)} and {path.name}"
                seen[r.read_id] = path.name
                assert (r.qscore >= 9.0) == (kind == "pass")
                bc = r.tags.get("BC", "Z:SQK-NBD114-24_unclassified")[2:].split("_", 1)[1]
                assert not barcoded or bc == sample
            if emit == "bam":
                check_bam(path)
                assert bam_count(path) == len(ids)
            if emit == "fastq.gz":
                assert subprocess.run(["gzip", "-t", str(path)]).returncode == 0
    assert len(seen) == s.summary_rows
    # every published output's records are in the products
    on_disk = collect_outputs(s.output, emit) if not barcoded else None
    if on_disk is not None:
        assert sorted(seen) == sorted(r.read_id for rel in on_disk.passed for r in on_disk.records(rel))
    lines = (final / "sequencing_summary.txt").read_text().splitlines()
    assert lines[0].split("\t") == list(SUMMARY_COLUMNS)
    assert len(lines) == 1 + s.summary_rows and sorted(line.split("\t")[1] for line in lines[1:]) == sorted(seen)
    assert [line.split("\t")[0] for line in lines[1:]] == sorted(line.split("\t")[0] for line in lines[1:])


def test_bam_products_have_one_merged_header(tmp_path):
    s = make_study(tmp_path, "bam")
    assert run_finalize(s.ledger.path).exit_code == 0
    inputs = [p for p in (s.output / "pass" / "barcode01").rglob("*.bam")] + \
             [p for p in (s.output / "fail" / "barcode01").rglob("*.bam")]
    want_rg = set()
    for p in inputs:
        with pysam.AlignmentFile(str(p), "rb", check_sq=False) as bam:
            want_rg |= {rg["ID"] for rg in bam.header.to_dict().get("RG", [])}
            assert bam.header.to_dict()["PG"][0]["CL"].endswith("@gpu0") or bam.header.to_dict()["PG"][0]["CL"].endswith("@gpu1")
    for kind in ("pass", "fail"):
        with pysam.AlignmentFile(str(s.output / "final" / f"barcode01.{kind}.bam"), "rb", check_sq=False) as bam:
            header = bam.header.to_dict()
            assert {rg["ID"] for rg in header["RG"]} == want_rg and len(header["RG"]) == len(want_rg)
            assert [pg["ID"] for pg in header["PG"]] == ["basecaller"]  # one @PG, not one per input
            assert header["HD"]["VN"] == "1.6"
            assert all(r.get_tag("RG") in want_rg for r in bam)


def test_bam_header_sharing_a_block_with_records(tmp_path):
    """A writer that does not flush the header into its own block: only that block is re-compressed."""
    s = make_study(tmp_path, "bam", barcoded=False, rels=RELS[:2])
    source = s.output / "pass" / "run_a" / "pod5" / "PAS_10.bam"
    before = [r.query_name for r in pysam.AlignmentFile(str(source), "rb", check_sq=False)]
    raw = gzip.decompress(source.read_bytes())  # the BAM stream: header then records
    shared = s.output / "shared.bam"
    shared.write_bytes(concat.bgzf_blocks(raw) + concat.BGZF_EOF)  # header and first records in one block
    bam = concat.read_bam_header(shared)
    assert bam.leftover, "the header was expected to share its block"
    header = concat.MergedHeader()
    header.add(bam)
    out = s.output / "out.bam"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o644)
    concat.write_bam(concat.Copier(fd), [bam, bam], header)
    os.close(fd)
    check_bam(out)
    assert [r.query_name for r in pysam.AlignmentFile(str(out), "rb", check_sq=False)] == before * 2


def test_refuses_while_files_are_unfinished_then_partial_lists_them(tmp_path):
    s = make_study(tmp_path, "fastq", rels=RELS[:3])
    s.add_input("later/a.pod5", state=models.PENDING)
    s.add_input("later/b.pod5", state=models.CLAIMED)
    s.add_input("later/c.pod5", state=models.WAITING)
    s.add_input("broken/d.pod5", state=models.FAILED)
    result = run_finalize(s.ledger.path)
    assert result.exit_code == 12
    assert result.stderr == ("Error: 3 files are not basecalled yet (1 pending, 1 claimed, 1 waiting). Wait until "
                             "`ledgerbc status` shows none, or run `ledgerbc finalize --partial` for products of "
                             "the done files only.\n")
    assert not (s.output / "final").exists()

    result = run_finalize(s.ledger.path, "--partial")
    assert result.exit_code == 0, result.output
    assert "3 files are not basecalled yet and are missing from them: later/a.pod5; later/b.pod5; later/c.pod5." \
        in result.stderr
    assert "1 failed files are not in the products" in result.stderr
    ids = [r.read_id for r in read_output(s.output / "final" / "barcode01.pass.fastq")]
    assert ids == s.ids("barcode01", "pass")
    assert "Unfinished" in (s.output / "final" / "report.html").read_text()


def test_rerun_is_byte_identical_and_more_done_files_replace_the_products(tmp_path):
    s = make_study(tmp_path, "bam", rels=RELS[:3])
    assert run_finalize(s.ledger.path).exit_code == 0
    first = products(s.output / "final")
    assert run_finalize(s.ledger.path).exit_code == 0
    assert products(s.output / "final") == first  # report.html included
    shutil.rmtree(s.output / "final")
    assert run_finalize(s.ledger.path).exit_code == 0
    assert products(s.output / "final") == first  # everything under final/ is derived

    s.add_input("run_c/new.pod5", n_reads=40)
    assert run_finalize(s.ledger.path).exit_code == 0
    for sample in ("barcode01", "barcode02", "unclassified"):
        ids = [r.read_id for r in read_output(s.output / "final" / f"{sample}.pass.bam")]
        assert ids == s.ids(sample, "pass")


class Crash(Exception):
    pass


def test_interrupted_finalize_leaves_the_previous_products(tmp_path, monkeypatch):
    s = make_study(tmp_path, "fastq.gz", rels=RELS[:3])
    assert run_finalize(s.ledger.path).exit_code == 0
    old = products(s.output / "final")
    s.add_input("run_c/new.pod5", n_reads=40)

    real = finalize._rename_into_place
    calls = []

    def crash_after_first(tmp, final_path):
        if calls:
            raise Crash("killed between products")
        calls.append(final_path.name)
        real(tmp, final_path)

    monkeypatch.setattr(finalize, "_rename_into_place", crash_after_first)
    switch = sys.getswitchinterval()  # finalize shortens it while copying: a crash must not leave it so
    with pytest.raises(Crash):
        finalize.finalize(s.ledger)
    assert sys.getswitchinterval() == switch
    monkeypatch.setattr(finalize, "_rename_into_place", real)
    after_crash = products(s.output / "final")
    assert set(after_crash) == set(old)
    assert any(p.name.startswith(".") and ".tmp-" in p.name for p in (s.output / "final").iterdir())

    assert run_finalize(s.ledger.path).exit_code == 0
    assert sys.getswitchinterval() == switch
    new = products(s.output / "final")
    assert not [p.name for p in (s.output / "final").iterdir() if ".tmp-" in p.name], "temp files left"
    for name, data in after_crash.items():  # each product either as before or complete and new
        assert data == old[name] or data == new[name], name
    assert after_crash[calls[0]] == new[calls[0]] != old[calls[0]]
    assert sum(after_crash[n] == old[n] for n in old) == len(old) - 1
    for sample in ("barcode01", "barcode02", "unclassified"):
        path = s.output / "final" / f"{sample}.pass.fastq.gz"
        assert subprocess.run(["gzip", "-t", str(path)]).returncode == 0
        assert [r.read_id for r in read_output(path)] == s.ids(sample, "pass")


def test_a_missing_or_changed_output_is_refused_and_nothing_is_replaced(tmp_path):
    s = make_study(tmp_path, "fastq", rels=RELS[:3])
    assert run_finalize(s.ledger.path).exit_code == 0
    old = products(s.output / "final")
    victim = next((s.output / "pass" / "barcode02").rglob("*.fastq"))
    victim.unlink()
    result = run_finalize(s.ledger.path)
    assert result.exit_code == 12
    assert result.stderr.startswith(f"Error: {victim} (an output of the done input ") and "ledgerbc verify" in result.stderr
    assert products(s.output / "final") == old

    grown = next((s.output / "pass" / "barcode01").rglob("*.fastq"))
    size = grown.stat().st_size
    with open(grown, "ab") as fh:
        fh.write(b"@extra\nA\n+\n!\n")
    victim.write_bytes(b"")  # back in place, but not as published
    result = run_finalize(s.ledger.path)
    assert result.exit_code == 12
    said = re.fullmatch(r"Error: (.+) has (\d+) bytes, (\d+) when it was published: a published output never "
                        r"changes\. Run `ledgerbc verify`\.\n", result.stderr)
    assert said and (said.groups()[1:] == (str(size + 13), str(size)) or said.group(1) == str(victim))
    assert products(s.output / "final") == old


@pytest.mark.parametrize("barcoded", [True, False], ids=["barcoded", "unbarcoded"])
def test_a_ledger_without_output_rows_uses_the_layout(tmp_path, barcoded):
    """Outputs published before the `outputs` table existed, or a ledger rebuilt from the files."""
    s = make_study(tmp_path, "fastq", barcoded=barcoded, rels=RELS[:3])
    if barcoded:
        settings = s.ledger.read_settings()
        settings.kit_name = "SQK-NBD114-24"
        s.ledger.transact(lambda conn: db.write_settings(conn, settings))
    recorded = products(s.output / "final") if run_finalize(s.ledger.path).exit_code == 0 else None
    s.ledger.transact(lambda conn: conn.execute(sa.delete(models.Output)))
    shutil.rmtree(s.output / "final")
    assert run_finalize(s.ledger.path).exit_code == 0
    for sample in s.samples():
        for kind in ("pass", "fail"):
            ids = [r.read_id for r in read_output(s.output / "final" / f"{sample}.{kind}.fastq")]
            assert ids == s.ids(sample, kind)
    lines = (s.output / "final" / "sequencing_summary.txt").read_text().splitlines()
    assert len(lines) == 1 + s.summary_rows
    after = products(s.output / "final")
    assert {k: v for k, v in after.items() if k != "report.html"} == \
        {k: v for k, v in recorded.items() if k != "report.html"}


@pytest.mark.slow
@pytest.mark.parametrize("emit", ["fastq.gz", "bam"])
def test_end_to_end_through_the_real_worker_unbarcoded(study, emit, request):
    make_dataset(study.input, 6, seed=3)
    study.init("--emit", emit, "--batch-files", "2", "--min-qscore", "10")
    study.start_worker("w1")
    assert study.wait_workers() == {"w1": 0}
    proc = study.cli("finalize", "--ledger", study.ledger_path)
    final = study.output / "final"
    assert f"{final}/all.pass.{emit}" in proc.stdout
    outputs = collect_outputs(study.output, emit)
    for kind, published in (("pass", outputs.passed), ("fail", outputs.failed)):
        want = [r.read_id for rel in sorted(published) for r in published[rel]]
        path = final / f"all.{kind}.{emit}"
        assert [r.read_id for r in read_output(path)] == want
        if emit == "bam":
            check_bam(path)
        else:
            assert subprocess.run(["gzip", "-t", str(path)]).returncode == 0
    assert outputs.n_pass and outputs.n_fail
    html = (final / "report.html").read_text()
    assert 'id="fig-timeline"' in html and 'id="fig-yield"' in html
    # read distributions come from the summary/ files the workers wrote
    assert 'id="fig-length"' in html and 'id="fig-qscore"' in html
    summary = final / "sequencing_summary.txt"
    rows = summary.read_text().splitlines()
    assert rows[0].split("\t") == list(SUMMARY_COLUMNS)
    assert len(rows) - 1 == outputs.n_pass + outputs.n_fail
    if emit == "bam":  # the merged summary of real workers, read by the real pycoQC and NanoPlot
        proc = request.getfixturevalue("pycoqc")(summary, study.root / "pycoqc.html")
        assert proc.returncode == 0 and (study.root / "pycoqc.html").stat().st_size > 0
        (study.root / "nanoplot").mkdir()
        assert request.getfixturevalue("nanoplot")(summary, study.root / "nanoplot").returncode == 0
