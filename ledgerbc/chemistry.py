"""Run info, chemistries and models as dorado (v1.x) sees them (DESIGN §4 "one chemistry per batch", §5).

Pure functions over dorado's own tables (docs/dorado-facts.md gives the source of every fact):

- `RunInfoKey`: (flow cell product code, sequencing kit, sample rate) of one pod5 read group; `.key` is the
  ledger's batch key `"<FLOWCELL>|<KIT>|<RATE>"`, upper-cased (dorado compares codes case-insensitively).
- `read_run_info(path)`: the keys of every read group (run_info row) of a pod5 file, its reads and samples.
- `resolve(key)`: the `Chemistry` dorado resolves that key to, and whether dorado >= 1.0 has models for it.
- `parse_model(arg)`: what a `dorado basecaller MODEL` argument is (variant, explicit name, or path).
- `can_serve(spec, chemistry)`, `model_for(spec, chemistry)`: whether that model may basecall that data,
  and which model dorado picks for a variant.
- `check_call(spec, files)`: what dorado does at start for one call on these files: the model it runs, or
  the error it fails with (inhomogeneous chemistries, deprecated chemistry, sample rate mismatch...).

No heavy import at module import time: `pod5` is imported inside `read_run_info`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------------------------------------
# dorado's tables, copied as data from nanoporetech/dorado v1.4.0 (ba44a013) dorado/models/kits.h and
# dorado/models/kits.cpp; identical in v1.0.0..v1.4.0 except SQK-HTB114-96 (added in v1.2.0).
# ---------------------------------------------------------------------------------------------------------

# enum class Flowcell, in enum order (dorado sorts chemistry keys by enum value; UNKNOWN sorts last).
FLOWCELLS = (
    "FLO-FLG001", "FLO-FLG114", "FLO-FLG114HD", "FLO-MIN004RA", "FLO-MIN106", "FLO-MIN107", "FLO-MIN112",
    "FLO-MIN114", "FLO-MIN114HD", "FLO-MINSP6", "FLO-PRO001", "FLO-PRO002", "FLO-PRO002-ECO", "FLO-PRO002M",
    "FLO-PRO004RA", "FLO-PRO112", "FLO-PRO114", "FLO-PRO114HD", "FLO-PRO114M",
)
UNKNOWN_FLOWCELL = "__UNKNOWN_FLOWCELL__"

# enum class KitCode, in enum order, with the name string of kit::codes_map. Note dorado's own typo: the
# name of SQK_LSK114_XL_260 is "SQK--260LSK114-XL-260", so a pod5 saying SQK-LSK114-XL-260 resolves to no
# kit (and so no chemistry) in every dorado 1.x.
KITS = (
    "SQK-APK114", "SQK-CS9109", "SQK-DCS108", "SQK-DCS109", "SQK-LRK001", "SQK-LSK108", "SQK-LSK109",
    "SQK-LSK109-XL", "SQK-LSK110", "SQK-LSK110-XL", "SQK-LSK111", "SQK-LSK111-XL", "SQK-LSK112",
    "SQK-LSK112-XL", "SQK-LSK114", "SQK-LSK114-260", "SQK-LSK114-XL", "SQK--260LSK114-XL-260", "SQK-LWP001",
    "SQK-PCS108", "SQK-PCS109", "SQK-PCS111", "SQK-PCS114", "SQK-PCS114-260", "SQK-PSK004", "SQK-RAD002",
    "SQK-RAD003", "SQK-RAD004", "SQK-RAD112", "SQK-RAD114", "SQK-RAD114-260", "SQK-RAS201", "SQK-RLI001",
    "SQK-RNA001", "SQK-RNA002", "SQK-RNA004", "SQK-RNA004-XL", "SQK-ULK001", "SQK-ULK114", "SQK-ULK114-260",
    "VSK-VBK001", "VSK-VSK001", "VSK-VSK003", "VSK-VSK004",
    # barcoding kits
    "SQK-16S024", "SQK-16S114-24", "SQK-16S114-24-260", "SQK-MAB114-24", "SQK-DRB004-24", "SQK-HTB114-96",
    "SQK-LWB001", "SQK-MLK111-96-XL", "SQK-MLK114-96-XL", "SQK-MLK114-96-XL-260", "SQK-NBD111-24",
    "SQK-NBD111-96", "SQK-NBD112-24", "SQK-NBD112-96", "SQK-NBD114-24", "SQK-NBD114-24-260", "SQK-NBD114-96",
    "SQK-NBD114-96-260", "SQK-PBK004", "SQK-PCB109", "SQK-PCB110", "SQK-PCB111-24", "SQK-PCB114-24",
    "SQK-PCB114-24-260", "SQK-RAB201", "SQK-RAB204", "SQK-RBK001", "SQK-RBK004", "SQK-RBK110-96",
    "SQK-RBK111-24", "SQK-RBK111-96", "SQK-RBK114-24", "SQK-RBK114-24-260", "SQK-RBK114-96",
    "SQK-RBK114-96-260", "SQK-RLB001", "SQK-RPB004", "SQK-RPB114-24", "SQK-RPB114-24-260", "VSK-PTC001",
    "VSK-VMK001", "VSK-VMK004", "VSK-VPS001",
)
UNKNOWN_KIT = "__UNKNOWN_KIT__"

_KIT14_FLOWCELLS = ("FLO-MIN114", "FLO-FLG114", "FLO-PRO114", "FLO-PRO114M")
_KIT14_HD_FLOWCELLS = ("FLO-MIN114HD", "FLO-FLG114HD", "FLO-PRO114HD")
_KIT14_400BPS = (
    "SQK-LSK114", "SQK-LSK114-XL", "SQK-ULK114", "SQK-RAD114", "SQK-PCS114", "SQK-HTB114-96", "SQK-NBD114-24",
    "SQK-NBD114-96", "SQK-RBK114-24", "SQK-RBK114-96", "SQK-RPB114-24", "SQK-MLK114-96-XL", "SQK-16S114-24",
    "SQK-MAB114-24", "SQK-PCB114-24",
)
_KIT14_260BPS = (
    "SQK-LSK114-260", "SQK--260LSK114-XL-260", "SQK-ULK114-260", "SQK-RAD114-260", "SQK-PCS114-260",
    "SQK-NBD114-24-260", "SQK-NBD114-96-260", "SQK-RBK114-24-260", "SQK-RBK114-96-260", "SQK-RPB114-24-260",
    "SQK-MLK114-96-XL-260", "SQK-16S114-24-260", "SQK-PCB114-24-260",
)
_KIT10_FLOWCELLS = ("FLO-FLG001", "FLO-MIN106", "FLO-MINSP6", "FLO-PRO001", "FLO-PRO002", "FLO-PRO002-ECO",
                    "FLO-PRO002M")
_KIT10_KITS = (
    "SQK-CS9109", "SQK-DCS108", "SQK-DCS109", "SQK-LRK001", "SQK-LSK108", "SQK-LSK109", "SQK-LSK109-XL",
    "SQK-LSK110", "SQK-LSK110-XL", "SQK-LSK111", "SQK-LSK111-XL", "SQK-LWP001", "SQK-PCS108", "SQK-PCS109",
    "SQK-PCS111", "SQK-PSK004", "SQK-RAD002", "SQK-RAD003", "SQK-RAD004", "SQK-RAS201", "SQK-RLI001",
    "SQK-ULK001", "VSK-VBK001", "VSK-VSK001", "VSK-VSK003", "VSK-VSK004", "SQK-16S024", "SQK-MLK111-96-XL",
    "SQK-NBD111-24", "SQK-NBD111-96", "SQK-PCB109", "SQK-PCB110", "SQK-PCB111-24", "SQK-RBK001", "SQK-RBK004",
    "SQK-RBK110-96", "SQK-RBK111-24", "SQK-RBK111-96", "SQK-RLB001", "SQK-LWB001", "SQK-PBK004", "SQK-RAB201",
    "SQK-RAB204", "SQK-RPB004", "VSK-PTC001", "VSK-VMK001", "VSK-VPS001", "VSK-VMK004",
)
_RNA002_FLOWCELLS = ("FLO-FLG001", "FLO-MIN106", "FLO-MINSP6", "FLO-MIN107", "FLO-PRO001", "FLO-PRO002",
                     "FLO-PRO002-ECO", "FLO-PRO002M")
_DEPRECATED_SINCE, _LAST_SUPPORTING = "v1.0.0", "v0.9.6"


@dataclass(frozen=True)
class _ChemistryRow:
    name: str               # dorado's chemistry name (ChemistryKits.name)
    sample_rate: int
    sample_type: str        # 'DNA' | 'RNA002' | 'RNA004'
    kit_sets: tuple         # ((flowcells, kits), ...): every flowcell x kit pair of a set is this chemistry
    deprecated_name: str | None = None  # the name dorado's deprecation error uses (chemistry::deprecated)


# chemistry::kit_map, in enum class Chemistry order (the order dorado lists them in "Found: ..." lines).
CHEMISTRIES = (
    _ChemistryRow("dna_r9.4.1_e8", 4000, "DNA", ((_KIT10_FLOWCELLS, _KIT10_KITS),), "DNA r9.4.1 e8"),
    # dorado's deprecation table calls 260 bps "DNA r10.4.1 e8.2 4kHz" too (it is a 4 kHz chemistry).
    _ChemistryRow("dna_r10.4.1_e8.2_260bps", 4000, "DNA", ((_KIT14_FLOWCELLS, _KIT14_260BPS),),
                  "DNA r10.4.1 e8.2 4kHz"),
    _ChemistryRow("dna_r10.4.1_e8.2_apk_5khz", 5000, "DNA", ((_KIT14_FLOWCELLS, ("SQK-APK114",)),)),
    _ChemistryRow("dna_r10.4.1_e8.2_400bps_4khz", 4000, "DNA", ((_KIT14_FLOWCELLS, _KIT14_400BPS),),
                  "DNA r10.4.1 e8.2 4kHz"),
    _ChemistryRow("dna_r10.4.1_e8.2_400bps_5khz", 5000, "DNA",
                  ((_KIT14_FLOWCELLS, _KIT14_400BPS), (_KIT14_HD_FLOWCELLS, ("SQK-LSK114", "SQK-LSK114-XL")))),
    _ChemistryRow("rna002_70bps", 3000, "RNA002", ((_RNA002_FLOWCELLS, ("SQK-RNA002",)),), "RNA002"),
    _ChemistryRow("rna004_130bps", 4000, "RNA004",
                  ((("FLO-PRO004RA", "FLO-MIN004RA"), ("SQK-RNA004", "SQK-RNA004-XL", "SQK-DRB004-24")),)),
)
UNKNOWN_CHEMISTRY = "unknown"  # dorado: Chemistry::UNKNOWN, named "__UNKNOWN_CHEMISTRY__"

_BY_NAME = {row.name: row for row in CHEMISTRIES}
_CHEMISTRY_MAP: dict[tuple[str, str, int], str] = {}
for _row in CHEMISTRIES:
    for _flowcells, _kits in _row.kit_sets:
        for _fc in _flowcells:
            for _kit in _kits:
                _CHEMISTRY_MAP.setdefault((_fc, _kit, _row.sample_rate), _row.name)
# A kit's analyte, to tell an unknown chemistry's analyte from its kit (an RNA kit at an unexpected rate).
_KIT_ANALYTE = {kit: ("rna" if row.sample_type.startswith("RNA") else "dna")
                for row in CHEMISTRIES for _fcs, kits in row.kit_sets for kit in kits}


def _analyte(sample_type: str | None) -> str | None:
    if sample_type is None:
        return None
    return "rna" if sample_type.upper().startswith("RNA") else "dna"


# ---------------------------------------------------------------------------------------------------------
# Run info
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunInfoKey:
    """One read group's (flow cell product code, sequencing kit, sample rate), as written by MinKNOW."""

    flow_cell_product_code: str
    sequencing_kit: str
    sample_rate: int

    @property
    def key(self) -> str:
        """The batch key `"<FLOWCELL>|<KIT>|<RATE>"`, upper-cased (`sqk-lsk114` = `SQK-LSK114`)."""
        return f"{(self.flow_cell_product_code or '').upper()}|{(self.sequencing_kit or '').upper()}|{int(self.sample_rate)}"

    @classmethod
    def parse(cls, key: str) -> "RunInfoKey":
        """The inverse of `.key` (ValueError for anything else)."""
        parts = key.split("|")
        if len(parts) != 3 or not parts[2].lstrip("-").isdigit():
            raise ValueError(f"not a run info key '<FLOWCELL>|<KIT>|<RATE>': {key!r}")
        return cls(parts[0], parts[1], int(parts[2]))

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class FileRunInfo:
    """What a pod5 file says about its chemistry: the distinct keys of its read groups (file order)."""

    keys: tuple[RunInfoKey, ...]
    samples: int        # signal samples of all reads
    read_count: int
    first_sample_rate: int | None = None  # of run_info row 0: all an explicit model is checked against

    @property
    def key(self) -> str:
        """The file's batch key: its one key, or its distinct keys sorted and joined with ';'."""
        return ";".join(sorted({k.key for k in self.keys}))

    @property
    def homogeneous(self) -> bool:
        return len({k.key for k in self.keys}) <= 1


