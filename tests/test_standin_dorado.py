"""The stand-in dorado, run as a subprocess on real pod5 files (no mocks)."""
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pod5
import pysam
import pytest

from ledgerbc.split import split_bam
from ledgerbc.testkit.synth import make_dataset
from ledgerbc.testkit import install_fake_dorado

REAL_POD5 = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "real-pod5"
SOURCES = {
    "filtered.pod5": "multi_read_pod5/filtered.pod5",
    "single_split_read.pod5": "single_split_read/single_split_read.pod5",
    "duplex.pod5": "duplex/pod5/duplex.pod5",
}


@pytest.fixture
def dorado(tmp_path):
    return str(install_fake_dorado(tmp_path / "bin"))


@pytest.fixture
def batch(tmp_path):
    """A folder like an ASSIGNED dir: symlinks to real pod5 files plus one corrupt file."""
    folder = tmp_path / "ASSIGNED_1_w"
    store = tmp_path / "store"
    folder.mkdir()
    store.mkdir()
    for name, rel in SOURCES.items():
        target = Path(shutil.copy(REAL_POD5 / rel, store / name))
        (folder / name).symlink_to(target)
    (folder / "x.pod5").write_bytes(os.urandom(4096))
    return folder


def pod5_read_ids(path):
    with pod5.Reader(path) as reader:
        return {str(read.read_id) for read in reader.reads()}


def run(dorado, folder, out, *extra, env=None):
    with open(out, "wb") as stdout:
        return subprocess.run([dorado, "basecaller", "hac", str(folder), "--device", "cuda:0", *extra],
                              stdout=stdout, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **(env or {})}, timeout=60)


def bam_records(path):
    """Header text and [(read id, {tag: value})]. (pysam's get_tags() misreads non-ASCII Z values.)"""
    with pysam.AlignmentFile(str(path), "rb", check_sq=False) as bam:
        return str(bam.header), [
            (r.query_name, {f[:2]: r.get_tag(f[:2]) for f in r.to_string().split("\t")[11:]})
            for r in bam]


def test_basecaller_writes_bam_with_fn_and_pi_and_skips_the_corrupt_file(dorado, batch, tmp_path):
    proc = run(dorado, batch, tmp_path / "out.bam")
    assert proc.returncode == 0, proc.stderr
    assert f"[error] Failed to load pod5 file {batch / 'x.pod5'}:" in proc.stderr

    header, records = bam_records(tmp_path / "out.bam")
    assert header.startswith("@HD\tVN:1.6\tSO:unknown\n@PG\tID:basecaller\tPN:dorado\t")
    assert f'CL:dorado "basecaller" "hac" "{batch}" "--device" "cuda:0"' in header
    assert "@RG\t" in header
    by_file = {}
    for name, tags in records:
        by_file.setdefault(tags["fn"], []).append((name, tags))
    assert set(by_file) == set(SOURCES)  # nothing from x.pod5
    for fn, recs in by_file.items():
        expected = pod5_read_ids(batch / fn)
        assert {tags.get("pi", name) for name, tags in recs} == expected
        for name, tags in recs:
            assert {"qs", "ns", "ts", "mx", "ch", "st", "rn", "du", "RG"} <= set(tags)
            assert ("pi" in tags) == (name not in expected) == ("sp" in tags)

    split = [tags for _, tags in by_file["single_split_read.pod5"]]
    assert len(split) == 2 and sorted(t["sp"] for t in split)[0] == 0  # 365157 samples > 300000
    assert len({name for name, _ in records}) == len(records)
    assert any(tags["qs"] < 10 for _, tags in records) and any(tags["qs"] >= 10 for _, tags in records)


