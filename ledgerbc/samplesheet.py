"""dorado's sample sheet (`--sample-sheet CSV` with `--kit-name`), read and checked the way dorado does.

Rules from nanoporetech/dorado dorado/utils/SampleSheet.cpp (unchanged v1.0.0..v1.4.0; docs/dorado-facts.md):
- lines split on `,` with no quoting; `\\n`, `\\r\\n` and `\\r` line ends; the first line names the columns;
- allowed columns: protocol_run_id, flow_cell_id, position_id, sample_id, experiment_id,
  flow_cell_product_code, kit, alias, type, barcode (names are case-sensitive, no spaces);
- at least one of flow_cell_id / position_id; experiment_id and kit are required; barcode and alias
  come together (one without the other is refused);
- every row has as many fields as the header; all rows have the same experiment_id;
- experiment_id, sample_id and alias: at most 40 characters of [A-Za-z0-9_-] (empty is allowed);
- an alias may not be `barcodeNN` (two digits) nor `unclassified`.
dorado stops at the first problem (in dorado 1.x the exception is uncaught: dorado aborts at start);
`parse` reports every problem, one line each. dorado never checks the `kit` column against `--kit-name`,
nor that `barcode` values look like barcodes: `warnings` lists what would silently never match.

At run time dorado (`--sample-sheet`, basecaller) uses a row for a read only when the read's run info
matches it: experiment_id = the run's experiment name, flow_cell_id (if that column exists) = the flow
cell id, position_id (if it exists) = the sequencer position. Barcodes no row lists are unclassified.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ALLOWED_COLUMNS = ("protocol_run_id", "flow_cell_id", "position_id", "sample_id", "experiment_id",
                   "flow_cell_product_code", "kit", "alias", "type", "barcode")
MAX_FIELD_LENGTH = 40
UNCLASSIFIED = "unclassified"
_FREETEXT = re.compile(r"^[A-Za-z0-9_-]*$")
_FORBIDDEN_ALIAS = re.compile(r"^barcode\d{2}$")
_BARCODE = re.compile(r"^barcode\d{2,}$")


def _range(first: int, last: int) -> tuple[str, ...]:
    return tuple(f"barcode{n:02d}" for n in range(first, last + 1))


# `--kit-name` values dorado accepts (barcode_kits::kit_info_map; exact, case-sensitive names) and the
# barcode names it writes for them (normalize_barcode_name: "barcode" + the trailing digits of BC01, NB01,
# RBK26, RLB12A...). From nanoporetech/dorado v1.1.1 dorado/utils/barcode_kits.cpp; SQK-HTB114-96 and
# TWIST-96B/C/D-UDI are in v1.4.0 only.
BARCODE_KITS: dict[str, tuple[str, ...]] = {
    **{kit: _range(1, 12) for kit in (
        "SQK-PBK004", "SQK-LWB001", "SQK-PCB109", "SQK-PCB110", "EXP-NBD103", "EXP-NBD104", "EXP-PBC001",
        "SQK-RAB204", "SQK-RAB201", "SQK-RBK001", "SQK-RBK004", "VSK-PTC001", "VSK-VPS001", "SQK-RPB004",
        "SQK-RLB001")},
    "EXP-NBD114": _range(13, 24),
    **{kit: _range(1, 24) for kit in (
        "SQK-16S024", "SQK-16S114-24", "SQK-MAB114-24", "SQK-DRB004-24", "SQK-PCB111-24", "SQK-PCB114-24",
        "SQK-NBD111-24", "SQK-NBD114-24", "EXP-NBD114-24", "SQK-RBK111-24", "SQK-RBK114-24", "SQK-RPB114-24")},
    **{kit: _range(1, 96) for kit in (
        "EXP-NBD196", "SQK-MLK111-96-XL", "SQK-NBD111-96", "SQK-NBD114-96", "SQK-MLK114-96-XL", "SQK-HTB114-96",
        "EXP-PBC096", "SQK-RBK110-96", "SQK-RBK111-96", "SQK-RBK114-96", "TWIST-96A-UDI", "TWIST-96B-UDI",
        "TWIST-96C-UDI", "TWIST-96D-UDI")},
    "VSK-VMK001": _range(1, 4),
    "VSK-VMK004": _range(1, 10),
    "TWIST-16-UDI": _range(1, 16),
}


def kit_error(kit_name: str) -> str | None:
    """dorado's refusal of a `--kit-name` it does not know (exact, case-sensitive match), else None."""
    if kit_name in BARCODE_KITS:
        return None
    return (f"{kit_name} is not a valid barcode kit name. Please run the help command to find out available "
            "barcode kits.")


