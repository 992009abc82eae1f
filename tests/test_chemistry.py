"""ledgerbc.chemistry on the real ONT files: run info keys, dorado's chemistry resolution, models."""
import csv
import shutil
from pathlib import Path

import pod5
import pytest

from ledgerbc import chemistry
from ledgerbc.chemistry import RunInfoKey, can_serve, check_call, model_for, parse_model, read_run_info, resolve
from ledgerbc.testkit import synth

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"
REAL_POD5 = TESTDATA / "real-pod5"
FIVE_KHZ = "dna_r10.4.1_e8.2_400bps_5khz"
# The folders of real-pod5 that are named after the chemistry of their files (mixed/: the file names are).
CHEMISTRY_FOLDERS = {"dna_r10.4.1_e8.2_260bps", "dna_r10.4.1_e8.2_400bps_4khz", FIVE_KHZ, "dna_r9.4.1_e8",
                     "rna002_70bps", "rna004_130bps"}
# The other real files, checked by hand against dorado's tables (docs/dorado-facts.md).
OTHER_FILES = {
    "barcode_demux/read_group_test/SQK-RBK114_BC01_BC04_unclassified.pod5": FIVE_KHZ,
    "cram/single_read/chr1_MAT.pod5": FIVE_KHZ,
    "degenerate/overtrim.pod5": FIVE_KHZ,
    "degenerate/trimming_bomb.pod5": "unknown",                # FLO-MIN106, no kit, 20 kHz
    "duplex/pod5/duplex.pod5": FIVE_KHZ,
    "multi_fast5_zip.pod5": "unknown",                         # no flow cell product code
    "multi_read_pod5/filtered.pod5": "unknown",                # FLO-PRO112 / SQK-Q20EA: no such kit
    "nested_pod5_folder/subfolder/single_na24385.pod5": "unknown",  # FLO-PRO112 is in no kit set
    "poly_a/r10_4_1_5khz_cdna_pod5/r10.4.1_e8.2_5khz_cDNA.pod5": FIVE_KHZ,
    "poly_a/r10_cdna_pod5/cDNA_r10_test.pod5": "dna_r10.4.1_e8.2_400bps_4khz",
    "poly_a/rna004_pod5/rna004_pt_50.pod5": "unknown",         # SQK-RNA002 kit at 4 kHz
    "single_channel_multi_read_pod5/filtered.pod5": FIVE_KHZ,
    "single_na24385.pod5": "unknown",
    "single_split_read/single_split_read.pod5": FIVE_KHZ,
    "split/INSTX-5275/problem_read.pod5": FIVE_KHZ,
}


def real_files() -> dict[str, dict]:
    with open(TESTDATA / "real-pod5.tsv", newline="") as fh:
        return {row["path"]: row for row in csv.DictReader(fh, delimiter="\t")}


def expected_chemistry(rel: str) -> str:
    folder, _, name = rel.partition("/")
    if folder in CHEMISTRY_FOLDERS:
        return folder
    if folder == "mixed":
        return name.split("-", 1)[0]
    return OTHER_FILES[rel]


def test_every_real_file_is_covered():
    assert {p.relative_to(REAL_POD5).as_posix() for p in REAL_POD5.rglob("*.pod5")} == set(real_files())
    for rel in real_files():
        expected_chemistry(rel)  # a KeyError names a file this test does not know