def read_run_info(path) -> FileRunInfo:
    """Read the run info of every read group of a pod5 file (exceptions of `pod5` pass through)."""
    import pod5  # slow import: only when a file is really read

    with pod5.Reader(path) as reader:
        return run_info_of(reader)


def run_info_of(reader) -> FileRunInfo:
    """`read_run_info` of an open `pod5.Reader` (the scan opens each file once)."""
    rows = reader.run_info_table.read_all().to_pylist()
    samples = 0
    table = reader.read_table
    for i in range(table.num_record_batches):
        samples += sum(n or 0 for n in table.get_batch(i).column("num_samples").to_pylist())
    count = reader.num_reads
    keys: list[RunInfoKey] = []
    for row in rows:
        k = RunInfoKey(row.get("flow_cell_product_code") or "", row.get("sequencing_kit") or "",
                       int(row.get("sample_rate") or 0))
        if k.key not in {seen.key for seen in keys}:
            keys.append(k)
    first_rate = int(rows[0].get("sample_rate") or 0) if rows else None
    return FileRunInfo(tuple(keys), samples, count, first_rate)


# ---------------------------------------------------------------------------------------------------------
# Chemistry
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chemistry:
    """The chemistry dorado resolves a run info key to, and whether dorado >= 1.0 can basecall it."""

    name: str                       # dorado's chemistry name, or "unknown"
    analyte: str | None             # 'dna' | 'rna'; for an unknown chemistry, told from its kit when known
    sample_rate: int                # of the key (for a known chemistry: the chemistry's rate)
    supported: bool                 # dorado >= 1.0 resolves a model variant for it
    unsupported_reason: str | None  # dorado's own error text when not supported
    sample_type: str | None = None  # 'DNA' | 'RNA002' | 'RNA004' (dorado's SampleType)
    deprecated: bool = False        # dropped in dorado v1.0.0: the last dorado with models is 0.9.6
    flowcell: str = UNKNOWN_FLOWCELL  # dorado's flow cell code, or __UNKNOWN_FLOWCELL__
    kit: str = UNKNOWN_KIT            # dorado's kit name, or __UNKNOWN_KIT__


