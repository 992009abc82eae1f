"""A stand-in `dorado` for tests and demos: reads pod5 files with `pod5`, writes unaligned BAM to stdout.

It follows the dorado facts of DESIGN §5 and docs/dorado-facts.md (dorado 1.1.1 unless said otherwise):
- `dorado basecaller MODEL DIR [options] > out.bam`; every record tagged `fn:Z:<file name as found in DIR>`,
  long reads split into new read ids carrying `pi:Z:<parent>`; a corrupt pod5 is skipped with `[error]`
  lines and exit status 0; no SIGTERM handler.
- Model resolution from each input's real run info (ledgerbc.chemistry): a variant (`hac`, `sup@v5.0.0`)
  fails the call at start, writing nothing to stdout, exit 1, when the inputs resolve to more than one
  chemistry, to an unknown one, or to one dorado >= 1.0 dropped (R9.4.1, 4 kHz R10.4.1, RNA002). An explicit
  model (`dna_r10.4.1_e8.2_400bps_hac@v5.0.0`, or a model folder) is checked against the sample rate of the
  first file only (files in sorted name order here; real dorado takes directory order), then basecalls
  everything. The resolved model name is in `@RG` and `RG:Z`, like dorado's.
- `--version`: `<X.Y.Z>+<hash>` on stderr (dorado < 1.3) or stdout (>= 1.3); `@PG ... VN:` is the same.
- `--kit-name KIT [--sample-sheet CSV]`: each record gets a deterministic barcode from its read id
  (`barcode_for`): `BC:Z:<KIT>_barcodeNN` (the sheet's alias when a row matches the read's run), and
  about 10% unclassified with no `BC` tag; barcodes the sheet does not list are unclassified. An invalid
  sample sheet aborts dorado (uncaught exception, SIGABRT), as dorado 1.x does.
- `--min-qscore Q` drops records under Q and records shorter than 5 bases are dropped (dorado's read filter).
Sequences and qualities are made up, but deterministic in the read id and signal length.

Environment knobs: LEDGERBC_SIM_DELAY (seconds of startup), LEDGERBC_SIM_SECONDS_PER_MB (time per MB
of pod5), LEDGERBC_SIM_CRASH=1 (exit 1 after part of the output), LEDGERBC_SIM_HANG=1 (never finish),
LEDGERBC_SIM_FAIL_MATCH=<substring> (files whose name contains it are corrupt),
LEDGERBC_SIM_SPLIT_SAMPLES (reads above this many samples are split; default 300000),
LEDGERBC_SIM_VERSION (the version to claim, e.g. `1.3.0+0123abcd`: also picks the `--version` stream and,
from 1.2, dorado's "Failed to resolve basecaller models: " error prefix).
"""
from __future__ import annotations

import datetime
import hashlib
import os
import random
import resource
import signal
import sys
import time
import traceback
import uuid

import pod5
import pysam

from ledgerbc import chemistry, samplesheet

VERSION = "1.1.1+simulated"
MAX_READ_LENGTH = 50_000
MIN_SEQUENCE_LENGTH = 5    # utils/parameters.h: default_parameters.min_sequence_length
UNCLASSIFIED_PERCENT = 10  # share of reads barcode_for leaves unclassified
STANDIN_BARCODES = 6       # barcode_for spreads classified reads over the kit's first N barcodes
# dorado's options that take a value; every other option is taken as a flag.
_VALUE_OPTIONS = {
    "-x", "--device", "--models-directory", "-b", "--batchsize", "-c", "--chunksize", "-o", "--overlap",
    "--min-qscore", "--kit-name", "--reference", "--modified-bases", "--modified-bases-models",
    "--modified-bases-threshold", "-l", "--read-ids", "-n", "--max-reads", "--resume-from",
    "--output-dir", "--sample-sheet", "--barcode-arrangement", "--barcode-sequences", "--mm2-opts",
    "--poly-a-config", "--trim", "--bed-file", "--primer-sequences", "--models-directory",
}
_SPLIT_NAMESPACE = uuid.UUID("6ba7b812-9dad-11d1-80b4-00c04fd430c8")


def version() -> str:
    """The version this stand-in claims: LEDGERBC_SIM_VERSION, else VERSION."""
    return os.environ.get("LEDGERBC_SIM_VERSION") or VERSION


def _version_at_least(major: int, minor: int) -> bool:
    head = version().split("+", 1)[0].split(".")
    try:
        return (int(head[0]), int(head[1])) >= (major, minor)
    except (ValueError, IndexError):
        return True