@pytest.mark.parametrize("rel", sorted(real_files()))
def test_resolve_every_real_file(rel, tmp_path):
    copy = Path(shutil.copyfile(REAL_POD5 / rel, tmp_path / "f.pod5"))
    info = read_run_info(copy)
    row = real_files()[rel]
    assert info.read_count == int(row["reads"]) and info.samples == int(row["samples"])
    with pod5.Reader(copy) as reader:
        rows = reader.run_info_table.read_all().to_pylist()
    assert {k.key for k in info.keys} == {
        f"{r['flow_cell_product_code'].upper()}|{r['sequencing_kit'].upper()}|{r['sample_rate']}" for r in rows}
    assert info.homogeneous and len(info.keys) == 1 and info.key == info.keys[0].key
    assert info.first_sample_rate == rows[0]["sample_rate"]

    chem = resolve(info.keys[0])
    assert chem.name == expected_chemistry(rel)
    if chem.name == FIVE_KHZ:
        assert (chem.supported, chem.analyte, chem.sample_rate, chem.unsupported_reason) == (True, "dna", 5000, None)
    elif chem.name == "rna004_130bps":
        assert (chem.supported, chem.analyte, chem.sample_rate) == (True, "rna", 4000)
    elif chem.name == "unknown":
        assert not chem.supported and not chem.deprecated
        assert chem.unsupported_reason.startswith("No supported chemistry found for flowcell_code: '")
        assert chem.unsupported_reason.endswith("Could not resolve chemistry from data: Unknown chemistry")
    else:  # dropped in dorado 1.0: its error names the chemistry and the last version that has it
        label = {"dna_r9.4.1_e8": "DNA r9.4.1 e8", "rna002_70bps": "RNA002"}.get(chem.name, "DNA r10.4.1 e8.2 4kHz")
        assert not chem.supported and chem.deprecated
        assert chem.unsupported_reason == (
            f"The '{label}' chemistry has been deprecated since Dorado v1.0.0. Please use a previous version "
            "which can be found at https://github.com/nanoporetech/dorado/releases/tag/v0.9.6.")


def test_rna_kit_at_an_unknown_rate_is_still_rna():
    chem = resolve(RunInfoKey("FLO-PRO002", "sqk-rna002", 4000))  # poly_a/rna004_pod5/rna004_pt_50.pod5
    assert chem.name == "unknown" and chem.analyte == "rna"
    assert "flowcell_code: 'FLO-PRO002' sequencing_kit: 'SQK-RNA002' sample_rate: 4000" in chem.unsupported_reason


def test_keys_compare_kits_case_insensitively_and_round_trip():
    lower, upper = RunInfoKey("flo-pro114m", "sqk-lsk114", 5000), RunInfoKey("FLO-PRO114M", "SQK-LSK114", 5000)
    assert lower.key == upper.key == "FLO-PRO114M|SQK-LSK114|5000"
    assert resolve(lower) == resolve(upper) == resolve("FLO-PRO114M|SQK-LSK114|5000")
    assert RunInfoKey.parse(lower.key) == upper
    assert RunInfoKey.parse("|SQK-LSK108|4000").key == "|SQK-LSK108|4000"
    with pytest.raises(ValueError):
        RunInfoKey.parse("FLO-PRO114M|SQK-LSK114")


def test_dorado_table_quirks_are_kept():
    # dorado names SQK_LSK114_XL_260 "SQK--260LSK114-XL-260": the real kit name resolves to nothing.
    assert resolve("FLO-PRO114M|SQK-LSK114-XL-260|4000").name == "unknown"
    # HD flow cells: only LSK114 / LSK114-XL, only at 5 kHz.
    assert resolve("FLO-PRO114HD|SQK-LSK114|5000").name == FIVE_KHZ
    assert resolve("FLO-PRO114HD|SQK-NBD114-96|5000").name == "unknown"
    assert resolve("FLO-PRO114HD|SQK-LSK114|4000").name == "unknown"
    assert resolve("FLO-MIN114|SQK-APK114|5000").name == "dna_r10.4.1_e8.2_apk_5khz"
    # The sample rate is part of the key: 4 kHz and 5 kHz R10.4.1 share flow cells and kits.
    assert resolve("FLO-PRO114M|SQK-LSK114|4000").name == "dna_r10.4.1_e8.2_400bps_4khz"
    assert resolve("FLO-PRO114M|SQK-LSK114|4001").name == "unknown"