def _code(value: str, names) -> str | None:
    value = (value or "").upper()
    return value if value in names else None


def dorado_key_text(key: RunInfoKey) -> str:
    """How dorado prints a chemistry key (models::to_string(ChemistryKey)), unknown codes as its placeholders."""
    fc = _code(key.flow_cell_product_code, FLOWCELLS) or UNKNOWN_FLOWCELL
    kit = _code(key.sequencing_kit, KITS) or UNKNOWN_KIT
    return f"flowcell_code: '{fc}' sequencing_kit: '{kit}' sample_rate: {int(key.sample_rate)}"


def deprecation_error(name: str) -> str:
    """dorado's error for a chemistry it dropped (models::throw_on_deprecated_chemistry)."""
    label = _BY_NAME[name].deprecated_name
    return (f"The '{label}' chemistry has been deprecated since Dorado {_DEPRECATED_SINCE}. Please use a previous "
            f"version which can be found at https://github.com/nanoporetech/dorado/releases/tag/{_LAST_SUPPORTING}.")


def resolve(key: RunInfoKey | str) -> Chemistry:
    """The chemistry dorado resolves `key` to (file_info::get_unique_sequencing_chemistry per key)."""
    if isinstance(key, str):
        key = RunInfoKey.parse(key)
    fc = _code(key.flow_cell_product_code, FLOWCELLS)
    kit = _code(key.sequencing_kit, KITS)
    rate = int(key.sample_rate)
    name = _CHEMISTRY_MAP.get((fc, kit, rate)) if fc and kit else None
    if name is None:
        return Chemistry(
            UNKNOWN_CHEMISTRY, _KIT_ANALYTE.get(kit), rate, False,
            f"No supported chemistry found for {dorado_key_text(key)}; "
            "Could not resolve chemistry from data: Unknown chemistry",
            None, False, fc or UNKNOWN_FLOWCELL, kit or UNKNOWN_KIT)
    row = _BY_NAME[name]
    deprecated = row.deprecated_name is not None
    return Chemistry(name, _analyte(row.sample_type), row.sample_rate, not deprecated,
                     deprecation_error(name) if deprecated else None, row.sample_type, deprecated, fc, kit)