@dataclass
class SampleSheet:
    """A parsed sample sheet: its rows as dicts and every problem dorado would refuse it for."""

    path: str
    columns: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)          # with "_line": the row's line number
    problems: list[str] = field(default_factory=list)       # "<file>:<line>: <what is wrong>"
    warnings: list[str] = field(default_factory=list)       # accepted by dorado, but probably not meant

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def barcoded(self) -> bool:
        return "barcode" in self.columns

    def allowed_barcodes(self) -> set[str] | None:
        """The barcodes dorado keeps (every other barcode is unclassified); None: no barcode column."""
        return {row["barcode"] for row in self.rows} if self.barcoded else None

    def aliases(self) -> dict[str, str]:
        """barcode (`barcode01`) -> alias, first row per barcode, ignoring the run columns (for a sheet of one
        flow cell and position, which is what a facility writes)."""
        out: dict[str, str] = {}
        for row in self.rows if self.barcoded else []:
            out.setdefault(row["barcode"], row.get("alias", ""))
        return out

    def alias_for(self, barcode: str, flow_cell_id: str, position_id: str, experiment_id: str) -> str | None:
        """dorado's SampleSheet::get_alias: `barcode` may be `barcodeNN` or `<KIT>_barcodeNN`; the alias of
        the first row matching it and the read's run, else None."""
        if not self.barcoded:
            return None
        if "flow_cell_id" in self.columns and not flow_cell_id:
            return None
        if "position_id" in self.columns and not position_id:
            return None
        barcode_only = barcode.split("_", 1)[1] if "_" in barcode else barcode
        for row in self.rows:
            if (row["experiment_id"] == experiment_id
                    and ("flow_cell_id" not in self.columns or row["flow_cell_id"] == flow_cell_id)
                    and ("position_id" not in self.columns or row["position_id"] == position_id)
                    and row["barcode"] == barcode_only):
                return row.get("alias") or None
        return None


def _split_lines(text: str) -> list[str]:
    """dorado's get_line: the first line end found decides the format (\\n, \\r\\n or \\r)."""
    first_nl, first_cr = text.find("\n"), text.find("\r")
    if first_cr != -1 and (first_nl == -1 or first_cr < first_nl):
        sep = "\r\n" if text[first_cr:first_cr + 2] == "\r\n" else "\r"
    else:
        sep = "\n"
    lines = text.split(sep)
    if lines and lines[-1] == "":
        lines.pop()  # getline does not return an empty last line after the final line end
    return lines


def parse(path, kit_name: str | None = None) -> SampleSheet:
    """Read and validate a sample sheet as dorado does; never raises for bad content (problems instead)."""
    sheet = SampleSheet(str(path))
    where = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        sheet.problems.append(f"{where}:0: cannot open the file ({exc.strerror or exc})")
        return sheet
    lines = _split_lines(text)
    if not lines:
        sheet.problems.append(f"{where}:1: no column headers (the file is empty)")
        return sheet
    columns = lines[0].split(",")
    sheet.columns = columns
    problems = sheet.problems

    for name in columns:
        if name not in ALLOWED_COLUMNS:
            problems.append(f"{where}:1: invalid column {name!r} (allowed: {', '.join(ALLOWED_COLUMNS)})")
    if len(set(columns)) != len(columns):
        dupes = sorted({c for c in columns if columns.count(c) > 1})
        problems.append(f"{where}:1: column named twice: {', '.join(dupes)} (dorado then refuses every row)")
    if "flow_cell_id" not in columns and "position_id" not in columns:
        problems.append(f"{where}:1: must contain at least one of the 'flow_cell_id' and 'position_id' columns")
    if "experiment_id" not in columns:
        problems.append(f"{where}:1: must contain an experiment_id column")
    if "kit" not in columns:
        problems.append(f"{where}:1: must contain a kit column")
    if "barcode" in columns and "alias" not in columns:
        problems.append(f"{where}:1: has a barcode column but no alias column")
    if "alias" in columns and "barcode" not in columns:
        problems.append(f"{where}:1: has an alias column but no barcode column")

    expected_experiment = None
    for number, line in enumerate(lines[1:], start=2):
        values = line.split(",")
        if len(values) != len(columns):
            problems.append(f"{where}:{number}: {len(values)} fields, the header has {len(columns)}")
            continue
        row = dict(zip(columns, values))
        experiment = row.get("experiment_id", "")
        if expected_experiment is None:
            expected_experiment = experiment
        elif experiment != expected_experiment:
            problems.append(f"{where}:{number}: experiment_id {experiment!r} differs from {expected_experiment!r} "
                            "(a sample sheet holds one experiment)")
        for key in ("experiment_id", "sample_id", "alias"):
            value = row.get(key)
            if value is not None and (len(value) > MAX_FIELD_LENGTH or not _FREETEXT.match(value)):
                problems.append(f"{where}:{number}: {key} {value!r} is not valid (at most {MAX_FIELD_LENGTH} "
                                "characters, letters, digits, '-' and '_')")
        alias = row.get("alias")
        if alias is not None and (_FORBIDDEN_ALIAS.match(alias) or alias == UNCLASSIFIED):
            problems.append(f"{where}:{number}: alias {alias!r} is forbidden (it looks like a barcode name or "
                            "'unclassified')")
        row["_line"] = number
        sheet.rows.append(row)

    _warn(sheet, where, kit_name)
    return sheet


def _warn(sheet: SampleSheet, where: str, kit_name: str | None) -> None:
    seen: dict[tuple, int] = {}
    for row in sheet.rows:
        line = row["_line"]
        barcode = row.get("barcode")
        if barcode is not None and not _BARCODE.match(barcode):
            sheet.warnings.append(f"{where}:{line}: barcode {barcode!r} is not of the form barcodeNN: dorado "
                                  "never matches it, its reads end up unclassified")
        if barcode is not None:
            index = (row.get("flow_cell_id"), row.get("position_id"), row.get("experiment_id"), barcode)
            if index in seen:
                sheet.warnings.append(f"{where}:{line}: barcode {barcode!r} is listed again (line {seen[index]} "
                                      "wins)")
            seen.setdefault(index, line)
        kit = row.get("kit")
        if kit_name and kit and kit.upper() != kit_name.upper():
            sheet.warnings.append(f"{where}:{line}: kit {kit!r} is not --kit-name {kit_name!r} (dorado ignores "
                                  "the kit column)")
