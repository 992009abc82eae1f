"""A stand-in `dorado` for tests and demos: reads pod5 files with `pod5`, writes unaligned BAM to stdout.

It follows the dorado facts of DESIGN §5: `dorado basecaller MODEL DIR [options] > out.bam`, every
record tagged `fn:Z:<file name as found in DIR>`, long reads split into new read ids carrying
`pi:Z:<parent>`, a corrupt pod5 skipped with an `[error]` line and exit status 0, no SIGTERM handler.
Sequences and qualities are made up, but deterministic in the read id and signal length.

Environment knobs: LEDGERBC_SIM_DELAY (seconds of startup), LEDGERBC_SIM_SECONDS_PER_MB (time per MB
of pod5), LEDGERBC_SIM_CRASH=1 (exit 1 after part of the output), LEDGERBC_SIM_HANG=1 (never finish),
LEDGERBC_SIM_FAIL_MATCH=<substring> (files whose name contains it are corrupt),
LEDGERBC_SIM_SPLIT_SAMPLES (reads above this many samples are split; default 300000).
"""
from __future__ import annotations

import datetime
import hashlib
import os
import random
import signal
import sys
import time
import uuid

import pod5
import pysam

VERSION = "1.1.1+simulated"
MAX_READ_LENGTH = 50_000
# dorado's options that take a value; every other option is taken as a flag and ignored.
_VALUE_OPTIONS = {
    "-x", "--device", "--models-directory", "-b", "--batchsize", "-c", "--chunksize", "-o", "--overlap",
    "--min-qscore", "--kit-name", "--reference", "--modified-bases", "--modified-bases-models",
    "--modified-bases-threshold", "-l", "--read-ids", "-n", "--max-reads", "--resume-from",
    "--output-dir", "--sample-sheet", "--barcode-arrangement", "--barcode-sequences", "--mm2-opts",
    "--poly-a-config", "--trim",
}
_SPLIT_NAMESPACE = uuid.UUID("6ba7b812-9dad-11d1-80b4-00c04fd430c8")


def log(level: str, message: str) -> None:
    """One dorado-style (spdlog) line on stderr: `[<time>] [<level>] <message>`."""
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    sys.stderr.write(f"[{now}] [{level}] {message}\n")
    sys.stderr.flush()


def _env_float(name: str, default: float = 0.0) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def _parse_basecaller(args: list[str]) -> tuple[list[str], bool]:
    """Positional arguments (MODEL, DIR) and whether --recursive was given."""
    positional, recursive, i = [], False, 0
    while i < len(args):
        arg = args[i]
        if arg in ("-r", "--recursive"):
            recursive = True
        elif arg in _VALUE_OPTIONS:
            i += 1
        elif not arg.startswith("-") or arg == "-":
            positional.append(arg)
        i += 1
    return positional, recursive


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


def _open_error(path: str) -> str | None:
    """Why `path` cannot be basecalled (the reason dorado would print), or None if it can."""
    fail_match = os.environ.get("LEDGERBC_SIM_FAIL_MATCH")
    if fail_match and fail_match in os.path.basename(path):
        return "IOError: Invalid signature in file"
    try:
        with pod5.Reader(path) as reader:
            reader.run_info_table.read_all()
    except Exception as exc:  # pod5 raises RuntimeError, OSError, pyarrow errors...
        return str(exc) or type(exc).__name__
    return None


def _read_groups(paths: list[str], model: str) -> tuple[list[dict], int]:
    """One @RG line per run id (dorado writes them before any record), and the number of reads."""
    groups: dict[str, dict] = {}
    n_reads = 0
    for path in paths:
        with pod5.Reader(path) as reader:
            n_reads += reader.num_reads
            for run in reader.run_info_table.read_all().to_pylist():
                run_id = run["acquisition_id"]
                groups.setdefault(run_id, {
                    "ID": f"{run_id}_{model}",
                    "PU": run["flow_cell_id"] or "unknown",
                    "PM": run["sequencer_position"] or "unknown",
                    "DT": run["acquisition_start_time"].isoformat(),
                    "PL": "ONT",
                    "DS": f"runid={run_id} basecall_model={model}",
                    "LB": run["sample_id"] or "unknown",
                })
    return list(groups.values()), n_reads


def _header_line(kind: str, fields: dict) -> str:
    clean = {key: " ".join(str(value).split()) for key, value in fields.items()}  # no tab, no newline
    return "\t".join([f"@{kind}"] + [f"{key}:{value}" for key, value in clean.items()]) + "\n"


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
    record.set_tags([("qs", qscore, "f")] + tags)
    return record