# ---------------------------------------------------------------------------------------------------------
# Models: dorado/models/models.cpp (simplex model lists) and dorado/models/metadata.cpp (variants, versions)
# ---------------------------------------------------------------------------------------------------------

VARIANTS = ("auto", "fast", "hac", "sup")  # "auto" selects the hac models (ModelVariantPair.is_auto)
MODS_VARIANTS = ("2OmeG", "4mC_5mC", "5mC_5hmC", "5mCG", "5mCG_5hmCG", "5mC", "m5C", "m5C_2OmeC", "6mA", "m6A",
                 "m6A_DRACH", "inosine_m6A", "inosine_m6A_2OmeA", "pseU", "pseU_2OmeU")
MODEL_VERSIONS = ("v1.0.0", "v2.0.0", "v2.0.1", "v3.0.0", "v3.0.1", "v3.1.0", "v3.5.2", "v4.0.0", "v4.1.0",
                  "v4.2.0", "v4.3.0", "v5.0.0", "v5.1.0", "v5.2.0", "v5.3.0")  # v5.3.0: dorado >= 1.4


def _models(chemistry: str, prefix: str, versions: str, variants=("fast", "hac", "sup"), since="1.0.0"):
    return [(f"{prefix}_{variant}@{version}", chemistry, variant, version, since)
            for version in versions.split() for variant in variants]


