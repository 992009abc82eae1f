"""The stand-in dorado, run as a subprocess on copies of the real pod5 files (no mocks)."""
import collections
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pod5
import pysam
import pytest

from ledgerbc.chemistry import read_run_info, resolve
from ledgerbc.dorado import version_from_output
from ledgerbc.split import split_bam
from ledgerbc.testkit import install_fake_dorado, synth
from ledgerbc.testkit.dorado import STANDIN_BARCODES, barcode_for, basecall_in_process
from ledgerbc.testkit.synth import make_dataset, write_pod5

REAL_POD5 = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "real-pod5"
# Real files of one chemistry (R10.4.1 5 kHz DNA), with different kits and a read dorado splits.
SOURCES = {
    "single_channel.pod5": "single_channel_multi_read_pod5/filtered.pod5",
    "single_split_read.pod5": "single_split_read/single_split_read.pod5",
    "duplex.pod5": "duplex/pod5/duplex.pod5",
}
DNA_MODEL = "dna_r10.4.1_e8.2_400bps_hac@v5.0.0"
RNA_FILE = "rna004_130bps/rna004_130bps-FLO_PRO004RA-SQK_RNA004-4000.pod5"
DNA_FILE = "dna_r10.4.1_e8.2_400bps_5khz/dna_r10.4.1_e8.2_400bps_5khz-FLO_PRO114M-SQK_RAD114-5000.pod5"


@pytest.fixture
def dorado(tmp_path):
    return str(install_fake_dorado(tmp_path / "bin"))


