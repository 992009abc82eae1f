"""ledgerbc.samplesheet: dorado's sample sheet rules, one problem per line."""
import pytest

from ledgerbc import samplesheet
from ledgerbc.samplesheet import kit_error, parse

# The sheet dorado's own tests use with barcode_demux/read_group_test (tests/data/barcode_demux/sample_sheet.csv).
DORADO_DEMUX_SHEET = (
    "flow_cell_id,kit,sample_id,experiment_id,barcode,alias,type\n"
    "PAO25751,SQK-RBK114-96,no_sample,,barcode01,patient_id_1,test_sample\n"
    "PAO25751,SQK-RBK114-96,no_sample,,barcode02,patient_id_2,test_sample\n"
)


def write(tmp_path, text, name="sheet.csv"):
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


def test_dorado_demux_sheet_is_valid_and_maps_barcodes(tmp_path):
    sheet = parse(write(tmp_path, DORADO_DEMUX_SHEET), kit_name="SQK-RBK114-96")
    assert sheet.ok and sheet.problems == [] and sheet.warnings == []
    assert sheet.aliases() == {"barcode01": "patient_id_1", "barcode02": "patient_id_2"}
    assert sheet.allowed_barcodes() == {"barcode01", "barcode02"}
    # dorado's get_alias: the read's run must match the row (experiment_id '' here, flow cell PAO25751).
    assert sheet.alias_for("SQK-RBK114-96_barcode01", "PAO25751", "2H", "") == "patient_id_1"
    assert sheet.alias_for("barcode02", "PAO25751", "", "") == "patient_id_2"  # no position_id column
    assert sheet.alias_for("barcode01", "PAO99999", "2H", "") is None
    assert sheet.alias_for("barcode01", "PAO25751", "2H", "another_experiment") is None
    assert sheet.alias_for("barcode01", "", "2H", "") is None
    assert sheet.alias_for("SQK-RBK114-96_barcode03", "PAO25751", "2H", "") is None


def test_windows_and_old_mac_line_ends(tmp_path):
    for eol in ("\r\n", "\r"):
        sheet = parse(write(tmp_path, DORADO_DEMUX_SHEET.replace("\n", eol)))
        assert sheet.ok, sheet.problems
        assert sheet.aliases()["barcode02"] == "patient_id_2"


def test_a_sheet_without_barcodes_is_valid_and_maps_nothing(tmp_path):
    sheet = parse(write(tmp_path, "experiment_id,flow_cell_id,kit,sample_id\nexp,1,a,b\nexp,2,a b,5\nexp,3,x,-_\n"))
    assert sheet.ok and not sheet.barcoded
    assert sheet.aliases() == {} and sheet.allowed_barcodes() is None
    assert sheet.alias_for("barcode01", "1", "", "exp") is None