# (name, chemistry, variant, version, first dorado that lists it) of every released simplex model.
SIMPLEX_MODELS = tuple(
    _models("dna_r10.4.1_e8.2_400bps_5khz", "dna_r10.4.1_e8.2_400bps", "v4.2.0 v4.3.0 v5.0.0 v5.2.0")
    + _models("dna_r10.4.1_e8.2_apk_5khz", "dna_r10.4.1_e8.2_apk", "v5.0.0", ("sup",))
    + _models("rna004_130bps", "rna004_130bps", "v3.0.1 v5.0.0 v5.1.0 v5.2.0")
    + _models("rna004_130bps", "rna004_130bps", "v5.3.0", since="1.4.0")
)
# simplex::deprecated: dorado >= 1.0 refuses them ("Deprecated model: ...").
DEPRECATED_MODELS = tuple(
    [("dna_r9.4.1_e8_fast@v3.4", "dna_r9.4.1_e8", "fast", "v3.4"),
     ("dna_r9.4.1_e8_hac@v3.3", "dna_r9.4.1_e8", "hac", "v3.3"),
     ("dna_r9.4.1_e8_sup@v3.3", "dna_r9.4.1_e8", "sup", "v3.3"),
     ("dna_r9.4.1_e8_sup@v3.6", "dna_r9.4.1_e8", "sup", "v3.6"),
     ("rna002_70bps_fast@v3", "rna002_70bps", "fast", "v3"),
     ("rna002_70bps_hac@v3", "rna002_70bps", "hac", "v3")]
    + [m[:4] for m in _models("dna_r10.4.1_e8.2_260bps", "dna_r10.4.1_e8.2_260bps", "v3.5.2 v4.0.0 v4.1.0")]
    + [m[:4] for m in _models("dna_r10.4.1_e8.2_400bps_4khz", "dna_r10.4.1_e8.2_400bps", "v3.5.2 v4.0.0 v4.1.0")]
)
_MODEL_INFO = {m[0]: m for m in SIMPLEX_MODELS}
_DEPRECATED_INFO = {m[0]: m for m in DEPRECATED_MODELS}
# "<simplex model>_<mods>@v<N>": a modified-base model name; dorado runs its simplex parent plus the mods.
_MODS_NAME = re.compile(r"^(?P<simplex>.+?@v[0-9.]+?)_(?P<mods>[A-Za-z0-9_]+)@v(?P<ver>[0-9.]+)$")
SAMPLE_RATE_TOLERANCE = 100  # utils::eq_with_tolerance(data, model, 100) in the compatibility check