def _records(header, path: str, model: str, split_samples: int):
    """The BAM records for every read of one pod5 file."""
    fn = os.path.basename(path)
    with pod5.Reader(path) as reader:
        for read in reader.reads():
            read_id, n_samples = str(read.read_id), read.num_samples
            rate = read.run_info.sample_rate or 4000
            start = read.run_info.acquisition_start_time
            common = [("mx", read.pore.well, "i"), ("ch", read.pore.channel, "i")]
            group = [("fn", fn, "Z"), ("dx", 0, "i"),
                     ("RG", f"{read.run_info.acquisition_id}_{model}", "Z")]
            if n_samples <= split_samples:
                pieces = [(read_id, 0, n_samples, read.read_number, [])]
            else:
                half = n_samples // 2
                pieces = [(str(uuid.uuid5(_SPLIT_NAMESPACE, f"{read_id}:{i}")), offset, size, -1,
                           [("pi", read_id, "Z"), ("sp", offset, "i")])
                          for i, (offset, size) in enumerate([(0, half), (half, n_samples - half)])]
            for new_id, offset, size, read_number, split_tags in pieces:
                at = start + datetime.timedelta(seconds=(read.start_sample + offset) / rate)
                tags = ([("du", round(size / rate, 4), "f"), ("ns", size, "i"), ("ts", 0, "i")]
                        + common + [("st", at.isoformat(timespec="microseconds"), "Z"),
                                    ("rn", read_number, "i")] + group + split_tags
                        + [("er", read.end_reason.name, "Z")])
                yield _make_record(header, new_id, size, tags)


def _crash(out: pysam.AlignmentFile) -> None:
    out.flush()  # what was written reaches stdout, without the BAM's EOF block
    log("error", "simulated crash (LEDGERBC_SIM_CRASH=1)")
    os._exit(1)


def basecaller(argv: list[str]) -> int:
    """`dorado basecaller MODEL DIR [options]`: unaligned BAM of every pod5 in DIR on stdout."""
    started = time.monotonic()
    positional, recursive = _parse_basecaller(argv[1:])
    log("info", "Running: " + " ".join(f'"{a}"' for a in argv))
    if len(positional) < 2:
        log("error", "basecaller: MODEL and DATA are required")
        return 1
    model, folder = positional[0], positional[1]
    time.sleep(_env_float("LEDGERBC_SIM_DELAY"))
    if os.environ.get("LEDGERBC_SIM_HANG") == "1":
        while True:
            time.sleep(3600)
    if not os.path.isdir(folder):
        log("error", f"Input data path does not exist or is not a directory: {folder}")
        return 1

    good = []
    for path in find_pod5(folder, recursive):
        reason = _open_error(path)
        if reason is None:
            good.append(path)
        else:
            log("error", f"Failed to load pod5 file {path}: {reason}")
    log("info", f"> Creating basecall pipeline for {len(good)} files")

    read_groups, n_reads = _read_groups(good, model)
    command = " ".join(["dorado"] + [f'"{a}"' for a in argv])
    pg = {"ID": "basecaller", "PN": "dorado", "VN": VERSION, "CL": command}
    # from_text keeps dorado's line order (@HD, @PG, @RG); from_dict would not.
    header = pysam.AlignmentHeader.from_text(
        "".join(_header_line(kind, fields) for kind, fields in
                [("HD", {"VN": "1.6", "SO": "unknown"}), ("PG", pg)]
                + [("RG", group) for group in read_groups]))
    split_samples = int(_env_float("LEDGERBC_SIM_SPLIT_SAMPLES", 300_000))
    seconds_per_mb = _env_float("LEDGERBC_SIM_SECONDS_PER_MB")
    # With LEDGERBC_SIM_CRASH=1, die once about half the reads are out.
    crash_after = n_reads // 2 if os.environ.get("LEDGERBC_SIM_CRASH") == "1" else None
    sys.stdout.flush()
    out = pysam.AlignmentFile("-", "wb", header=header)
    written = 0
    for path in good:
        time.sleep(seconds_per_mb * os.path.getsize(path) / 1e6)
        try:
            for record in _records(out.header, path, model, split_samples):
                if written == crash_after:
                    _crash(out)
                out.write(record)
                written += 1
        except Exception as exc:  # a file that opened but fails part-way: its later reads are lost
            log("error", f"Failed to load pod5 file {path}: {exc}")
    if crash_after is not None:
        _crash(out)
    out.close()
    elapsed_ms = int((time.monotonic() - started) * 1000)
    log("info", f"> Finished in (ms): {elapsed_ms}; reads basecalled: {written}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ledgerbc-simulated-dorado` (installed for tests as `dorado`)."""
    # Real dorado has no SIGTERM handler and keeps going; Slurm has to follow up with SIGKILL.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        sys.stderr.write("Usage: dorado [options] subcommand\n\nPositional arguments:\n"
                         "basecaller\n\nOptional arguments:\n-h --help\n-v --version\n")
        return 0 if argv else 1
    if argv[0] in ("-v", "--version"):
        sys.stderr.write(VERSION + "\n")
        return 0
    if argv[0] != "basecaller":
        log("error", f"Unknown subcommand: {argv[0]}")
        return 1
    return basecaller(argv)


if __name__ == "__main__":
    sys.exit(main())