def test_a_file_with_read_groups_of_two_keys(tmp_path):
    def run_info(key, run):
        return pod5.RunInfo(
            acquisition_id=run, acquisition_start_time=synth._EPOCH, adc_max=4095, adc_min=-4096,
            context_tags={}, experiment_name="x", flow_cell_id="PAS1", flow_cell_product_code=key[0],
            protocol_name="p", protocol_run_id=run, protocol_start_time=synth._EPOCH, sample_id="s",
            sample_rate=key[2], sequencing_kit=key[1], sequencer_position="1A", sequencer_position_type="P",
            software="t", system_name="s", system_type="t", tracking_id={})

    import uuid
    reads = [pod5.Read(read_id=uuid.uuid4(), pore=pod5.Pore(1, 1, "p"), calibration=pod5.Calibration(0.0, 1.0),
                       read_number=i, start_sample=0, median_before=1.0,
                       end_reason=pod5.EndReason.from_reason_with_default_forced(pod5.EndReasonEnum.SIGNAL_POSITIVE),
                       run_info=run_info(key, f"run{i}"), signal=synth._NOISE[:1000 + i])
             for i, key in enumerate([synth.DNA_5KHZ, synth.DNA_5KHZ_NBD, synth.DNA_5KHZ])]
    with pod5.Writer(tmp_path / "two.pod5") as writer:
        writer.add_reads(reads)
    info = read_run_info(tmp_path / "two.pod5")
    assert [k.key for k in info.keys] == ["FLO-PRO114M|SQK-LSK114|5000", "FLO-PRO114M|SQK-NBD114-96|5000"]
    assert info.key == "FLO-PRO114M|SQK-LSK114|5000;FLO-PRO114M|SQK-NBD114-96|5000"
    assert not info.homogeneous and info.read_count == 3 and info.samples == 3003
    # Two keys of one chemistry: dorado resolves them together.
    assert check_call(parse_model("hac"), [info]).ok


@pytest.mark.parametrize("key, name", [
    (synth.DNA_5KHZ, FIVE_KHZ), (synth.DNA_5KHZ_NBD, FIVE_KHZ), (synth.RNA004, "rna004_130bps"),
    (synth.DNA_4KHZ, "dna_r10.4.1_e8.2_400bps_4khz"), (synth.DNA_R941, "dna_r9.4.1_e8"), (synth.RNA002, "rna002_70bps"),
])
def test_synthetic_files_of_a_chemistry(tmp_path, key, name):
    ids = synth.write_pod5(tmp_path / "s.pod5", 3, seed=1, chemistry=key)
    info = read_run_info(tmp_path / "s.pod5")
    assert info.read_count == len(ids) == 3 and info.keys == (RunInfoKey(*key),)
    assert resolve(info.keys[0]).name == name


def test_synthetic_default_is_an_upper_case_supported_kit(tmp_path):
    synth.write_pod5(tmp_path / "d.pod5", 1)
    with pod5.Reader(tmp_path / "d.pod5") as reader:
        run = reader.run_info_table.read_all().to_pylist()[0]
    assert (run["flow_cell_product_code"], run["sequencing_kit"], run["sample_rate"]) == synth.DNA_5KHZ
    assert resolve(read_run_info(tmp_path / "d.pod5").keys[0]).supported