def _safe_to_log() -> bool:
    """dorado's is_safe_to_log: no logging when stdout and stderr are the same file, unless it is a tty."""
    try:
        same = os.readlink("/proc/self/fd/1") == os.readlink("/proc/self/fd/2")
    except OSError:
        return True
    return not same or os.isatty(2)


_LOG_TO = None  # basecall_in_process: the batch log its lines go to instead of stderr


def log(level: str, message: str) -> None:
    """One dorado-style (spdlog) line on stderr: `[<time>] [<level>] <message>`."""
    stream = _LOG_TO or sys.stderr
    if stream is sys.stderr and not _safe_to_log():
        return
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    stream.write(f"[{now}] [{level}] {message}\n")
    stream.flush()


def _env_float(name: str, default: float = 0.0) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def _parse_basecaller(args: list[str]) -> tuple[list[str], dict[str, str], set[str]]:
    """Positional arguments (MODEL, DATA), options with a value, and flags."""
    positional, values, flags, i = [], {}, set(), 0
    while i < len(args):
        arg = args[i]
        if arg in _VALUE_OPTIONS:
            if i + 1 < len(args):
                values[arg] = args[i + 1]
            i += 1
        elif arg.startswith("-") and arg != "-":
            flags.add(arg)
        else:
            positional.append(arg)
        i += 1
    return positional, values, flags


def find_pod5(folder: str, recursive: bool) -> list[str]:
    """The `*.pod5` files in `folder` (following symlinks to files), sorted, as paths under `folder`."""
    found = []
    if recursive:
        for top, _dirs, names in os.walk(folder):
            found += [os.path.join(top, n) for n in names if n.endswith(".pod5")]
    else:
        with os.scandir(folder) as entries:
            found = [e.path for e in entries if e.name.endswith(".pod5") and not e.is_dir()]
    return sorted(found)


