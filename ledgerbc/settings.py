"""What `init` was given. Stored in the ledger (workers need only its path) and in
`OUTPUT_DIR/ledgerbc.settings.json` (so that a rebuilt ledger gets them back)."""

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInput

from .layout import EMITS as EMIT_CHOICES

SETTINGS_FILE = "ledgerbc.settings.json"
SAMPLE_SHEET_COPY = "ledgerbc.sample_sheet.csv"  # init's copy of --sample-sheet, in OUTPUT_DIR


@dataclass
class Settings:
    input_dir: str
    output_dir: str
    model: str = "hac"  # the default model (a variant, a released model name, or a model folder)
    batch_files: int | None = None  # fixed file count per batch, or
    batch_bytes: int | None = 20 * 1024**3  # a byte target per batch (the default)
    lease: float = 15 * 60
    heartbeat: float = 60
    clock_skew: float = 60
    max_attempts: int = 3
    min_qscore: float = 0.0
    emit: str = "fastq"
    dorado: str = "dorado"
    dorado_args: list[str] = field(default_factory=list)
    models_directory: str | None = None
    batch_timeout: float | None = None  # None: derived from batch size, see run.py
    settle: float = 60  # follow mode: a file must be unchanged this long before it is admitted
    simulated: bool = False  # the demo's stand-in basecaller: outputs are not real basecalls
    kit_name: str | None = None  # barcoding kit: dorado classifies while it basecalls; outputs per barcode
    sample_sheet: str | None = None  # the copy of the sample sheet init keeps in OUTPUT_DIR (aliases)
    dorado_version: str | None = None  # the study's dorado (`dorado --version`); workers with another refuse
    allow_dorado_upgrade: bool = False  # let workers with a newer dorado version join (status shows both)
    # per-chemistry models: {dorado chemistry name or run info key: model} (modelplan.py); beat `model`
    chemistry_models: dict[str, str] = field(default_factory=dict)

    def validate(self) -> list[str]:
        """Raise BadInput on impossible values; return warnings for unwise ones."""
        if self.emit not in EMIT_CHOICES:
            raise BadInput(f"--emit must be one of {', '.join(EMIT_CHOICES)}, not '{self.emit}'.")
        if self.max_attempts < 1:
            raise BadInput("--max-attempts must be at least 1.")
        if self.batch_files is not None and self.batch_files < 1:
            raise BadInput("--batch-files must be at least 1.")
        if self.batch_bytes is not None and self.batch_bytes < 1:
            raise BadInput("--batch-size must be positive.")
        if self.heartbeat <= 0 or self.lease <= 0:
            raise BadInput("--lease and --heartbeat must be positive durations.")
        if self.heartbeat >= self.lease:
            raise BadInput(
                f"--heartbeat ({self.heartbeat:g}s) must be shorter than --lease ({self.lease:g}s), "
                "or every live batch would look expired."
            )
        from . import dorado, modelplan

        refused = dorado.refused_args(self.dorado_args) + modelplan.problems(self.model, self.chemistry_models or {})
        if refused:
            raise BadInput("\n".join(refused))  # one line each: the CLI prints each as its own `Error:` line
        self._check_barcoding()
        warnings = []
        if self.lease < 3 * self.heartbeat:
            warnings.append("--lease is less than 3 heartbeats: one slow ledger write may expire a live batch.")
        if self.lease < 120:
            warnings.append("--lease under 2 minutes is meant for tests; on a cluster use 10m or more.")
        if self.clock_skew < 5:
            warnings.append("--clock-skew under 5s: nodes whose clocks drift may lose live batches.")
        return warnings

    def _check_barcoding(self) -> None:
        """--kit-name as dorado accepts it (exact case), --sample-sheet only with it. (`--dorado-arg --kit-name`
        and `--sample-sheet` are refused with the other contract-breaking arguments: dorado.refused_args.)"""
        from .samplesheet import BARCODE_KITS

        if self.kit_name is not None and self.kit_name not in BARCODE_KITS:
            near = [k for k in BARCODE_KITS if k.upper() == self.kit_name.upper()]
            hint = f" (kit names are case-sensitive: {near[0]})" if near else ""
            raise BadInput(f"--kit-name {self.kit_name!r} is not a barcode kit dorado knows{hint}. Give one of "
                           "the kit names `dorado basecaller --help` lists.")
        if self.sample_sheet and not self.kit_name:
            raise BadInput("--sample-sheet needs --kit-name: dorado reads the sheet only when it classifies "
                           "barcodes. Give the kit too.")

    @property
    def barcoded(self) -> bool:
        """Outputs per barcode (`--kit-name`): pass|fail/<barcode>/<rel>, the summary is the done marker."""
        return self.kit_name is not None

    @property
    def sample_sheet_path(self) -> Path | None:
        """init's copy of the sample sheet (stored relative to OUTPUT_DIR: any mount of it finds the copy)."""
        if not self.sample_sheet:
            return None
        path = Path(self.sample_sheet)
        return path if path.is_absolute() else self.output_path / path

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Settings":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    # INPUT_DIR and OUTPUT_DIR inside the ledger's folder are stored relative to it, so that a worker that
    # reaches the shared filesystem under another mount point (another node's /mnt/..., a bind mount)
    # finds them through its own path to the ledger. Paths outside that folder stay absolute.
    def stored_for(self, ledger_folder) -> "Settings":
        """A copy to store in a ledger living in `ledger_folder` (paths inside it made relative)."""
        base = Path(os.path.realpath(ledger_folder))

        def rel(path: str) -> str:
            p = Path(path)
            if not p.is_absolute():
                return path
            try:
                return Path(os.path.realpath(p)).relative_to(base).as_posix()
            except ValueError:
                return path

        return dataclasses.replace(self, input_dir=rel(self.input_dir), output_dir=rel(self.output_dir))

    def resolved(self, ledger_folder) -> "Settings":
        """A copy with relative INPUT_DIR/OUTPUT_DIR made absolute against the ledger's folder as this
        process sees it (not resolving symlinks: the worker keeps its own mount point)."""
        base = Path(os.path.abspath(ledger_folder))

        def absolute(path: str) -> str:
            return path if Path(path).is_absolute() else os.path.normpath(base / path)

        return dataclasses.replace(self, input_dir=absolute(self.input_dir), output_dir=absolute(self.output_dir))

    def write_json(self) -> Path:
        """Write the settings beside the outputs, atomically."""
        path = self.output_path / SETTINGS_FILE
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @staticmethod
    def update_json(output_dir, changes: dict) -> None:
        """Change some keys of OUTPUT_DIR's settings file in place, atomically, keeping the others as `init`
        wrote them (paths as init's host saw them). Missing file: nothing to update."""
        path = Path(output_dir) / SETTINGS_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        data.update(changes)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def read_json(cls, output_dir) -> "Settings":
        path = Path(output_dir) / SETTINGS_FILE
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise BadInput(f"no {SETTINGS_FILE} in {output_dir}. Is this the OUTPUT_DIR given to `ledgerbc init`?") from None
        except (ValueError, TypeError) as exc:
            raise BadInput(f"{path} is not valid settings JSON ({exc}).") from None