def _version_tuple(version: str) -> tuple:
    """(1, 4, 0) from "v1.4.0", "1.4.0+ba44a01" or "1.4"; missing parts count as 0."""
    parts = version.lstrip("v").split("+", 1)[0].split(".")
    nums = [int(p) if p.isdigit() else 0 for p in parts]
    return tuple(nums + [0] * (3 - len(nums)))


@dataclass(frozen=True)
class ModelSpec:
    """A `dorado basecaller MODEL` argument, understood as dorado understands it (ModelComplex::parse)."""

    raw: str
    kind: str                        # 'variant' | 'explicit' | 'path'
    name: str | None = None          # explicit: the simplex model name; path: the folder's base name
    variant: str | None = None       # variant: 'auto'|'fast'|'hac'|'sup'
    version: str | None = None       # variant: 'vX.Y.Z' or None for latest
    mods: tuple[str, ...] = ()       # variant: modification variants; explicit: the mods of a modbase name
    chemistry: str | None = None     # explicit/path with a known name: the model's chemistry
    analyte: str | None = None       # 'dna' | 'rna' when known
    sample_rate: int | None = None   # the data sample rate the model is for, when known
    deprecated: bool = False         # a model of a chemistry dropped in dorado 1.0
    errors: tuple[str, ...] = field(default=(), compare=False)  # dorado's parse errors (argument refused)


def parse_model(model: str) -> ModelSpec:
    """Classify a model argument: `hac`, `sup@v5.0.0`, `hac,6mA` (variant); a released model name such as
    `dna_r10.4.1_e8.2_400bps_hac@v5.0.0` or `rna004_130bps_sup@v5.1.0_m6A@v1` (explicit); anything else
    (path). A variant with a bad version or modification is returned with `errors` (dorado refuses it)."""
    raw = model
    first = raw.split(",")[0]
    explicit = _explicit(first)
    if explicit is not None:
        return explicit if "," not in raw else _replace(explicit, raw=raw)
    parts = raw.split(",")
    head, _, head_ver = parts[0].partition("@")
    if head in VARIANTS and parts[0].count("@") <= 1:
        errors = []
        version = _parse_version(head_ver, errors) if head_ver else None
        mods = []
        for part in parts[1:]:
            name, _, ver = part.partition("@")
            if name not in MODS_VARIANTS:
                errors.append(f"Model complex '{raw}' has unknown modification variant: '{name}' - Choices: "
                              + ", ".join(MODS_VARIANTS))
            else:
                if ver:
                    _parse_version(ver, errors)
                mods.append(part)
        return ModelSpec(raw, "variant", variant=head, version=version, mods=tuple(mods), errors=tuple(errors))
    name = raw.rstrip("/").rsplit("/", 1)[-1]
    known = _explicit(name)
    if known is not None:
        return _replace(known, raw=raw, kind="path")
    return ModelSpec(raw, "path", name=name)


def _replace(spec: ModelSpec, **changes) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, **changes)


def _parse_version(text: str, errors: list) -> str | None:
    """ModelComplex::parse_variant_version: 'latest' or v<digits>[.<digits>...] padded to three parts."""
    if text == "latest":
        return None
    lowered = text.lower()
    nums = lowered[1:].split(".") if lowered.startswith("v") else None
    if not nums or any(not n.isdigit() for n in nums):
        errors.append(f"Failed to parse model version: '{text}'")
        return None
    version = "v" + ".".join((nums + ["0", "0"])[:max(3, len(nums))])
    if version not in MODEL_VERSIONS:
        errors.append(f"Version: '{version}' is not an available option")
        return None
    return version


