"""writers.py: background compression (ISA-L gzip, BGZF blocks re-deflated) gives the same outputs.

A dorado-like BAM of ~2,400 reads over three source files (several MB, so every output crosses many
256 KiB chunks and many BGZF blocks) is split in each mode; contents are compared with the input's
records, with the plain FASTQ split, and with the slower path that does not use ISA-L.
"""
import gzip
import threading

import numpy as np
import pysam
import pytest

from ledgerbc import writers
from ledgerbc.split import split_bam

LINKS = {"00000_a.pod5": "a.pod5", "00001_b.pod5": "sub/b.pod5", "00002_c.pod5": "c.pod5"}
BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")


@pytest.fixture(scope="module")
def big_bam(tmp_path_factory):
    path = tmp_path_factory.mktemp("bam") / "calls.bam"
    rng = np.random.default_rng(7)
    header = pysam.AlignmentHeader.from_text("@HD\tVN:1.6\tSO:unknown\n@PG\tID:basecaller\tPN:dorado\tVN:1\n")
    acgt = np.frombuffer(b"ACGT", dtype=np.uint8)
    with pysam.AlignmentFile(str(path), "wb", header=header) as bam:
        for n in range(2400):
            length = int(rng.integers(500, 3000))
            r = pysam.AlignedSegment(header)
            r.query_name = f"read-{n:05d}"
            r.flag = 4
            r.query_sequence = acgt[rng.integers(0, 4, length)].tobytes().decode()
            r.query_qualities = rng.integers(1, 40, length).astype(np.uint8)
            r.set_tags([("qs", float(rng.normal(12, 4)), "f"), ("fn", list(LINKS)[n % 3], "Z"), ("rn", n, "i")])
            bam.write(r)
    return path


def split(bam, tmp_path, emit, name):
    staging = tmp_path / name
    result = split_bam(bam, LINKS, staging, emit=emit, min_qscore=10)
    return result, staging


def input_records(bam, fn, passed):
    with pysam.AlignmentFile(str(bam), "rb", check_sq=False) as f:
        return [r.to_string() for r in f if r.get_tag("fn") == fn and (r.get_tag("qs") >= 10) == passed]


def output_records(path):
    with pysam.AlignmentFile(str(path), "rb", check_sq=False) as f:
        return [r.to_string() for r in f]


@pytest.mark.parametrize("isal", [True, False], ids=["isal", "without-isal"])
def test_compressed_outputs_hold_exactly_the_plain_outputs(big_bam, tmp_path, monkeypatch, isal):
    if not isal:
        monkeypatch.setattr(writers, "_deflate", None)
        monkeypatch.setattr(writers, "_gzip", None)
    elif writers._deflate is None:
        pytest.fail("the isal package is a dependency of ledgerbc and is not installed")
    plain, _ = split(big_bam, tmp_path, "fastq", "fastq")
    gz, _ = split(big_bam, tmp_path, "fastq.gz", "gz")
    bam, _ = split(big_bam, tmp_path, "bam", "bam")
    for name in LINKS:
        for kind in ("pass_path", "fail_path"):
            want = getattr(plain.files[name], kind).read_bytes()
            assert len(want) > 3 * writers._CHUNK  # each output spans several background chunks
            assert gzip.decompress(getattr(gz.files[name], kind).read_bytes()) == want
            out = getattr(bam.files[name], kind)
            assert out.read_bytes().endswith(BGZF_EOF)
            assert output_records(out) == input_records(big_bam, name, kind == "pass_path")
        assert (plain.files[name].reads_pass, plain.files[name].reads_fail) == (
            bam.files[name].reads_pass, bam.files[name].reads_fail)
    pysam.quickcheck("-u", str(bam.files["00000_a.pod5"].pass_path))  # -u: unaligned reads have no targets


def test_a_failure_in_the_background_leaves_no_temp_file_and_no_thread(big_bam, tmp_path, monkeypatch):
    calls = []
    real = writers._redeflate

    def failing(block):
        calls.append(1)
        if len(calls) > 20:
            raise OSError("disk full (simulated)")
        return real(block)

    monkeypatch.setattr(writers, "_redeflate", failing)
    with pytest.raises(OSError, match="disk full"):
        split(big_bam, tmp_path, "bam", "bam")
    assert [p for p in (tmp_path / "bam").rglob("*") if p.is_file()] == []
    assert not [t for t in threading.enumerate() if t.name.startswith("ledgerbc-split")]


@pytest.mark.parametrize("emit", ["fastq", "fastq.gz", "bam"])
def test_few_open_files_and_a_small_memory_bound_give_the_same_outputs(big_bam, tmp_path, monkeypatch, emit):
    """A barcoded batch has thousands of outputs: at most MAX_OPEN_FILES temp files are open (the others are
    closed and reopened for appending), and past BUFFERED_LIMIT an output hands its chunk over early."""
    want, _ = split(big_bam, tmp_path, emit, "normal")
    monkeypatch.setattr(writers, "MAX_OPEN_FILES", 2)
    monkeypatch.setattr(writers, "BUFFERED_LIMIT", 64 << 10)
    opened = []
    real_open = open

    def counting_open(path, mode="r", *args, **kwargs):
        if "ab" in mode or "wb" in mode:
            opened.append(path)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(writers, "open", counting_open, raising=False)
    got, _ = split(big_bam, tmp_path, emit, "frugal")
    assert len(opened) > 2 * len(LINKS)  # files were closed and reopened
    for name in LINKS:
        for kind in ("pass_path", "fail_path"):
            a, b = getattr(want.files[name], kind), getattr(got.files[name], kind)
            if emit == "bam":
                assert output_records(b) == output_records(a)
            else:
                assert (gzip.decompress(b.read_bytes()) if emit == "fastq.gz" else b.read_bytes()) == (
                    gzip.decompress(a.read_bytes()) if emit == "fastq.gz" else a.read_bytes())
            assert got.files[name].written[(kind[:4], None)].checksum == writers.file_checksum(b)[1]