@pytest.mark.parametrize("arg, kind, fields", [
    ("hac", "variant", {"variant": "hac", "version": None, "mods": ()}),
    ("sup@v5.0.0", "variant", {"variant": "sup", "version": "v5.0.0"}),
    ("fast@v5", "variant", {"variant": "fast", "version": "v5.0.0"}),
    ("hac@latest,6mA,5mCG_5hmCG@v2", "variant", {"variant": "hac", "version": None, "mods": ("6mA", "5mCG_5hmCG@v2")}),
    ("dna_r10.4.1_e8.2_400bps_hac@v5.0.0", "explicit",
     {"name": "dna_r10.4.1_e8.2_400bps_hac@v5.0.0", "analyte": "dna", "sample_rate": 5000, "chemistry": FIVE_KHZ}),
    ("rna004_130bps_sup@v5.1.0", "explicit", {"analyte": "rna", "sample_rate": 4000, "chemistry": "rna004_130bps"}),
    ("rna004_130bps_sup@v5.1.0_m6A_DRACH@v1", "explicit",
     {"name": "rna004_130bps_sup@v5.1.0", "mods": ("m6A_DRACH",), "analyte": "rna", "sample_rate": 4000}),
    ("dna_r10.4.1_e8.2_400bps_hac@v4.1.0", "explicit",  # a 4 kHz model, dropped in dorado 1.0
     {"chemistry": "dna_r10.4.1_e8.2_400bps_4khz", "sample_rate": 4000, "deprecated": True}),
    ("/models/dna_r10.4.1_e8.2_400bps_sup@v5.2.0/", "path",
     {"name": "dna_r10.4.1_e8.2_400bps_sup@v5.2.0", "analyte": "dna", "sample_rate": 5000}),
    ("/models/my_own_model", "path", {"name": "my_own_model", "analyte": None, "sample_rate": None}),
    ("HAC", "path", {"name": "HAC"}),  # variants are case-sensitive in dorado
])
def test_parse_model(arg, kind, fields):
    spec = parse_model(arg)
    assert spec.kind == kind and spec.raw == arg and not spec.errors
    for name, value in fields.items():
        assert getattr(spec, name) == value, name


@pytest.mark.parametrize("arg, error", [
    ("hac@v6", "Version: 'v6.0.0' is not an available option"),
    ("hac@x5", "Failed to parse model version: 'x5'"),
    ("hac,nonsense", "has unknown modification variant: 'nonsense'"),
])
def test_parse_model_refuses_what_dorado_refuses(arg, error):
    spec = parse_model(arg)
    assert spec.kind == "variant" and error in spec.errors[0]
    assert check_call(spec, []).error == spec.errors[0]


def test_model_for_a_variant_is_the_newest_matching_model():
    dna, rna = resolve("FLO-PRO114M|SQK-LSK114|5000"), resolve("FLO-PRO004RA|SQK-RNA004|4000")
    assert model_for(parse_model("hac"), dna, "1.1.1") == "dna_r10.4.1_e8.2_400bps_hac@v5.2.0"
    assert model_for(parse_model("auto"), dna) == "dna_r10.4.1_e8.2_400bps_hac@v5.2.0"
    assert model_for(parse_model("sup@v4.3.0"), dna) == "dna_r10.4.1_e8.2_400bps_sup@v4.3.0"
    assert model_for(parse_model("hac"), rna, "1.1.1+abc") == "rna004_130bps_hac@v5.2.0"
    assert model_for(parse_model("hac"), rna, "1.4.0+ba44a01") == "rna004_130bps_hac@v5.3.0"
    with pytest.raises(ValueError, match="No matches for chemistry: dna_r10.4.1_e8.2_400bps_5khz, model_variant: hac, "
                                         "version: v3.5.2"):
        model_for(parse_model("hac@v3.5.2"), dna)
    explicit = parse_model("dna_r10.4.1_e8.2_400bps_hac@v5.0.0")
    assert model_for(explicit, dna) == "dna_r10.4.1_e8.2_400bps_hac@v5.0.0"