def _open(path: str) -> tuple[chemistry.FileRunInfo | None, str | None]:
    """The file's run info, or why it cannot be opened (the reason dorado would print)."""
    fail_match = os.environ.get("LEDGERBC_SIM_FAIL_MATCH")
    if fail_match and fail_match in os.path.basename(path):
        return None, "IOError: Invalid signature in file"
    try:
        return chemistry.read_run_info(path), None
    except Exception as exc:  # pod5 raises RuntimeError, OSError, pyarrow errors...
        return None, (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def barcode_for(read_id: str, kit_name: str, allowed: set[str] | None = None) -> str | None:
    """The stand-in's classification of one record: a barcode name (`barcode03`), or None (unclassified).

    Deterministic in the record's read id (a split read's pieces are classified on their own, as dorado
    classifies each subread): about 10% unclassified, the rest spread over the kit's first
    STANDIN_BARCODES barcodes. `allowed` (a sample sheet's barcodes): any other barcode is unclassified.
    """
    digest = hashlib.sha256(f"barcode:{read_id}".encode()).digest()
    if digest[0] % 100 < UNCLASSIFIED_PERCENT:
        return None
    names = samplesheet.BARCODE_KITS[kit_name][:STANDIN_BARCODES]
    name = names[int.from_bytes(digest[1:5], "big") % len(names)]
    if allowed is not None and name not in allowed:
        return None
    return name


class _Barcoding:
    """`--kit-name` and `--sample-sheet`: the BC value of a record, as dorado's basecaller writes it."""

    def __init__(self, kit_name: str, sheet: samplesheet.SampleSheet | None):
        self.kit = kit_name
        self.sheet = sheet
        self.allowed = sheet.allowed_barcodes() if sheet is not None else None

    def tag(self, read_id: str, run: dict) -> str | None:
        name = barcode_for(read_id, self.kit, self.allowed)
        if name is None:
            return None
        return self.alias(name, run) or f"{self.kit}_{name}"

    def alias(self, name: str, run: dict) -> str | None:
        if self.sheet is None:
            return None
        return self.sheet.alias_for(name, run["flow_cell_id"], run["sequencer_position"], run["experiment_name"])


def _read_groups(paths: list[str], model: str, barcoding: _Barcoding | None) -> list[tuple[str, dict]]:
    """dorado's @RG lines (before any record): one per protocol run, then one per run and kit barcode."""
    runs: dict[str, dict] = {}
    for path in paths:
        with pod5.Reader(path) as reader:
            for run in reader.run_info_table.read_all().to_pylist():
                runs.setdefault(f"{run['protocol_run_id']}_{model}", run)

    def fields(run):
        return {
            "PU": run["flow_cell_id"] or "unknown",
            "PM": run["system_name"] or "unknown",
            "DT": run["acquisition_start_time"].isoformat(timespec="milliseconds"),
            "PL": "ONT",
            "DS": f"basecall_model={model} runid={run['protocol_run_id'] or 'unknown'}",
            "LB": run["sample_id"] or "unknown",
        }

    groups = [("RG", {"ID": rg_id, **fields(run)}) for rg_id, run in runs.items()]
    if barcoding is not None:  # add_barcode_kit_rg_hdrs (the barcode sequence, BC:, is left out here)
        for name in samplesheet.BARCODE_KITS[barcoding.kit]:
            if barcoding.allowed is not None and name not in barcoding.allowed:
                continue
            for rg_id, run in runs.items():
                alias = barcoding.alias(name, run)
                groups.append(("RG", {"ID": f"{rg_id}_{alias or f'{barcoding.kit}_{name}'}", **fields(run),
                                      "SM": name, "al": alias or name}))
    return groups


def _header_line(kind: str, fields: dict) -> str:
    clean = {key: " ".join(str(value).split()) for key, value in fields.items()}  # no tab, no newline
    return "\t".join([f"@{kind}"] + [f"{key}:{value}" for key, value in clean.items()]) + "\n"


def _cpp_quoted(arg: str) -> str:
    """C++ std::quoted, as dorado writes each argument into @PG CL."""
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _make_record(header, read_id: str, n_samples: int, tags: list) -> pysam.AlignedSegment:
    rng = random.Random(hashlib.sha256(f"{read_id}:{n_samples}".encode()).digest())
    length = min(MAX_READ_LENGTH, max(1, n_samples // 10))
    qscore = round(4.0 + rng.random() * 16.0, 4)
    base_quality = int(qscore)
    record = pysam.AlignedSegment(header)
    record.query_name = read_id
    record.flag = 4
    record.reference_id = record.next_reference_id = -1
    record.reference_start = record.next_reference_start = -1
    record.query_sequence = "".join(rng.choices("ACGT", k=length))
    record.query_qualities = pysam.qualitystring_to_array(
        "".join(chr(33 + max(1, base_quality + rng.randint(-3, 3))) for _ in range(length)))
    bc = [t for t in tags if t[0] == "BC"]
    record.set_tags(bc + [("qs", qscore, "f")] + [t for t in tags if t[0] != "BC"])  # dorado puts BC first
    return record


def _records(header, path: str, model: str, split_samples: int, barcoding: _Barcoding | None):
    """The BAM records for every read of one pod5 file."""
    fn = os.path.basename(path)
    with pod5.Reader(path) as reader:
        for read in reader.reads():
            read_id, n_samples = str(read.read_id), read.num_samples
            info = read.run_info
            rate = info.sample_rate or 4000
            start = info.acquisition_start_time
            run = {"flow_cell_id": info.flow_cell_id, "sequencer_position": info.sequencer_position,
                   "experiment_name": info.experiment_name}
            common = [("mx", read.pore.well, "i"), ("ch", read.pore.channel, "i")]
            if n_samples <= split_samples:
                pieces = [(read_id, 0, n_samples, read.read_number, [])]
            else:
                half = n_samples // 2
                pieces = [(str(uuid.uuid5(_SPLIT_NAMESPACE, f"{read_id}:{i}")), offset, size, -1,
                           [("pi", read_id, "Z"), ("sp", offset, "i")])
                          for i, (offset, size) in enumerate([(0, half), (half, n_samples - half)])]
            for new_id, offset, size, read_number, split_tags in pieces:
                bc = barcoding.tag(new_id, run) if barcoding is not None else None
                rg = f"{info.protocol_run_id}_{model}" + (f"_{bc}" if bc else "")
                at = start + datetime.timedelta(seconds=(read.start_sample + offset) / rate)
                tags = ([("BC", bc, "Z")] if bc else []) + [
                    ("du", round(size / rate, 4), "f"), ("ns", size, "i"), ("ts", 0, "i")] + common + [
                    ("st", at.isoformat(timespec="microseconds"), "Z"), ("rn", read_number, "i"),
                    ("fn", fn, "Z"), ("dx", 0, "i"), ("RG", rg, "Z")] + split_tags + [
                    ("er", read.end_reason.name, "Z")]
                yield _make_record(header, new_id, size, tags)


def _crash(out: pysam.AlignmentFile) -> None:
    out.flush()  # what was written reaches stdout, without the BAM's EOF block
    log("error", "simulated crash (LEDGERBC_SIM_CRASH=1)")
    os._exit(1)


def _abort(exception: str) -> None:
    """An uncaught std::runtime_error in dorado 1.x: std::terminate's message, then SIGABRT (no core file)."""
    sys.stderr.write(f"terminate called after throwing an instance of 'std::runtime_error'\n  what():  {exception}\n")
    sys.stderr.flush()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGABRT, signal.SIG_DFL)
    os.abort()


def _fail_start(message: str) -> int:
    """A model-resolution error: logged as dorado logs it, nothing on stdout, exit 1."""
    prefix = "Failed to resolve basecaller models: " if _version_at_least(1, 2) else ""
    log("error", prefix + message)
    return 1


def _model_folder_rate(path: str) -> int | None:
    """The sample rate in a model folder's config.toml ([run_info] sample_rate), as dorado reads it."""
    import tomllib

    try:
        with open(os.path.join(path, "config.toml"), "rb") as fh:
            rate = tomllib.load(fh).get("run_info", {}).get("sample_rate")
    except (OSError, ValueError):
        return None
    return int(rate) if isinstance(rate, int) and rate > 0 else None


def basecaller(argv: list[str], output: str = "-") -> int:
    """`dorado basecaller MODEL DIR [options]`: unaligned BAM of every pod5 in DIR on stdout (`output`: a
    file instead, for basecall_in_process)."""
    started = time.monotonic()
    positional, values, flags = _parse_basecaller(argv[1:])
    if len(positional) < 2:
        log("error", "basecaller: MODEL and DATA are required")
        return 1
    model_arg, folder = positional[0], positional[1]
    time.sleep(_env_float("LEDGERBC_SIM_DELAY"))
    if os.environ.get("LEDGERBC_SIM_HANG") == "1":
        while True:
            time.sleep(3600)
    spec = chemistry.parse_model(model_arg)
    if spec.errors:
        log("error", spec.errors[0])
        return 1

    barcoding = None
    kit_name = values.get("--kit-name")
    if kit_name is not None:
        sheet = None
        if values.get("--sample-sheet"):
            sheet = samplesheet.parse(values["--sample-sheet"])
            if sheet.problems:
                _abort(sheet.problems[0])
        problem = samplesheet.kit_error(kit_name)
        if problem:
            log("error", problem)
            return 1
        barcoding = _Barcoding(kit_name, sheet)

    if not os.path.isdir(folder):
        log("error", f"Input data path does not exist or is not a directory: {folder}")
        return 1
    good, runs = [], []
    for path in find_pod5(folder, "-r" in flags or "--recursive" in flags):
        info, reason = _open(path)
        if info is None:
            log("error", f"Failed to open file {path}: {reason}")
        else:
            good.append(path)
            runs.append(info)

    model_rate = None
    if spec.kind == "path":
        where = os.path.abspath(model_arg)
        if not os.path.isdir(where):
            log("error", f"Model does not exist at: '{where}' - Please download the model or use a model complex "
                         "to automatically download a model")
            return 1
        model_rate = _model_folder_rate(where)
    model = spec.name or os.path.basename(model_arg.rstrip("/"))
    # Like dorado, nothing is checked when no input could be opened; unlike dorado (which then exits 1:
    # "Failed to determine sequencing chemistry from data" / "No reads found"), the stand-in goes on and
    # exits 0 with no record, so a lone corrupt file looks like a file with no reads out (DESIGN §9).
    if good and not (spec.kind != "variant" and "--skip-model-compatibility-check" in flags):
        check = chemistry.check_call(spec, runs, version(), model_rate)
        for level, message in check.log:
            log(level, message)
        if not check.ok:
            return _fail_start(check.error)
        model = check.model
    log("info", f"> Creating basecall pipeline for {len(good)} files with model {model}")

    pg = {"ID": "basecaller", "PN": "dorado", "VN": version(),
          "CL": "dorado " + " ".join(_cpp_quoted(a) for a in argv)}
    # from_text keeps dorado's line order (@HD, @PG, @RG); from_dict would not.
    header = pysam.AlignmentHeader.from_text(
        "".join(_header_line(kind, fields) for kind, fields in
                [("HD", {"VN": "1.6", "SO": "unknown"}), ("PG", pg)] + _read_groups(good, model, barcoding)))
    split_samples = int(_env_float("LEDGERBC_SIM_SPLIT_SAMPLES", 300_000))
    seconds_per_mb = _env_float("LEDGERBC_SIM_SECONDS_PER_MB")
    try:
        min_qscore = float(values.get("--min-qscore", 0))
    except ValueError:
        log("error", f"Failed to parse --min-qscore: {values['--min-qscore']}")
        return 1
    # With LEDGERBC_SIM_CRASH=1, die once about half the reads are out.
    n_reads = sum(info.read_count for info in runs)
    crash_after = n_reads // 2 if os.environ.get("LEDGERBC_SIM_CRASH") == "1" else None
    sys.stdout.flush()
    out = pysam.AlignmentFile(output, "wb", header=header)
    written = filtered = 0
    for path in good:
        time.sleep(seconds_per_mb * os.path.getsize(path) / 1e6)
        try:
            for record in _records(out.header, path, model, split_samples, barcoding):
                if written == crash_after:
                    _crash(out)
                if record.query_length < MIN_SEQUENCE_LENGTH or (min_qscore and record.get_tag("qs") < min_qscore):
                    filtered += 1  # ReadFilterNode: dropped, not marked
                    continue
                out.write(record)
                written += 1
        except Exception as exc:  # a file that opened but fails part-way: its later reads are lost
            log("error", f"POD5 Failed to read reads - '{exc}' @ '{path}'.")
    if crash_after is not None:
        _crash(out)
    out.close()
    elapsed_ms = int((time.monotonic() - started) * 1000)
    log("info", f"> Finished in (ms): {elapsed_ms}; reads basecalled: {written}; reads filtered: {filtered}")
    return 0


def basecall_in_process(argv: list[str], bam_path, log_path) -> int:
    """`dorado basecaller MODEL DIR [options]` (`argv`, without the executable) run in this process: the BAM
    written to `bam_path`, the log lines appended to `log_path`; returns dorado's exit status.

    For test harnesses that basecall thousands of tiny batches (tests/history.py): the same records, log lines
    and exit status as the executable, without a Python start-up per call. Not for the knobs that end the
    process (LEDGERBC_SIM_CRASH, LEDGERBC_SIM_HANG, an invalid sample sheet): use the executable for those.
    Not thread-safe (the log goes through a module global). An error the executable would die of (a full disk
    under its BAM: `OSError` from htslib) ends the call as it ends the process: the traceback in the log (the
    executable's stderr) and exit status 1, not an exception in the caller.
    """
    global _LOG_TO
    with open(log_path, "a", encoding="utf-8") as stream:
        _LOG_TO = stream
        try:
            log("info", "Running: " + " ".join(f'"{a}"' for a in argv))
            return basecaller(argv, output=str(bam_path))
        except Exception:
            stream.write(traceback.format_exc())
            return 1  # Python's exit status for an uncaught exception
        finally:
            _LOG_TO = None


def _usage() -> None:
    stream = sys.stdout if _version_at_least(1, 3) else sys.stderr
    stream.write("Usage: dorado [options] subcommand\n\nPositional arguments:\nbasecaller\n\nOptional arguments:\n"
                 "-h --help               shows help message and exits\n"
                 "-v --version            prints version information and exits\n"
                 "-vv                     prints verbose version information and exits\n")
    stream.flush()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ledgerbc-simulated-dorado` (installed for tests as `dorado`)."""
    # Real dorado has no SIGTERM handler and keeps going; Slurm has to follow up with SIGKILL.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        _usage()
        return 0
    log("info", "Running: " + " ".join(f'"{a}"' for a in argv))
    stream = sys.stdout if _version_at_least(1, 3) else sys.stderr  # dorado 1.3 moved these to stdout
    if argv[0] in ("-v", "--version"):
        stream.write(version() + "\n")
        stream.flush()
        return 0
    if argv[0] == "-vv":
        stream.write(f"dorado:   {version()}\nlibtorch: simulated\nminimap2: simulated\n")
        stream.flush()
        return 0
    if argv[0] in ("-h", "--help"):
        _usage()
        return 0
    if argv[0] != "basecaller":
        _usage()
        return 1
    return basecaller(argv)


if __name__ == "__main__":
    sys.exit(main())
