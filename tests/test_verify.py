"""`ledgerbc verify [--deep]` (DESIGN §4 Verify): exit 0 on a finished run; one line per violation naming the
input, exit 14, when an output is deleted, truncated, changed, holds a read of another file, belongs to a
file that is not done, or when the ledger contradicts itself; and the upgrade path: a ledger and output
tree from before schema 0003 (no `outputs` rows, no summaries) is told to run `recover`, which records the
outputs and writes the summaries from the outputs, after which verify holds.
"""
import shutil
import sqlite3
import zlib

import pytest
import sqlalchemy as sa

from ledgerbc import models
from ledgerbc.settings import Settings
from ledgerbc.verify import verify
from helpers import Study, check_exactly_once, kill_leftovers, make_study, pod5_reads


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished study (8 files, pass and fail outputs), copied afresh for each test that damages it."""
    tmp = tmp_path_factory.mktemp("verify")
    study = make_study(tmp, 8, 3, init_args=("--min-qscore", "10"))
    try:
        study.cli("run", "--worker-id", "w", check=True)
    finally:
        kill_leftovers(str(tmp))
    return study


@pytest.fixture
def study(finished, tmp_path):
    """A private copy of the finished study (folders and ledger), same layout."""
    copy = Study(tmp_path, **{k[len("LEDGERBC_SIM_"):].lower(): v for k, v in finished.sim.items()})
    shutil.rmtree(copy.input)
    shutil.copytree(finished.input, copy.input, symlinks=True)
    shutil.copytree(finished.output, copy.output, symlinks=True)
    conn = sqlite3.connect(copy.ledger_path)  # the settings point at the original folders: point them here
    conn.execute("UPDATE settings SET value = ? WHERE key = 'input_dir'", (f'"{copy.input}"',))
    conn.execute("UPDATE settings SET value = ? WHERE key = 'output_dir'", ('"."',))
    conn.commit()
    conn.close()
    recorded = Settings.read_json(copy.output)  # and so does ledgerbc.settings.json, which a rebuild checks
    recorded.input_dir, recorded.output_dir = str(copy.input), str(copy.output)
    recorded.write_json()
    return copy


def violations(study, *options):
    result = study.cli("verify", *options)
    lines = result.stdout.splitlines()
    assert "Traceback" not in result.stderr
    return result.returncode, lines


def outputs(study, kind):
    return sorted(p for p in (study.output / kind).rglob("*.fastq"))


def test_verify_exits_0_on_a_finished_run(study):
    code, lines = violations(study, "--deep")
    assert (code, lines) == (0, [])
    report = verify(study.ledger, deep=True)
    assert report.ok and report.done == 8 and report.outputs >= 16


def test_verify_names_the_file_whose_output_was_deleted_truncated_or_changed(study):
    deleted, truncated, changed = outputs(study, "pass")[:3]
    deleted.unlink()
    with open(truncated, "r+b") as fh:
        fh.truncate(10)
    data = bytearray(changed.read_bytes())
    data[-2] = ord("A") if data[-2] != ord("A") else ord("C")  # one base of one quality string: same size
    changed.write_bytes(bytes(data))
    code, lines = violations(study)
    assert code == 14
    rel = {p: p.relative_to(study.output / "pass").as_posix()[: -len(".fastq")] + ".pod5" for p in (deleted, truncated, changed)}
    assert lines == sorted([
        f"{rel[deleted]}: pass/{rel[deleted][:-5]}.fastq is missing",
        f"{rel[truncated]}: pass/{rel[truncated][:-5]}.fastq has 10 bytes, {lines_bytes(study, truncated)} were published",
        f"{rel[changed]}: pass/{rel[changed][:-5]}.fastq has changed since it was published "
        f"(crc32:{zlib.crc32(bytes(data)):08x}, published {recorded(study, changed).checksum})",
    ]), lines


def lines_bytes(study, path):
    return recorded(study, path).bytes


def recorded(study, path):
    rel = path.relative_to(study.output).as_posix()
    return study.ledger.transact(lambda c: c.execute(
        sa.select(models.Output).where(models.Output.path == rel)).one())


def test_verify_deep_finds_a_read_of_another_file_that_the_checksums_cannot(study):
    """A record whose read id is swapped for a read of another pod5, written before publication (so its
    size and checksum were recorded as they are): only --deep, which reads every read id, sees it."""
    victim, donor = outputs(study, "pass")[:2]
    donor_id = donor.read_text().split("\n", 1)[0].split("\t")[0][1:]
    lines = victim.read_text().split("\n")
    own_id = lines[0].split("\t")[0][1:]
    assert len(own_id) == len(donor_id)
    victim.write_text("\n".join([lines[0].replace(own_id, donor_id, 1)] + lines[1:]))
    data = victim.read_bytes()
    rel = victim.relative_to(study.output).as_posix()
    study.ledger.transact(lambda c: c.execute(sa.update(models.Output).where(models.Output.path == rel).values(
        bytes=len(data), checksum=f"crc32:{zlib.crc32(data):08x}")))
    assert violations(study) == (0, [])
    code, found = violations(study, "--deep")
    name = rel[len("pass/"):-len(".fastq")] + ".pod5"
    assert code == 14
    assert f"{name}: its outputs hold 1 reads of another pod5 (e.g. {donor_id})" in found, found
    assert f"{name}: 1 of its " in "\n".join(found)  # its own read is now missing
    assert all(line.startswith(f"{name}: ") for line in found), found


def test_verify_finds_outputs_of_a_file_that_is_not_done_and_files_the_ledger_does_not_know(study):
    some = outputs(study, "pass")[0]
    rel = some.relative_to(study.output / "pass").as_posix()[: -len(".fastq")] + ".pod5"
    study.ledger.transact(lambda c: c.execute(sa.update(models.Pod5File).where(models.Pod5File.rel_path == rel)
                                                       .values(state=models.PENDING)))
    shutil.copy(some, study.output / "pass" / "stray.fastq")
    code, lines = violations(study)
    assert code == 14
    assert f"{rel}: pending, but the ledger records outputs for it" in lines
    assert f"{rel}: pending, but pass/{rel[:-5]}.fastq is published for it" in lines
    assert "stray.pod5: pass/stray.fastq is published for it, but the ledger does not know this pod5" in lines


def test_verify_finds_a_file_claimed_outside_a_running_batch_and_a_pod5_published_twice(study):
    led = study.ledger
    rows = led.transact(lambda c: c.execute(sa.select(models.Pod5File).order_by(models.Pod5File.id)).all())
    a, b = rows[0], rows[1]
    led.transact(lambda c: (
        c.execute(sa.update(models.Pod5File).where(models.Pod5File.id == a.id).values(state=models.CLAIMED)),
        c.execute(sa.update(models.Pod5File).where(models.Pod5File.id == b.id).values(file_identifier=rows[2].file_identifier)),
    ))
    code, lines = violations(study)
    assert code == 14
    assert f"{a.rel_path}: claimed by batch {a.batch_id}, which is done, not running" in lines
    assert f"{b.rel_path}: the same pod5 is also published as {rows[2].rel_path}: its reads twice" in lines


def test_an_old_ledger_without_outputs_rows_and_a_tree_without_summaries_are_upgraded_by_recover(study):
    """A ledger and outputs from before schema 0003 and summaries: verify says to run `recover`, which
    records every output from disk and writes each summary from the FASTQ headers; the same as published."""
    before = {p.relative_to(study.output).as_posix(): sorted(p.read_text().splitlines())
              for p in (study.output / "summary").rglob("*.tsv")}
    shutil.rmtree(study.output / "summary")
    study.ledger.transact(lambda c: c.execute(sa.delete(models.Output)))
    code, lines = violations(study)
    assert code == 14 and len(lines) == 8, lines  # one line per file, naming the fix
    assert all("done, but the ledger records no outputs for it" in line and "`ledgerbc recover`" in line for line in lines)
    recovered = study.cli("recover")
    assert recovered.returncode == 0, recovered.stderr
    assert "8 done files had no outputs recorded (a ledger from before schema 0003): recorded from disk" in recovered.stdout
    assert "8 summaries written from their outputs (published before summaries)" in recovered.stdout
    after = {p.relative_to(study.output).as_posix(): sorted(p.read_text().splitlines())
             for p in (study.output / "summary").rglob("*.tsv")}
    assert after == before, "a summary written from the outputs differs from the one published with them"
    assert violations(study, "--deep") == (0, [])


def test_a_rebuild_of_a_tree_without_summaries_writes_them_and_verifies(study):
    shutil.rmtree(study.output / "summary")
    study.ledger_path.unlink()
    rebuilt = study.cli("recover", "--rebuild", "--input", study.input, "--output", study.output)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "8 pod5 files found, 8 already published" in rebuilt.stdout
    assert len(list((study.output / "summary").rglob("*.tsv"))) == 8
    check_exactly_once(pod5_reads(study.input), study.output)


def test_what_is_published_for_a_barcoded_input_reads_back_as_the_publication_recorded_it(tmp_path):
    """Barcoded (`kit_name`): outputs per barcode, the summary is the done marker. `published.read` (what
    reclaim, reconcile and rebuild record) gives back, for each input, the very outputs rows the publication
    recorded: kind, barcode, path, reads, bases, bytes, crc32."""
    import os
    import subprocess

    from ledgerbc import published, split
    from ledgerbc.batch import installer_for
    from ledgerbc.claim import ClaimedFile
    from ledgerbc.layout import Layout, link_name
    from ledgerbc.testkit import install_fake_dorado
    from ledgerbc.testkit.synth import make_dataset

    kit = "SQK-NBD114-24"
    make_dataset(tmp_path / "input", 3, seed=5, hostile_names=False)
    settings = Settings(input_dir=str(tmp_path / "input"), output_dir=str(tmp_path / "output"), kit_name=kit,
                        min_qscore=10.0)
    layout = Layout(tmp_path / "output")
    assigned = tmp_path / "output" / "work" / "ASSIGNED_1_w"
    assigned.mkdir(parents=True)
    rels = sorted(p.relative_to(tmp_path / "input").as_posix() for p in (tmp_path / "input").rglob("*.pod5"))
    links = {link_name(i, rel): ClaimedFile(rel, None, 0) for i, rel in enumerate(rels)}
    for name, f in links.items():
        os.symlink(tmp_path / "input" / f.rel, assigned / name)
    staging = layout.staging(1, "t")
    staging.mkdir(parents=True)
    with open(staging / "calls.bam", "wb") as out:
        subprocess.run([str(install_fake_dorado(tmp_path / "bin")), "basecaller", "hac", str(assigned),
                        "--kit-name", kit], stdout=out, stderr=subprocess.DEVNULL, check=True, timeout=120)
    result = split.split_bam(staging / "calls.bam", {n: f.rel for n, f in links.items()}, staging,
                             min_qscore=10.0, kit_name=kit)
    assert len(layout.barcode_dirs()) == 0
    installer_for(layout, "fastq", result, set(rels), links).run()
    assert len(layout.barcode_dirs()) > 1, "the stand-in gave every read one barcode: nothing per barcode tested"
    for name, f in links.items():
        recorded = sorted(result.files[name].records(), key=lambda o: o.path)
        assert published.done_marker(layout, settings, f.rel) == layout.summary_path(f.rel)
        got = published.read(layout, settings, f.rel)
        assert got is not None and not got.regenerated
        assert sorted(got.outputs, key=lambda o: o.path) == recorded
        assert (got.reads_pass, got.reads_fail) == (result.files[name].reads_pass, result.files[name].reads_fail)
    layout.summary_path(rels[0]).unlink()  # the done marker of a barcoded input: without it, not published
    assert published.read(layout, settings, rels[0]) is None