@pytest.mark.parametrize("text, line, what", [
    ("flow_cell_id,kit,experiment_id,barcode,alias,colour\nF,K,E,barcode01,a,red\n", 1, "invalid column 'colour'"),
    ("kit,experiment_id,barcode,alias\nK,E,barcode01,a\n", 1, "at least one of the 'flow_cell_id' and 'position_id'"),
    ("flow_cell_id,kit,barcode,alias\nF,K,barcode01,a\n", 1, "experiment_id column"),
    ("flow_cell_id,experiment_id,barcode,alias\nF,E,barcode01,a\n", 1, "kit column"),
    ("flow_cell_id,kit,experiment_id,barcode\nF,K,E,barcode01\n", 1, "barcode column but no alias column"),
    ("flow_cell_id,kit,experiment_id,alias\nF,K,E,a\n", 1, "alias column but no barcode column"),
    ("flow_cell_id,kit,experiment_id,barcode,alias\nF,K,E,barcode01\n", 2, "4 fields, the header has 5"),
    ('flow_cell_id,kit,experiment_id,barcode,alias\nF,K,E,barcode01,"a,b"\n', 2, "6 fields"),  # no quoting
    ("flow_cell_id,kit,experiment_id,barcode,alias\nF,K,E,barcode01,a\nF,K,E2,barcode02,b\n", 3,
     "experiment_id 'E2' differs from 'E'"),
    ("flow_cell_id,kit,experiment_id,barcode,alias\nF,K,E,barcode01,barcode07\n", 2, "alias 'barcode07' is forbidden"),
    ("flow_cell_id,kit,experiment_id,barcode,alias\nF,K,E,barcode01,unclassified\n", 2, "forbidden"),
    ("flow_cell_id,kit,experiment_id,barcode,alias\nF,K,E,barcode01,my sample\n", 2, "alias 'my sample' is not valid"),
    ("flow_cell_id,kit,experiment_id,barcode,alias\nF,K,E,barcode01," + "a" * 41 + "\n", 2, "at most 40"),
    ("flow_cell_id,kit,experiment_id,sample_id\nF,K,E,s/1\n", 2, "sample_id 's/1' is not valid"),
    ("flow_cell_id,kit,experiment_id,barcode,alias\nF,K,E,barcode01,a\n\n", 3, "1 fields"),  # a blank last line
    ("\ufeffflow_cell_id,kit,experiment_id\nF,K,E\n", 1, "invalid column '\\ufeffflow_cell_id'"),  # a BOM
    ("", 1, "no column headers"),
])
def test_dorado_refuses(tmp_path, text, line, what):
    path = write(tmp_path, text)
    sheet = parse(path)
    assert not sheet.ok
    assert any(p.startswith(f"{path}:{line}: ") and what in p for p in sheet.problems), sheet.problems
    assert all("\n" not in p for p in sheet.problems)


def test_every_problem_is_reported_one_line_each(tmp_path):
    path = write(tmp_path, "flow_cell_id,kit,experiment_id,barcode,alias\n"
                           "F,K,E,barcode01,ok_alias\n"
                           "F,K,E,barcode02,barcode02\n"
                           "F,K,E,barcode03\n"
                           "F,K,other,barcode04,x y\n")
    problems = parse(path).problems
    assert [p.split(": ", 1)[0] for p in problems] == [f"{path}:3", f"{path}:4", f"{path}:5", f"{path}:5"]


def test_missing_file(tmp_path):
    sheet = parse(tmp_path / "nope.csv")
    assert sheet.problems == [f"{tmp_path / 'nope.csv'}:0: cannot open the file (No such file or directory)"]


def test_warnings_for_what_dorado_accepts_but_never_matches(tmp_path):
    path = write(tmp_path, "flow_cell_id,kit,experiment_id,barcode,alias\n"
                           "F,SQK-NBD114-96,E,barcode1,a\n"
                           "F,SQK-NBD114-96,E,BC02,b\n"
                           "F,SQK-RBK114-24,E,barcode03,c\n"
                           "F,SQK-NBD114-96,E,barcode03,d\n")
    sheet = parse(path, kit_name="SQK-NBD114-96")
    assert sheet.ok
    assert [w.split(": ", 1)[0] for w in sheet.warnings] == [f"{path}:2", f"{path}:3", f"{path}:4", f"{path}:5"]
    assert "barcode 'barcode1' is not of the form barcodeNN" in sheet.warnings[0]
    assert "kit 'SQK-RBK114-24' is not --kit-name" in sheet.warnings[2]
    assert "listed again (line 4 wins)" in sheet.warnings[3]
    assert sheet.aliases()["barcode03"] == "c"


def test_kit_names_are_exact():
    assert kit_error("SQK-NBD114-96") is None
    assert kit_error("sqk-nbd114-96") == ("sqk-nbd114-96 is not a valid barcode kit name. Please run the help "
                                          "command to find out available barcode kits.")
    assert samplesheet.BARCODE_KITS["EXP-NBD114"][0] == "barcode13"
    assert len(samplesheet.BARCODE_KITS["SQK-RBK114-96"]) == 96