def test_can_serve():
    dna, rna = resolve("FLO-PRO114M|SQK-LSK114|5000"), resolve("FLO-PRO004RA|SQK-RNA004|4000")
    apk, r941 = resolve("FLO-PRO114M|SQK-APK114|5000"), resolve("FLO-PRO002|SQK-LSK109|4000")
    unknown_rna = resolve("FLO-PRO002|SQK-RNA002|4000")
    dna_model, rna_model = parse_model("dna_r10.4.1_e8.2_400bps_hac@v5.0.0"), parse_model("rna004_130bps_hac@v5.1.0")
    assert can_serve(dna_model, dna) == (True, None)
    ok, why = can_serve(dna_model, rna)
    assert not ok and "DNA model" in why and "RNA" in why
    ok, why = can_serve(rna_model, dna)
    assert not ok and "RNA model" in why
    assert not can_serve(dna_model, unknown_rna)[0]  # an RNA kit, whatever dorado thinks of its rate
    ok, why = can_serve(dna_model, r941)
    assert not ok and "5000 Hz" in why and "4000 Hz" in why
    assert can_serve(parse_model("sup"), apk) == (True, None)
    ok, why = can_serve(parse_model("hac"), apk)
    assert not ok and why == "No matches for chemistry: dna_r10.4.1_e8.2_apk_5khz, model_variant: hac"
    ok, why = can_serve(parse_model("hac"), r941)
    assert not ok and "'DNA r9.4.1 e8' chemistry has been deprecated" in why
    ok, why = can_serve(parse_model("dna_r9.4.1_e8_hac@v3.3"), r941)
    assert not ok and why.startswith("Deprecated model: 'dna_r9.4.1_e8_hac@v3.3'.")
    ok, why = can_serve(parse_model("/models/custom"), rna)
    assert ok and "not checked" in why


def test_check_call_like_dorado():
    def info(key, rate=None):
        k = RunInfoKey.parse(key)
        return chemistry.FileRunInfo((k,), 10, 1, rate or k.sample_rate)

    dna, dna2, rna = info("FLO-PRO114M|SQK-LSK114|5000"), info("FLO-PRO114M|SQK-RAD114|5000"), info(
        "FLO-PRO004RA|SQK-RNA004|4000")
    hac = parse_model("hac")
    ok = check_call(hac, [dna, dna2])
    assert ok.ok and ok.model == "dna_r10.4.1_e8.2_400bps_hac@v5.2.0" and ok.chemistry.name == FIVE_KHZ

    mixed = check_call(hac, [dna, rna])
    assert not mixed.ok and mixed.error == "Could not uniquely resolve chemistry from inhomogeneous data"
    assert mixed.log == (("error", "Multiple sequencing chemistries found in data"),
                         ("error", f"Found: {FIVE_KHZ}"), ("error", "Found: rna004_130bps"))

    unknown = check_call(hac, [dna, info("FLO-PRO112|SQK-LSK112|4000")])
    assert unknown.error == "Could not resolve chemistry from data: Unknown chemistry"
    assert unknown.log[0] == ("error", "No supported chemistry found for flowcell_code: 'FLO-PRO112' "
                                       "sequencing_kit: 'SQK-LSK112' sample_rate: 4000")
    assert check_call(hac, []).error.startswith("Failed to determine sequencing chemistry from data.")

    explicit = parse_model("dna_r10.4.1_e8.2_400bps_hac@v5.0.0")
    assert check_call(explicit, [dna, rna]).ok  # only the first file is looked at
    refused = check_call(explicit, [rna, dna])
    assert refused.error == "Sample rate for model (5000) and data (4000) are not compatible."
    assert check_call(explicit, [info("FLO-PRO114M|SQK-LSK114|5000", 4950)]).ok  # dorado's ±100 Hz
    assert check_call(parse_model("/m/custom"), [rna], model_sample_rate=5000).error.startswith("Sample rate for")


def test_chemistry_error_finds_dorados_refusal_without_its_log_prefix():
    from ledgerbc.chemistry import chemistry_error

    lines = [
        "[2026-12-05 01:45:22.600] [info] Running: \"basecaller\" \"hac\" \"x\"",
        "[2026-12-05 01:45:22.624] [error] The 'RNA002' chemistry has been deprecated since Dorado v1.0.0. Please "
        "use a previous version which can be found at https://github.com/nanoporetech/dorado/releases/tag/v0.9.6.",
    ]
    assert chemistry_error(lines).startswith("The 'RNA002' chemistry has been deprecated since Dorado v1.0.0.")
    assert chemistry_error(["[2026-12-05 01:45:22.624] [error] Failed to load pod5 file x: IOError"]) is None
    assert chemistry_error(["[x] [error] Failed to resolve basecaller models: Could not uniquely resolve chemistry "
                            "from inhomogeneous data"]).endswith("inhomogeneous data")