def test_output_is_deterministic_and_split_threshold_is_a_knob(dorado, batch, tmp_path):
    run(dorado, batch, tmp_path / "a.bam")
    run(dorado, batch, tmp_path / "b.bam")
    assert bam_records(tmp_path / "a.bam")[1] == bam_records(tmp_path / "b.bam")[1]

    run(dorado, batch, tmp_path / "c.bam", env={"LEDGERBC_SIM_SPLIT_SAMPLES": "10000000"})
    records = bam_records(tmp_path / "c.bam")[1]
    assert not [tags for _, tags in records if "pi" in tags]
    assert {name for name, _ in records} == set().union(*(pod5_read_ids(batch / fn) for fn in SOURCES))


def test_recursive_and_fail_match(dorado, batch, tmp_path):
    nested = batch / "deeper"
    nested.mkdir()
    shutil.copy(REAL_POD5 / "degenerate" / "trimming_bomb.pod5", nested / "bomb.pod5")
    proc = run(dorado, batch, tmp_path / "flat.bam", env={"LEDGERBC_SIM_FAIL_MATCH": "duplex"})
    assert proc.returncode == 0
    assert f"[error] Failed to load pod5 file {batch / 'duplex.pod5'}:" in proc.stderr
    fns = {tags["fn"] for _, tags in bam_records(tmp_path / "flat.bam")[1]}
    assert fns == {"filtered.pod5", "single_split_read.pod5"}

    run(dorado, batch, tmp_path / "deep.bam", "--recursive")
    fns = {tags["fn"] for _, tags in bam_records(tmp_path / "deep.bam")[1]}
    assert fns == set(SOURCES) | {"bomb.pod5"}


def test_version_goes_to_stderr(dorado):
    proc = subprocess.run([dorado, "--version"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout == ""
    assert proc.stderr.strip().endswith("+simulated")


def test_crash_knob_exits_non_zero_with_a_truncated_bam(dorado, batch, tmp_path):
    proc = run(dorado, batch, tmp_path / "out.bam", env={"LEDGERBC_SIM_CRASH": "1"})
    assert proc.returncode != 0
    assert (tmp_path / "out.bam").stat().st_size > 0
    with pytest.raises((OSError, ValueError)):
        bam_records(tmp_path / "out.bam")


def test_sigterm_does_not_stop_it(dorado, batch, tmp_path):
    with open(tmp_path / "out.bam", "wb") as stdout:
        proc = subprocess.Popen([dorado, "basecaller", "hac", str(batch)], stdout=stdout,
                                stderr=subprocess.PIPE, env={**os.environ, "LEDGERBC_SIM_HANG": "1"})
    try:
        # Wait for the startup line: SIGTERM before Python installed SIG_IGN would kill it.
        assert b"[info] Running:" in proc.stderr.readline()
        proc.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def test_its_output_splits_back_to_the_pod5_reads(dorado, batch, tmp_path):
    run(dorado, batch, tmp_path / "out.bam")
    links = {name: f"in/{name}" for name in SOURCES}
    result = split_bam(tmp_path / "out.bam", links, tmp_path / "staging", min_qscore=10)
    for name in SOURCES:
        out = result.files[name]
        assert out.parent_ids == pod5_read_ids(batch / name)
        assert out.reads_pass > 0 or out.reads_fail > 0
    assert result.foreign == {} and result.untagged == 0


def test_hostile_file_names_come_back_verbatim_in_fn(dorado, tmp_path):
    dataset = make_dataset(tmp_path / "data", 10, seed=5)
    proc = run(dorado, tmp_path / "data", tmp_path / "out.bam", "--recursive")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    parents = {}
    for name, tags in bam_records(tmp_path / "out.bam")[1]:
        parents.setdefault(tags["fn"], set()).add(tags.get("pi", name))
    expected = {}
    for rel, ids in dataset.items():
        expected.setdefault(rel.split("/")[-1], set()).update(ids)
    assert parents == expected

    result = split_bam(tmp_path / "out.bam", {b: f"out/{b}" for b in expected}, tmp_path / "staging")
    assert {b: out.parent_ids for b, out in result.files.items()} == expected
    assert all(out.pass_path.name == out.rel[4:-5] + ".fastq" for out in result.files.values())