def _explicit(name: str) -> ModelSpec | None:
    """A released (or deprecated) model name, possibly a modified-base model's, else None."""
    mods: tuple[str, ...] = ()
    simplex = name
    if name not in _MODEL_INFO and name not in _DEPRECATED_INFO:
        match = _MODS_NAME.match(name)
        if not match or match.group("mods") not in MODS_VARIANTS:
            return None
        simplex, mods = match.group("simplex"), (match.group("mods"),)
    info = _MODEL_INFO.get(simplex) or _DEPRECATED_INFO.get(simplex)
    if info is None:
        return None
    row = _BY_NAME[info[1]]
    return ModelSpec(name, "explicit", name=simplex, variant=info[2], version=info[3], mods=mods,
                     chemistry=row.name, analyte=_analyte(row.sample_type), sample_rate=row.sample_rate,
                     deprecated=simplex in _DEPRECATED_INFO)


def deprecated_model_error(name: str) -> str:
    """dorado's error for a model of a dropped chemistry (models::throw_on_deprecated_model)."""
    chemistry = _DEPRECATED_INFO[name][1]
    return (f"Deprecated model: '{name}'. The {chemistry} chemistry has been deprecated since Dorado version "
            "1.0.0. Please use a previous version which can be found at "
            "https://github.com/nanoporetech/dorado/releases/tag/v0.9.6")


def model_for(spec: ModelSpec, chemistry: Chemistry, dorado_version: str | None = None) -> str:
    """The simplex model dorado runs for `spec` on data of `chemistry` (ValueError with dorado's message if
    none). A variant picks the newest matching released model (models::find_model); explicit/path: itself."""
    if spec.kind != "variant":
        return spec.name or spec.raw
    if chemistry.name == UNKNOWN_CHEMISTRY:
        raise ValueError(chemistry.unsupported_reason)
    if chemistry.deprecated:
        raise ValueError(chemistry.unsupported_reason)
    variant = "hac" if spec.variant == "auto" else spec.variant
    have = _version_tuple(dorado_version) if dorado_version else None
    matches = [m for m in SIMPLEX_MODELS
               if m[1] == chemistry.name and m[2] == variant and (spec.version is None or m[3] == spec.version)
               and (have is None or _version_tuple(m[4]) <= have)]
    if not matches:
        what = f"chemistry: {chemistry.name}, model_variant: {spec.variant}"
        what += f", version: {spec.version}" if spec.version else ""
        raise ValueError(f"No matches for {what}")
    return max(matches, key=lambda m: _version_tuple(m[3]))[0]


def can_serve(spec: ModelSpec, chemistry: Chemistry) -> tuple[bool, str | None]:
    """May `spec` basecall data of `chemistry`? For a variant: dorado resolves a model for it. For an
    explicit model: analyte and sample rate (dorado's ±100 Hz) must match; dorado itself checks only the
    first file's sample rate, so a file this refuses would be basecalled with the wrong model, silently."""
    if spec.kind == "variant":
        try:
            model_for(spec, chemistry)
        except ValueError as exc:
            return False, str(exc)
        return True, None
    label = spec.name or spec.raw
    if spec.deprecated:
        return False, deprecated_model_error(spec.name)
    if spec.analyte and chemistry.analyte and spec.analyte != chemistry.analyte:
        return False, (f"model {label} is a {spec.analyte.upper()} model; this file is {chemistry.analyte.upper()} "
                       f"({chemistry.name}, {chemistry.sample_rate} Hz)")
    if spec.sample_rate and abs(spec.sample_rate - chemistry.sample_rate) > SAMPLE_RATE_TOLERANCE:
        return False, (f"model {label} is for {spec.sample_rate} Hz data; this file is {chemistry.sample_rate} Hz "
                       f"({chemistry.name})")
    if spec.analyte is None or spec.sample_rate is None:
        return True, f"model {label} is not in dorado's tables: its analyte and sample rate are not checked"
    return True, None


# The errors dorado fails a whole call with because of the data's chemistry (or the model's fit to it): no
# retry can help, so the batch's files are failed at once (docs/dorado-facts.md has the texts).
CHEMISTRY_ERRORS = (
    "Could not uniquely resolve chemistry", "Could not resolve chemistry", "No supported chemistry found",
    "has been deprecated since Dorado", "are not compatible", "Deprecated model",
    "Failed to determine sequencing chemistry",
)


