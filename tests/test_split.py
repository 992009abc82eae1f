"""split.py on real dorado BAM from ../shared/testdata/dorado-bam (no mocks)."""
import errno
import gzip
import shutil
from pathlib import Path

import pysam
import pytest

from ledgerbc import split as split_module
from ledgerbc.bgzf import BGZF_EOF, check_framing
from ledgerbc.split import count_output_reads, output_relpath, split_bam

DORADO_BAM = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "dorado-bam"
BAMS = ["Kit14_hac.bam", "Kit14_RNA_hac.bam", "HAC_5mC_5hmC.bam"]
REL = "sub dir/ré ads.pod5"


def records(path):
    with pysam.AlignmentFile(str(path), "rb", check_sq=False) as bam:
        return [(r.query_name, r.to_string().split("\t")) for r in bam]


def fastq_entries(path):
    """{read id: (header tags, sequence, qualities)} of a FASTQ (plain or gzipped)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    assert len(lines) % 4 == 0
    entries = {}
    for i in range(0, len(lines), 4):
        header, seq, plus, qual = lines[i : i + 4]
        assert header.startswith("@") and plus == "+" and len(seq) == len(qual)
        name, *tags = header[1:].split("\t")
        entries[name] = (tags, seq, qual)
    return entries


def samtools_fastq(bam, tmp_path):
    """What `samtools fastq -T '*'` writes for `bam` (reads without READ1/READ2 flags go to -0)."""
    out = tmp_path / "samtools.fastq"
    pysam.samtools.fastq("-T", "*", "-0", str(out), str(bam))
    return out.read_text(encoding="utf-8")


def tag(fields, name):
    """Value of SAM tag `name` (after its type) in the fields of a SAM line, or None."""
    return next((f[5:] for f in fields[11:] if f.startswith(name + ":")), None)


@pytest.fixture(params=BAMS)
def bam(request, tmp_path):
    return Path(shutil.copy(DORADO_BAM / request.param, tmp_path / request.param))


def only_fn(path):
    (fn,) = {tag(fields, "fn") for _, fields in records(path)}
    return fn


def test_every_read_lands_in_its_file_with_its_tags(bam, tmp_path):
    fn = only_fn(bam)
    recs = records(bam)
    result = split_bam(bam, {fn: REL}, tmp_path / "staging")

    out = result.files[fn]
    assert out.rel == REL and out.link_name == fn
    assert out.pass_path == tmp_path / "staging" / "pass" / "sub dir" / "ré ads.fastq"
    assert out.fail_path is None and out.reads_fail == 0
    assert out.reads_pass == len(recs) and result.foreign == {} and result.untagged == 0
    assert out.bases == sum(len(fields[9]) for _, fields in recs)
    assert out.parent_ids == {tag(fields, "pi") or name for name, fields in recs}

    entries = fastq_entries(out.pass_path)
    assert set(entries) == {name for name, _ in recs}
    for name, fields in recs:
        tags, seq, qual = entries[name]
        assert tags == fields[11:] and seq == fields[9] and qual == fields[10]
    assert count_output_reads(out.pass_path) == len(recs)
    assert not [p for p in (tmp_path / "staging").rglob(".*")]  # no temp files left behind


def test_fastq_is_byte_identical_to_samtools_fastq_T_star(bam, tmp_path):
    fn = only_fn(bam)
    out = split_bam(bam, {fn: "x.pod5"}, tmp_path / "staging").files[fn]
    assert out.pass_path.read_text(encoding="utf-8") == samtools_fastq(bam, tmp_path)


def test_split_reads_are_attributed_to_their_parent_file(tmp_path):
    bam = Path(shutil.copy(DORADO_BAM / "HAC_5mC_5hmC.bam", tmp_path / "in.bam"))
    recs = records(bam)
    split = {name: tag(fields, "pi") for name, fields in recs if tag(fields, "pi")}
    assert len(split) == 6
    out = split_bam(bam, {"subset-subset.pod5": "a/b/subset.pod5"}, tmp_path / "s").files["subset-subset.pod5"]
    entries = fastq_entries(out.pass_path)
    for name, parent in split.items():
        assert f"pi:Z:{parent}" in entries[name][0]
        assert any(t.startswith("MM:Z:") for t in entries[name][0])
        assert any(t.startswith("ML:B:C,") for t in entries[name][0])
    assert set(split.values()) <= out.parent_ids
    assert not set(split) & out.parent_ids  # a split read's own id is not a pod5 read


def test_bam_mode_keeps_records_and_header_unchanged(tmp_path):
    bam = Path(shutil.copy(DORADO_BAM / "HAC_5mC_5hmC.bam", tmp_path / "in.bam"))
    result = split_bam(bam, {"subset-subset.pod5": "run/subset.pod5"}, tmp_path / "s", emit="bam")
    out = result.files["subset-subset.pod5"]
    assert out.pass_path == tmp_path / "s" / "pass" / "run" / "subset.bam"
    with pysam.AlignmentFile(str(bam), "rb", check_sq=False) as src, \
            pysam.AlignmentFile(str(out.pass_path), "rb", check_sq=False) as dst:
        assert str(dst.header) == str(src.header)
    assert records(out.pass_path) == records(bam)
    with_mods = [fields for _, fields in records(out.pass_path) if tag(fields, "MM")]
    assert with_mods and all(tag(fields, "ML").split(",")[0] == "C" for fields in with_mods)
    assert count_output_reads(out.pass_path) == len(records(bam))


def test_min_qscore_splits_pass_and_fail_by_qs(bam, tmp_path):
    fn = only_fn(bam)
    recs = records(bam)
    with pysam.AlignmentFile(str(bam), "rb", check_sq=False) as src:
        qs = {r.query_name: r.get_tag("qs") for r in src}  # the float32 value, not its text
    threshold = sorted(qs.values())[len(qs) // 2]  # a read exactly at the threshold passes
    out = split_bam(bam, {fn: REL}, tmp_path / "s", min_qscore=threshold).files[fn]
    assert out.fail_path == tmp_path / "s" / "fail" / "sub dir" / "ré ads.fastq"
    assert set(fastq_entries(out.pass_path)) == {n for n, q in qs.items() if q >= threshold}
    assert set(fastq_entries(out.fail_path)) == {n for n, q in qs.items() if q < threshold}
    assert (out.reads_pass, out.reads_fail) == (count_output_reads(out.pass_path),
                                                count_output_reads(out.fail_path))
    assert out.reads_pass + out.reads_fail == len(recs)


def test_every_read_failing_gives_an_empty_pass_file(tmp_path):
    bam = Path(shutil.copy(DORADO_BAM / "Kit14_hac.bam", tmp_path / "in.bam"))
    out = split_bam(bam, {"SQK-LSK114.pod5": "x.pod5"}, tmp_path / "s", min_qscore=99).files["SQK-LSK114.pod5"]
    assert out.pass_path.read_bytes() == b"" and out.reads_pass == 0
    assert out.reads_fail == 20 and count_output_reads(out.fail_path) == 20


def test_fastq_gz_is_readable_with_gzip(tmp_path):
    bam = Path(shutil.copy(DORADO_BAM / "Kit14_RNA_hac.bam", tmp_path / "in.bam"))
    out = split_bam(bam, {"SQK-RNA004.pod5": "rna/x.pod5"}, tmp_path / "s", emit="fastq.gz").files["SQK-RNA004.pod5"]
    assert out.pass_path.name == "x.fastq.gz"
    with gzip.open(out.pass_path, "rt") as handle:
        assert handle.read() == samtools_fastq(bam, tmp_path)
    assert count_output_reads(out.pass_path) == 19


def rewrite(src, dst, change):
    """Copy BAM `src` to `dst`, passing each record through `change(index, record)`."""
    with pysam.AlignmentFile(str(src), "rb", check_sq=False) as fin, \
            pysam.AlignmentFile(str(dst), "wb", template=fin) as fout:
        for index, record in enumerate(fin):
            change(index, record)
            fout.write(record)
    return dst


def test_two_fn_values_go_to_two_files_foreign_and_untagged_are_counted(tmp_path):
    def change(index, record):
        if index % 3 == 1:
            record.set_tag("fn", "other.pod5", "Z")
        elif index % 3 == 2:
            record.set_tag("fn", "stranger.pod5", "Z")
        if index == 0:
            record.set_tag("fn", None)

    bam = rewrite(DORADO_BAM / "Kit14_hac.bam", tmp_path / "mixed.bam", change)
    by_fn = {}
    for name, fields in records(bam):
        by_fn.setdefault(tag(fields, "fn"), set()).add(name)
    links = {"SQK-LSK114.pod5": "one/same.pod5", "other.pod5": "two/same.pod5", "empty.pod5": "e.pod5"}
    result = split_bam(bam, links, tmp_path / "s")

    assert set(result.files) == set(links)
    assert set(fastq_entries(result.files["SQK-LSK114.pod5"].pass_path)) == by_fn["SQK-LSK114.pod5"]
    assert set(fastq_entries(result.files["other.pod5"].pass_path)) == by_fn["other.pod5"]
    assert result.foreign == {"stranger.pod5": len(by_fn["stranger.pod5"])}
    assert result.untagged == len(by_fn[None]) == 1
    written = set()
    for path in (tmp_path / "s").rglob("*.fastq"):
        written |= set(fastq_entries(path))
    assert not written & (by_fn["stranger.pod5"] | by_fn[None])

    empty = result.files["empty.pod5"]
    assert empty.pass_path == tmp_path / "s" / "pass" / "e.fastq" and empty.pass_path.read_bytes() == b""
    assert (empty.fail_path, empty.reads_pass, empty.reads_fail, empty.bases) == (None, 0, 0, 0)
    assert empty.parent_ids == set()


def test_qscore_from_qualities_when_there_is_no_qs_tag(tmp_path):
    def change(index, record):
        record.set_tag("qs", None)
        record.query_qualities = pysam.qualitystring_to_array(("5" if index % 2 else "+") * record.query_length)

    bam = rewrite(DORADO_BAM / "Kit14_hac.bam", tmp_path / "noqs.bam", change)
    out = split_bam(bam, {"SQK-LSK114.pod5": "x.pod5"}, tmp_path / "s", min_qscore=15).files["SQK-LSK114.pod5"]
    # '5' is Q20 and '+' Q10: odd records pass, even ones fail.
    assert (out.reads_pass, out.reads_fail) == (10, 10)


def test_an_empty_bam_still_gives_every_file_its_pass_file(tmp_path):
    bam = rewrite(DORADO_BAM / "Kit14_hac.bam", tmp_path / "one.bam", lambda i, r: None)
    with pysam.AlignmentFile(str(bam), "rb", check_sq=False) as fin, \
            pysam.AlignmentFile(str(tmp_path / "empty.bam"), "wb", template=fin):
        pass
    result = split_bam(tmp_path / "empty.bam", {"a.pod5": "a.pod5"}, tmp_path / "s", emit="bam")
    assert count_output_reads(result.files["a.pod5"].pass_path) == 0


def test_truncated_bam_raises_and_leaves_no_temp_files(tmp_path):
    data = (DORADO_BAM / "HAC_5mC_5hmC.bam").read_bytes()
    (tmp_path / "cut.bam").write_bytes(data[: len(data) // 2])
    with pytest.raises((OSError, ValueError)):
        split_bam(tmp_path / "cut.bam", {"subset-subset.pod5": "x.pod5"}, tmp_path / "s")
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.parent != tmp_path]


def _block_starts(data: bytes) -> list[int]:
    starts, at = [], 0
    while at < len(data):
        starts.append(at)
        at += int.from_bytes(data[at + 16:at + 18], "little") + 1
    return starts


@pytest.mark.parametrize("name", ["Kit14_hac.bam", "HAC_5mC_5hmC.bam"])
def test_a_damaged_bam_is_refused_before_htslib_opens_it_with_reader_threads(name, tmp_path, monkeypatch):
    """htslib's open of a damaged BAM with reader threads can wait forever for a reader thread that already
    stopped (main thread in bgzf_check_EOF; it hung CI at test_truncated_bam_raises...). So the framing is
    checked in Python first and htslib never sees a cut file: cut at every block boundary (a whole BAM but for
    its EOF block), inside blocks, and cut inside a block with an EOF block appended."""
    data = (DORADO_BAM / name).read_bytes()
    starts = _block_starts(data)
    assert len(starts) > 3 and data[starts[-1]:] == BGZF_EOF
    cuts = [data[:at] for at in starts[1:]]  # ends on a block boundary, no EOF block
    cuts += [data[:at + 7] for at in starts[:-1]]  # inside a block header
    cuts += [data[:at + 1000] for at in starts[:-2] if at + 1000 < starts[-2]]  # inside the payload
    cuts += [data[:at + 1000] + BGZF_EOF for at in starts[:-2]]  # cut, then an EOF block
    cuts += [b"", b"BAM\x01", data[:-1]]

    def never(*args, **kwargs):
        raise AssertionError("htslib was given a damaged BAM")

    monkeypatch.setattr(split_module.pysam, "AlignmentFile", never)
    for i, cut in enumerate(cuts):
        path = tmp_path / f"cut{i}.bam"
        path.write_bytes(cut)
        with pytest.raises(OSError) as raised:
            split_bam(path, {"x.pod5": "x.pod5"}, tmp_path / "s")
        assert raised.value.errno == errno.EIO and raised.value.filename == str(path), raised.value
        assert "BGZF" in str(raised.value) or "not a complete BAM" in str(raised.value)
    check_framing(DORADO_BAM / name)  # and the whole file passes


def test_damage_inside_a_block_raises_the_read_error_not_htslibs_close_error(tmp_path):
    """A well-framed block whose payload is damaged fails in the inflate (CRC): the split raises that error,
    and the close that fails after it (`Closing failed: Resource temporarily unavailable`) does not hide it."""
    data = bytearray((DORADO_BAM / "HAC_5mC_5hmC.bam").read_bytes())
    starts = _block_starts(bytes(data))
    at = starts[len(starts) // 2] + 100
    data[at:at + 4] = bytes(b ^ 0xFF for b in data[at:at + 4])
    (tmp_path / "bad.bam").write_bytes(bytes(data))
    with pytest.raises(OSError) as raised:
        split_bam(tmp_path / "bad.bam", {"subset-subset.pod5": "x.pod5"}, tmp_path / "s")
    assert "Closing failed" not in str(raised.value) and "truncated" in str(raised.value)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.parent != tmp_path]


def test_a_vanished_bam_raises_without_an_htslib_line_on_stderr(tmp_path, capfd):
    """The staging of a fenced batch is cleaned under its worker: the split's open fails, and the worker logs
    one 'fenced' line (batch.py); htslib must not print `[E::hts_open_format] Failed to open file` as well."""
    def verbosity():
        level = pysam.set_verbosity(0)
        pysam.set_verbosity(level)
        return level

    before = verbosity()
    with pytest.raises(OSError):
        split_bam(tmp_path / "staging" / "calls.bam", {"a.pod5": "a.pod5"}, tmp_path / "s")
    assert capfd.readouterr().err == ""
    assert verbosity() == before > 0, "htslib's messages were not turned back on"


def test_output_relpath():
    assert output_relpath("a/b/x.pod5", "fastq") == "a/b/x.fastq"
    assert output_relpath("a/b/x.pod5", "fastq.gz") == "a/b/x.fastq.gz"
    assert output_relpath("x y/$(z).pod5", "bam") == "x y/$(z).bam"
    for bad in ("/abs/x.pod5", "../x.pod5", "a/../../x.pod5"):
        with pytest.raises(ValueError):
            output_relpath(bad, "fastq")
    with pytest.raises(ValueError):
        output_relpath("x.pod5", "sam")