def copy_into(folder: Path, files: dict[str, str]) -> Path:
    """Copies of real files (name in folder -> path under real-pod5): never write next to the originals."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rel in files.items():
        shutil.copyfile(REAL_POD5 / rel, folder / name)
    return folder


@pytest.fixture
def batch(tmp_path):
    """A folder like an ASSIGNED dir: symlinks to copies of real pod5 files plus one corrupt file."""
    folder = tmp_path / "ASSIGNED_1_w"
    store = copy_into(tmp_path / "store", SOURCES)
    folder.mkdir()
    for name in SOURCES:
        (folder / name).symlink_to(store / name)
    (folder / "x.pod5").write_bytes(os.urandom(4096))
    return folder


def pod5_read_ids(path):
    with pod5.Reader(path) as reader:
        return {str(read.read_id) for read in reader.reads()}


def run(dorado, folder, out, *extra, model="hac", env=None):
    with open(out, "wb") as stdout:
        return subprocess.run([dorado, "basecaller", model, str(folder), "--device", "cuda:0", *extra],
                              stdout=stdout, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **(env or {})}, timeout=120)


def bam_records(path):
    """Header text and [(read id, {tag: value})]. (pysam's get_tags() misreads non-ASCII Z values.)"""
    with pysam.AlignmentFile(str(path), "rb", check_sq=False) as bam:
        return str(bam.header), [
            (r.query_name, {f[:2]: r.get_tag(f[:2]) for f in r.to_string().split("\t")[11:]})
            for r in bam]


def parents_by_file(records):
    by_file = collections.defaultdict(set)
    for name, tags in records:
        by_file[tags["fn"]].add(tags.get("pi", name))
    return dict(by_file)


def test_basecaller_writes_bam_with_fn_and_pi_and_skips_the_corrupt_file(dorado, batch, tmp_path):
    proc = run(dorado, batch, tmp_path / "out.bam")
    assert proc.returncode == 0, proc.stderr
    assert f"[error] Failed to open file {batch / 'x.pod5'}:" in proc.stderr

    header, records = bam_records(tmp_path / "out.bam")
    assert header.startswith("@HD\tVN:1.6\tSO:unknown\n@PG\tID:basecaller\tPN:dorado\tVN:1.1.1+simulated\t")
    assert f'CL:dorado "basecaller" "hac" "{batch}" "--device" "cuda:0"' in header
    rg_lines = [line for line in header.splitlines() if line.startswith("@RG\t")]
    assert rg_lines and all("DS:basecall_model=dna_r10.4.1_e8.2_400bps_hac@v5.2.0 runid=" in line for line in rg_lines)
    by_file = collections.defaultdict(list)
    for name, tags in records:
        by_file[tags["fn"]].append((name, tags))
    assert set(by_file) == set(SOURCES)  # nothing from x.pod5
    for fn, recs in by_file.items():
        expected = pod5_read_ids(batch / fn)
        assert {tags.get("pi", name) for name, tags in recs} == expected
        for name, tags in recs:
            assert {"qs", "ns", "ts", "mx", "ch", "st", "rn", "du", "RG"} <= set(tags)
            assert tags["RG"].endswith("_dna_r10.4.1_e8.2_400bps_hac@v5.2.0") and "BC" not in tags
            assert ("pi" in tags) == (name not in expected) == ("sp" in tags)

    split = [tags for _, tags in by_file["single_split_read.pod5"]]
    assert len(split) == 2 and sorted(t["sp"] for t in split)[0] == 0  # 365157 samples > 300000
    assert len({name for name, _ in records}) == len(records)
    assert any(tags["qs"] < 10 for _, tags in records) and any(tags["qs"] >= 10 for _, tags in records)


@pytest.mark.parametrize("extra", [[], ["--kit-name", "SQK-NBD114-24"]])
def test_the_in_process_basecaller_writes_what_the_executable_writes(dorado, batch, tmp_path, extra):
    """basecall_in_process (tests/history.py's dorado) gives the executable's BAM, [error] lines and status."""
    proc = run(dorado, batch, tmp_path / "exe.bam", *extra)
    log = tmp_path / "batch.log"
    status = basecall_in_process(["basecaller", "hac", str(batch), "--device", "cuda:0", *extra], tmp_path / "in.bam", log)
    assert (status, proc.returncode) == (0, 0)
    assert bam_records(tmp_path / "in.bam") == bam_records(tmp_path / "exe.bam")
    errors = [line.split("] ", 2)[2] for line in log.read_text().splitlines() if "[error]" in line]
    assert errors == [line.split("] ", 2)[2] for line in proc.stderr.splitlines() if "[error]" in line]
    assert errors and f"Failed to open file {batch / 'x.pod5'}:" in errors[0]


def test_the_in_process_basecaller_fails_mixed_chemistries_at_start_like_the_executable(dorado, tmp_path):
    folder = tmp_path / "mixed"
    write_pod5(folder / "a.pod5", 2, seed=1, chemistry=synth.DNA_5KHZ)
    write_pod5(folder / "b.pod5", 2, seed=2, chemistry=synth.RNA004)
    proc = run(dorado, folder, tmp_path / "exe.bam")
    status = basecall_in_process(["basecaller", "hac", str(folder)], tmp_path / "in.bam", tmp_path / "batch.log")
    assert status == proc.returncode == 1
    assert not (tmp_path / "in.bam").exists() and (tmp_path / "exe.bam").stat().st_size == 0
    assert "inhomogeneous" in (tmp_path / "batch.log").read_text() and "inhomogeneous" in proc.stderr


def test_output_is_deterministic_and_split_threshold_is_a_knob(dorado, batch, tmp_path):
    run(dorado, batch, tmp_path / "a.bam")
    run(dorado, batch, tmp_path / "b.bam")
    assert bam_records(tmp_path / "a.bam")[1] == bam_records(tmp_path / "b.bam")[1]

    run(dorado, batch, tmp_path / "c.bam", env={"LEDGERBC_SIM_SPLIT_SAMPLES": "10000000"})
    records = bam_records(tmp_path / "c.bam")[1]
    assert not [tags for _, tags in records if "pi" in tags]
    assert {name for name, _ in records} == set().union(*(pod5_read_ids(batch / fn) for fn in SOURCES))


def test_recursive_and_fail_match(dorado, batch, tmp_path):
    copy_into(batch / "deeper", {"chr1.pod5": "cram/single_read/chr1_MAT.pod5"})
    proc = run(dorado, batch, tmp_path / "flat.bam", env={"LEDGERBC_SIM_FAIL_MATCH": "duplex"})
    assert proc.returncode == 0
    assert f"[error] Failed to open file {batch / 'duplex.pod5'}: IOError: Invalid signature in file" in proc.stderr
    assert set(parents_by_file(bam_records(tmp_path / "flat.bam")[1])) == {"single_channel.pod5",
                                                                           "single_split_read.pod5"}

    run(dorado, batch, tmp_path / "deep.bam", "--recursive")
    assert set(parents_by_file(bam_records(tmp_path / "deep.bam")[1])) == set(SOURCES) | {"chr1.pod5"}


def test_a_lone_corrupt_file_gives_no_reads_and_exit_0(dorado, tmp_path):
    """DESIGN §9 (real dorado 1.x exits 1 here: "Failed to determine sequencing chemistry from data")."""
    folder = tmp_path / "only_bad"
    folder.mkdir()
    (folder / "x.pod5").write_bytes(os.urandom(4096))
    proc = run(dorado, folder, tmp_path / "out.bam")
    assert proc.returncode == 0 and "[error] Failed to open file" in proc.stderr
    assert bam_records(tmp_path / "out.bam")[1] == []


# --- chemistry -----------------------------------------------------------------------------------------

def real_groups() -> dict[str, list[str]]:
    """{chemistry name: [rel paths]} of every real file, as ledgerbc.chemistry resolves them."""
    groups = collections.defaultdict(list)
    for path in sorted(REAL_POD5.rglob("*.pod5")):
        info = read_run_info(path)
        groups[resolve(info.keys[0]).name].append(path.relative_to(REAL_POD5).as_posix())
    return dict(groups)


GROUPS = real_groups()
DEPRECATED_LABELS = {"dna_r9.4.1_e8": "DNA r9.4.1 e8", "dna_r10.4.1_e8.2_400bps_4khz": "DNA r10.4.1 e8.2 4kHz",
                     "dna_r10.4.1_e8.2_260bps": "DNA r10.4.1 e8.2 4kHz", "rna002_70bps": "RNA002"}


def test_the_real_files_hold_the_chemistries_this_module_tests():
    assert set(GROUPS) == {"dna_r10.4.1_e8.2_400bps_5khz", "rna004_130bps", "unknown"} | set(DEPRECATED_LABELS)


@pytest.mark.parametrize("name", ["dna_r10.4.1_e8.2_400bps_5khz", "rna004_130bps"])
def test_each_supported_chemistry_group_of_the_real_files_basecalls_alone(dorado, tmp_path, name):
    files = {f"{i:02d}_{Path(rel).name}": rel for i, rel in enumerate(GROUPS[name])}
    folder = copy_into(tmp_path / "group", files)
    proc = run(dorado, folder, tmp_path / "out.bam")
    assert proc.returncode == 0, proc.stderr
    assert "[error]" not in proc.stderr
    header, records = bam_records(tmp_path / "out.bam")
    assert parents_by_file(records) == {fn: pod5_read_ids(folder / fn) for fn in files}
    model = {"rna004_130bps": "rna004_130bps_hac@v5.2.0"}.get(name, "dna_r10.4.1_e8.2_400bps_hac@v5.2.0")
    assert all(tags["RG"].endswith(f"_{model}") for _, tags in records)
    assert f"basecall_model={model} " in header


@pytest.mark.parametrize("name", sorted(DEPRECATED_LABELS))
def test_chemistries_dorado_1_dropped_fail_at_start_naming_the_chemistry(dorado, tmp_path, name):
    folder = copy_into(tmp_path / "group", {Path(rel).name: rel for rel in GROUPS[name]})
    proc = run(dorado, folder, tmp_path / "out.bam")
    assert proc.returncode == 1
    assert (f"[error] The '{DEPRECATED_LABELS[name]}' chemistry has been deprecated since Dorado v1.0.0. Please use "
            "a previous version which can be found at https://github.com/nanoporetech/dorado/releases/tag/v0.9.6."
            ) in proc.stderr
    assert (tmp_path / "out.bam").stat().st_size == 0


@pytest.mark.parametrize("rel", GROUPS["unknown"])
def test_files_of_no_known_chemistry_fail_with_a_variant(dorado, tmp_path, rel):
    folder = copy_into(tmp_path / "one", {Path(rel).name: rel})
    proc = run(dorado, folder, tmp_path / "out.bam")
    assert proc.returncode == 1
    assert "[error] No supported chemistry found for flowcell_code: '" in proc.stderr
    assert "[error] Could not resolve chemistry from data: Unknown chemistry" in proc.stderr
    assert (tmp_path / "out.bam").stat().st_size == 0


def test_mixed_chemistries_fail_at_start_and_write_nothing(dorado, tmp_path):
    folder = copy_into(tmp_path / "mixed", {"dna.pod5": DNA_FILE, "rna.pod5": RNA_FILE})
    proc = run(dorado, folder, tmp_path / "out.bam")
    assert proc.returncode == 1
    lines = [line.split("] ", 2)[-1] for line in proc.stderr.splitlines() if "[error]" in line]
    assert lines == ["Multiple sequencing chemistries found in data", "Found: dna_r10.4.1_e8.2_400bps_5khz",
                     "Found: rna004_130bps", "Could not uniquely resolve chemistry from inhomogeneous data"]
    assert (tmp_path / "out.bam").stat().st_size == 0

    # The real "mixed" folder: 260 bps at 4 kHz and 400 bps at 5 kHz.
    proc = run(dorado, copy_into(tmp_path / "real_mixed", {Path(p).name: p for p in (
        "mixed/dna_r10.4.1_e8.2_260bps-FLO_PRO114M-SQK_MLK114_96_XL_260-4000.pod5",
        "mixed/dna_r10.4.1_e8.2_400bps_5khz-FLO_FLG114HD-SQK_LSK114_XL-5000.pod5")}), tmp_path / "out2.bam")
    assert proc.returncode == 1 and "Could not uniquely resolve chemistry from inhomogeneous data" in proc.stderr
    assert (tmp_path / "out2.bam").stat().st_size == 0


def test_synthetic_files_of_two_supported_chemistries(dorado, tmp_path):
    dna = make_dataset(tmp_path / "dna", 3, seed=1, hostile_names=False, size_spread=False)
    rna = make_dataset(tmp_path / "rna", 3, seed=2, hostile_names=False, size_spread=False, chemistry=synth.RNA004)
    for folder, dataset in (("dna", dna), ("rna", rna)):
        proc = run(dorado, tmp_path / folder, tmp_path / f"{folder}.bam", "--recursive")
        assert proc.returncode == 0, proc.stderr
        assert {name for name, _ in bam_records(tmp_path / f"{folder}.bam")[1]} == set().union(*dataset.values())
    both = tmp_path / "both"
    shutil.copytree(tmp_path / "dna", both / "dna")
    shutil.copytree(tmp_path / "rna", both / "rna")
    proc = run(dorado, both, tmp_path / "both.bam", "--recursive")
    assert proc.returncode == 1 and "inhomogeneous" in proc.stderr
    assert (tmp_path / "both.bam").stat().st_size == 0


def test_an_explicit_model_checks_only_the_first_file(dorado, tmp_path):
    # RNA004 first (names sort): the first file's sample rate (4000) refuses the 5 kHz DNA model.
    folder = copy_into(tmp_path / "rna_first", {"a_rna.pod5": RNA_FILE, "b_dna.pod5": DNA_FILE})
    proc = run(dorado, folder, tmp_path / "refused.bam", model=DNA_MODEL)
    assert proc.returncode == 1
    assert "[error] Sample rate for model (5000) and data (4000) are not compatible." in proc.stderr
    assert (tmp_path / "refused.bam").stat().st_size == 0

    # DNA first: everything is basecalled with the DNA model, the RNA file too, without a word.
    folder = copy_into(tmp_path / "dna_first", {"a_dna.pod5": DNA_FILE, "b_rna.pod5": RNA_FILE})
    proc = run(dorado, folder, tmp_path / "silent.bam", model=DNA_MODEL)
    assert proc.returncode == 0 and "[error]" not in proc.stderr and "[warning]" not in proc.stderr
    records = bam_records(tmp_path / "silent.bam")[1]
    assert parents_by_file(records) == {"a_dna.pod5": pod5_read_ids(folder / "a_dna.pod5"),
                                        "b_rna.pod5": pod5_read_ids(folder / "b_rna.pod5")}
    assert all(tags["RG"].endswith(f"_{DNA_MODEL}") for _, tags in records)


def test_model_folders_and_bad_model_arguments(dorado, tmp_path):
    folder = copy_into(tmp_path / "dna", {"a.pod5": DNA_FILE})
    missing = tmp_path / "models" / "dna_r10.4.1_e8.2_400bps_hac@v5.0.0"
    proc = run(dorado, folder, tmp_path / "a.bam", model=str(missing))
    assert proc.returncode == 1 and f"Model does not exist at: '{missing}'" in proc.stderr
    custom = tmp_path / "models" / "custom"
    custom.mkdir(parents=True)
    (custom / "config.toml").write_text("[run_info]\nsample_rate = 4000\n")
    proc = run(dorado, folder, tmp_path / "b.bam", model=str(custom))
    assert proc.returncode == 1 and "Sample rate for model (4000) and data (5000) are not compatible." in proc.stderr
    proc = run(dorado, folder, tmp_path / "c.bam", model="hac@v6")
    assert proc.returncode == 1 and "Version: 'v6.0.0' is not an available option" in proc.stderr
    proc = run(dorado, folder, tmp_path / "d.bam", model="hac@v4.1.0")
    assert proc.returncode == 1 and ("No matches for chemistry: dna_r10.4.1_e8.2_400bps_5khz, model_variant: hac, "
                                     "version: v4.1.0") in proc.stderr


# --- version and provenance ----------------------------------------------------------------------------

def test_version_like_dorado_1_1(dorado, tmp_path):
    proc = subprocess.run([dorado, "--version"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout == ""
    # dorado < 1.3: its spdlog line, then the version alone on the last line, both on stderr.
    assert proc.stderr.splitlines()[0].endswith('[info] Running: "--version"')
    assert proc.stderr.splitlines()[-1] == "1.1.1+simulated"
    assert version_from_output(proc.stdout, proc.stderr) == "1.1.1+simulated"
    # stdout and stderr into one file that is not a terminal: dorado logs nothing at all.
    with open(tmp_path / "both.txt", "wb") as both:
        subprocess.run([dorado, "--version"], stdout=both, stderr=subprocess.STDOUT, timeout=30)
    assert (tmp_path / "both.txt").read_text() == "1.1.1+simulated\n"


def test_version_knob_and_pg_vn(dorado, tmp_path):
    env = {**os.environ, "LEDGERBC_SIM_VERSION": "1.3.0+0a1b2c3d"}
    proc = subprocess.run([dorado, "--version"], capture_output=True, text=True, timeout=30, env=env)
    assert proc.stdout == "1.3.0+0a1b2c3d\n" and "Running" in proc.stderr  # dorado >= 1.3: stdout
    assert version_from_output(proc.stdout, proc.stderr) == "1.3.0+0a1b2c3d"

    folder = copy_into(tmp_path / "dna", {"a.pod5": DNA_FILE})
    for claimed in ("1.1.1+simulated", "1.3.0+0a1b2c3d"):
        run(dorado, folder, tmp_path / "out.bam", env={"LEDGERBC_SIM_VERSION": claimed})
        with pysam.AlignmentFile(str(tmp_path / "out.bam"), "rb", check_sq=False) as bam:
            pg = bam.header.to_dict()["PG"]
        assert [(p["ID"], p["PN"], p["VN"]) for p in pg] == [("basecaller", "dorado", claimed)]
        assert pg[0]["CL"] == f'dorado "basecaller" "hac" "{folder}" "--device" "cuda:0"'

    # dorado >= 1.2 prefixes model resolution errors.
    mixed = copy_into(tmp_path / "mixed", {"dna.pod5": DNA_FILE, "rna.pod5": RNA_FILE})
    proc = run(dorado, mixed, tmp_path / "m.bam", env={"LEDGERBC_SIM_VERSION": "1.2.0+abcdef0"})
    assert ("[error] Failed to resolve basecaller models: Could not uniquely resolve chemistry from inhomogeneous "
            "data") in proc.stderr


def test_pg_cl_quotes_like_cpp(dorado, tmp_path):
    folder = copy_into(tmp_path / 'say "hi"', {"a.pod5": DNA_FILE})
    run(dorado, folder, tmp_path / "out.bam")
    with pysam.AlignmentFile(str(tmp_path / "out.bam"), "rb", check_sq=False) as bam:
        cl = bam.header.to_dict()["PG"][0]["CL"]
    assert cl == 'dorado "basecaller" "hac" "' + str(folder).replace('"', '\\"') + '" "--device" "cuda:0"'


# --- barcodes ------------------------------------------------------------------------------------------

KIT = "SQK-NBD114-96"


@pytest.fixture
def barcoded(tmp_path):
    """20 synthetic files of 10 reads (one chemistry)."""
    return make_dataset(tmp_path / "data", 20, seed=3, hostile_names=False, size_spread=False)


def test_kit_name_tags_barcodes_like_dorado(dorado, barcoded, tmp_path):
    proc = run(dorado, tmp_path / "data", tmp_path / "a.bam", "--recursive", "--kit-name", KIT)
    assert proc.returncode == 0, proc.stderr
    header, records = bam_records(tmp_path / "a.bam")
    assert len(records) == 200
    counts = collections.Counter(tags.get("BC") for _, tags in records)
    assert None in counts and "unclassified" not in counts  # the basecaller writes no BC for unclassified
    assert set(counts) - {None} <= {f"{KIT}_barcode{n:02d}" for n in range(1, STANDIN_BARCODES + 1)}
    assert len(counts) >= 5 and 5 <= counts[None] <= 40  # a spread, and about 10% unclassified
    for name, tags in records:
        expected = barcode_for(name, KIT)
        assert tags.get("BC") == (f"{KIT}_{expected}" if expected else None)
        assert list(tags)[0] == "BC" if expected else "BC" not in tags  # dorado writes BC first
        assert tags["RG"].endswith(f"_dna_r10.4.1_e8.2_400bps_hac@v5.2.0_{KIT}_{expected}" if expected
                                   else "_dna_r10.4.1_e8.2_400bps_hac@v5.2.0")
    assert {name for name, _ in records} == set().union(*barcoded.values())
    rg = [line for line in header.splitlines() if line.startswith("@RG")]
    assert sum("\tSM:barcode" in line for line in rg) == 96 * (len(rg) // 97)  # one per run and kit barcode
    assert any(f"_{KIT}_barcode07\t" in line and "\tal:barcode07" in line for line in rg)

    run(dorado, tmp_path / "data", tmp_path / "b.bam", "--recursive", "--kit-name", KIT)
    assert bam_records(tmp_path / "b.bam")[1] == records


def test_sample_sheet_aliases_and_unlisted_barcodes(dorado, barcoded, tmp_path):
    sheet = tmp_path / "sheet.csv"
    # synth: flow cell PAS00000, position 1A, experiment ledgerbc-synthetic.
    sheet.write_text("flow_cell_id,position_id,experiment_id,kit,barcode,alias\n"
                     f"PAS00000,1A,ledgerbc-synthetic,{KIT},barcode01,patient_A\n"
                     f"PAS00000,1A,ledgerbc-synthetic,{KIT},barcode02,patient_B\n")
    proc = run(dorado, tmp_path / "data", tmp_path / "a.bam", "--recursive", "--kit-name", KIT,
               "--sample-sheet", str(sheet))
    assert proc.returncode == 0, proc.stderr
    header, records = bam_records(tmp_path / "a.bam")
    alias = {"barcode01": "patient_A", "barcode02": "patient_B"}
    for name, tags in records:
        expected = alias.get(barcode_for(name, KIT))  # barcodes the sheet does not list: unclassified
        assert tags.get("BC") == expected
        assert barcode_for(name, KIT, {"barcode01", "barcode02"}) in (None, "barcode01", "barcode02")
    counts = collections.Counter(tags.get("BC") for _, tags in records)
    assert counts["patient_A"] > 0 and counts["patient_B"] > 0 and counts[None] > 40
    rg = [line for line in header.splitlines() if line.startswith("@RG")]
    assert sum("\tSM:" in line for line in rg) == 2 * (len(rg) // 3) and any("\tal:patient_A" in line for line in rg)

    # A sheet whose rows match no read's run (another experiment): no alias, listed barcodes keep their name.
    other = tmp_path / "other.csv"
    other.write_text(sheet.read_text().replace("ledgerbc-synthetic", "another-run"))
    run(dorado, tmp_path / "data", tmp_path / "b.bam", "--recursive", "--kit-name", KIT, "--sample-sheet", str(other))
    assert {tags.get("BC") for _, tags in bam_records(tmp_path / "b.bam")[1]} == {
        None, f"{KIT}_barcode01", f"{KIT}_barcode02"}


def test_dorados_own_sample_sheet_on_the_real_barcoded_file(dorado, tmp_path):
    folder = copy_into(tmp_path / "demux", {"bc.pod5": "barcode_demux/read_group_test/"
                                                       "SQK-RBK114_BC01_BC04_unclassified.pod5"})
    sheet = tmp_path / "sample_sheet.csv"
    sheet.write_text("flow_cell_id,kit,sample_id,experiment_id,barcode,alias,type\n"
                     "PAO25751,SQK-RBK114-96,no_sample,,barcode01,patient_id_1,test_sample\n"
                     "PAO25751,SQK-RBK114-96,no_sample,,barcode02,patient_id_2,test_sample\n")
    proc = run(dorado, folder, tmp_path / "out.bam", "--kit-name", "SQK-RBK114-96", "--sample-sheet", str(sheet))
    assert proc.returncode == 0, proc.stderr
    records = bam_records(tmp_path / "out.bam")[1]
    assert {name for name, _ in records} == pod5_read_ids(folder / "bc.pod5")
    for name, tags in records:
        assert tags.get("BC") == {"barcode01": "patient_id_1", "barcode02": "patient_id_2"}.get(
            barcode_for(name, "SQK-RBK114-96"))


def test_bad_kit_and_bad_sample_sheet_stop_dorado(dorado, barcoded, tmp_path):
    proc = run(dorado, tmp_path / "data", tmp_path / "a.bam", "--recursive", "--kit-name", "sqk-nbd114-96")
    assert proc.returncode == 1 and (tmp_path / "a.bam").stat().st_size == 0
    assert "[error] sqk-nbd114-96 is not a valid barcode kit name." in proc.stderr
    sheet = tmp_path / "bad.csv"
    sheet.write_text("flow_cell_id,experiment_id,kit,barcode,alias\nPAS00000,e,K,barcode01,barcode01\n")
    proc = run(dorado, tmp_path / "data", tmp_path / "b.bam", "--recursive", "--kit-name", KIT,
               "--sample-sheet", str(sheet))
    assert proc.returncode == -signal.SIGABRT and (tmp_path / "b.bam").stat().st_size == 0  # uncaught exception
    assert "what():  " in proc.stderr and "alias 'barcode01' is forbidden" in proc.stderr


def test_min_qscore_drops_reads(dorado, barcoded, tmp_path):
    run(dorado, tmp_path / "data", tmp_path / "all.bam", "--recursive")
    run(dorado, tmp_path / "data", tmp_path / "q10.bam", "--recursive", "--min-qscore", "10")
    every = bam_records(tmp_path / "all.bam")[1]
    kept = bam_records(tmp_path / "q10.bam")[1]
    assert kept == [(name, tags) for name, tags in every if tags["qs"] >= 10] and len(kept) < len(every)


def test_reads_under_five_bases_are_dropped(dorado, tmp_path):
    ids = write_pod5(tmp_path / "short" / "s.pod5", 4, samples_per_read=(20, 80), seed=9)
    proc = run(dorado, tmp_path / "short", tmp_path / "out.bam")
    kept = {name for name, _ in bam_records(tmp_path / "out.bam")[1]}
    with pod5.Reader(tmp_path / "short" / "s.pod5") as reader:
        long_enough = {str(r.read_id) for r in reader.reads() if r.num_samples // 10 >= 5}
    assert proc.returncode == 0 and kept == long_enough and kept < set(ids)


# --- failure knobs -------------------------------------------------------------------------------------

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
    parents = parents_by_file(bam_records(tmp_path / "out.bam")[1])
    expected = {}
    for rel, ids in dataset.items():
        expected.setdefault(rel.split("/")[-1], set()).update(ids)
    assert parents == expected

    result = split_bam(tmp_path / "out.bam", {b: f"out/{b}" for b in expected}, tmp_path / "staging")
    assert {b: out.parent_ids for b, out in result.files.items()} == expected
    assert all(out.pass_path.name == out.rel[4:-5] + ".fastq" for out in result.files.values())