def chemistry_error(lines) -> str | None:
    """The line of dorado's log that says it refused the data's chemistry, or None."""
    for line in reversed(list(lines)):
        if any(marker in line for marker in CHEMISTRY_ERRORS):
            return line.split("[error] ", 1)[-1].strip()  # without spdlog's time and level
    return None


# ---------------------------------------------------------------------------------------------------------
# One dorado call
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CallCheck:
    """What dorado decides at start for one `basecaller` call, before it writes anything."""

    ok: bool
    model: str | None                       # the simplex model it runs (resolved variant, name, path name)
    chemistry: Chemistry | None = None      # variant: the one chemistry of the data
    error: str | None = None                # the exception text dorado exits 1 with
    log: tuple[tuple[str, str], ...] = ()   # (level, message) lines dorado logs before/instead of it


def _sort_key(key: RunInfoKey) -> tuple:
    """dorado's std::set<ChemistryKey> order: by Flowcell enum, KitCode enum, then sample rate."""
    fc = _code(key.flow_cell_product_code, FLOWCELLS)
    kit = _code(key.sequencing_kit, KITS)
    return (FLOWCELLS.index(fc) if fc else len(FLOWCELLS), KITS.index(kit) if kit else len(KITS),
            int(key.sample_rate))


def check_call(spec: ModelSpec, files: list[FileRunInfo], dorado_version: str | None = None,
               model_sample_rate: int | None = None) -> CallCheck:
    """Model resolution of `dorado basecaller MODEL DIR` over the readable pod5 files of DIR, in dorado's
    order (dorado lists DIR in directory order: which file is "first" is not up to the caller).

    Variant: every read group of every file is resolved; any unknown key, more than one chemistry, or a
    deprecated chemistry fails the call. Explicit/path: only run_info row 0 of the first file is checked,
    against the model's sample rate (`model_sample_rate` overrides it, as a model folder's config.toml does).
    """
    if spec.errors:
        return CallCheck(False, None, error=spec.errors[0])
    if spec.kind != "variant":
        if spec.deprecated:
            return CallCheck(False, spec.name, error=deprecated_model_error(spec.name))
        rate = model_sample_rate or spec.sample_rate
        data_rate = next((f.first_sample_rate for f in files if f.first_sample_rate is not None), None)
        if data_rate is None:
            return CallCheck(True, spec.name or spec.raw, log=(("warning", (
                "Could not check that model sampling rate and data sampling rate match. Proceed with caution. "
                "Reason: Unable to determine sample rate for data.")),))
        if rate is not None and abs(rate - data_rate) > SAMPLE_RATE_TOLERANCE:
            return CallCheck(False, spec.name or spec.raw,
                             error=f"Sample rate for model ({rate}) and data ({data_rate}) are not compatible.")
        return CallCheck(True, spec.name or spec.raw)

    keys = sorted({k.key: k for f in files for k in f.keys}.values(), key=_sort_key)
    if not keys:
        return CallCheck(False, None, error="Failed to determine sequencing chemistry from data. Please select a "
                                            "model by path")
    found: dict[str, Chemistry] = {}
    for key in keys:
        chem = resolve(key)
        if chem.name == UNKNOWN_CHEMISTRY:
            return CallCheck(False, None, chem, error="Could not resolve chemistry from data: Unknown chemistry",
                             log=(("error", f"No supported chemistry found for {dorado_key_text(key)}"),
                                  ("error", "This is typically seen when using prototype kits. Please download an "
                                            "appropriate model for your data and select it by model path")))
        found.setdefault(chem.name, chem)
    if len(found) > 1:
        names = [row.name for row in CHEMISTRIES if row.name in found]
        return CallCheck(False, None, error="Could not uniquely resolve chemistry from inhomogeneous data",
                         log=(("error", "Multiple sequencing chemistries found in data"),)
                         + tuple(("error", f"Found: {n}") for n in names))
    chem = next(iter(found.values()))
    try:
        model = model_for(spec, chem, dorado_version)
    except ValueError as exc:
        log = () if chem.deprecated else (("error", "Failed to get simplex model"),)
        return CallCheck(False, None, chem, error=str(exc), log=log)
    return CallCheck(True, model, chem)
