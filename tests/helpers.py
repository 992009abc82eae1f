"""What the tests share: a `Study` (INPUT_DIR, OUTPUT_DIR, the stand-in dorado on PATH and real `ledgerbc`
subprocesses), a `FakeClock`, and checks that compare the read ids in the pod5 inputs with the read ids
in the published outputs. Fixtures built on them live in conftest.py."""
from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pod5
import pysam
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from ledgerbc import models, samplesheet
from ledgerbc.cli import cli
from ledgerbc.db import Ledger
from ledgerbc.layout import SUMMARY_COLUMNS, UNCLASSIFIED
from ledgerbc.settings import SETTINGS_FILE, Settings
from ledgerbc.split import barcode_folder
from ledgerbc.testkit import install_fake_dorado
from ledgerbc.testkit.dorado import barcode_for
from ledgerbc.testkit.synth import make_dataset

REAL_POD5 = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "real-pod5"
KIT = "SQK-NBD114-24"  # studies run with and without barcodes: `make_study(..., kit_name=KIT)`
SMALL_LEASE = ["--lease", "20s", "--heartbeat", "1s", "--clock-skew", "2s"]
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def ledgerbc_argv() -> list[str]:
    """The installed `ledgerbc` console script of this interpreter's environment (else `python -m`)."""
    script = Path(sys.executable).with_name("ledgerbc")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ledgerbc.cli"]


# The clocked study (conftest.py `clocked_study`: in-process, six files, batches of 3): lease 60 s, heartbeat
# 10 s, clock skew 20 s, its FakeClock starting at T0.
LEASE, HEARTBEAT, SKEW = 60.0, 10.0, 20.0
T0 = 1_700_000_000.0


class FakeClock:
    """An injectable clock (`Ledger(path, clock=...)`): lease expiry is tested by moving it, not by sleeping."""

    def __init__(self, start: float = 1_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


# -- a study under tmp_path ------------------------------------------------------------------------------
class Study:
    """INPUT_DIR, OUTPUT_DIR, the stand-in dorado on PATH and the worker processes of one test.

    Every subprocess gets this test's environment (conftest.py has already removed the developer's
    LEDGERBC_* from it) plus the stand-in on PATH, LEDGERBC_LEDGER and the stand-in's knobs in `sim`.
    """

    def __init__(self, tmp_path: Path, **sim):
        self.root = tmp_path
        self.input = tmp_path / "input"
        self.output = tmp_path / "output"
        self.ledger_path = self.output / "ledgerbc.db"
        self.cwd = tmp_path / "cwd"  # where workers run: a `$(touch pwned)` that got executed lands here
        self.cwd.mkdir()
        self.input.mkdir()
        self.bin = tmp_path / "bin"
        install_fake_dorado(self.bin)
        self.sim = {f"LEDGERBC_SIM_{k.upper()}": str(v) for k, v in sim.items()}
        self.procs: list[subprocess.Popen] = []

    def env(self, **extra) -> dict:
        env = dict(os.environ, LEDGERBC_LEDGER=str(self.ledger_path), **self.sim)
        env["PATH"] = str(self.bin) + os.pathsep + env.get("PATH", "")
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def cli(self, *args, env=None, check=False, timeout=180) -> subprocess.CompletedProcess:
        """`ledgerbc ARGS` as a user runs it (the installed console script); `check`: insist on exit 0."""
        proc = subprocess.run(
            ledgerbc_argv() + [str(a) for a in args], cwd=self.cwd, env=env or self.env(),
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )
        if check:
            assert proc.returncode == 0, f"ledgerbc {args[0]} exited {proc.returncode}: {proc.stderr}"
        return proc

    def invoke(self, *args):
        """`ledgerbc ARGS` in this process (click's CliRunner), on this study's ledger."""
        return CliRunner().invoke(cli, [str(a) for a in args], env={"LEDGERBC_LEDGER": str(self.ledger_path)},
                                  prog_name="ledgerbc")

    def init(self, *options) -> subprocess.CompletedProcess:
        return self.cli("init", self.input, self.output, *SMALL_LEASE, *options, check=True)

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.ledger_path)

    def start_worker(self, worker_id: str, *options, **env) -> subprocess.Popen:
        """A worker in its own session (kill_group ends it with its dorado); its output in worker_log()."""
        with open(self.root / f"worker-{worker_id}.log", "wb") as log:
            # --ledger puts the test's folder on the command line: kill_leftovers(tmp_path) finds the worker too.
            proc = subprocess.Popen(
                ledgerbc_argv() + ["run", "--ledger", str(self.ledger_path), "--worker-id", worker_id, *options],
                cwd=self.cwd, env=self.env(**env), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc.worker_id = worker_id
        self.procs.append(proc)
        return proc

    def worker_log(self, worker_id: str) -> str:
        return (self.root / f"worker-{worker_id}.log").read_text(errors="replace")

    def files(self) -> dict[str, tuple[str, int | None]]:
        """{rel path: (state, batch id)} from the ledger."""
        rows = query(self.ledger, sa.select(models.Pod5File.rel_path, models.Pod5File.state, models.Pod5File.batch_id))
        return {r.rel_path: (r.state, r.batch_id) for r in rows}

    def outputs(self) -> dict[str, tuple[int, int]]:
        """Published pass/ files and summaries: {path: (inode, mtime_ns)}: a re-publication changes both."""
        paths = sorted((self.output / "pass").rglob("*.fastq")) + sorted((self.output / "summary").rglob("*.tsv"))
        return {str(p.relative_to(self.output)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}

    @property
    def barcoded(self) -> bool:
        return barcode_expected(self.output) is not None

    def published_inputs(self) -> set[str]:
        """Inputs whose done marker is on disk: pass/<rel> (flat), summary/<rel>.tsv (barcoded)."""
        top, ext = (self.output / "summary", ".tsv") if self.barcoded else (self.output / "pass", ".fastq")
        return {p.relative_to(top).as_posix()[: -len(ext)] + ".pod5" for p in top.rglob("*" + ext)}

    def wait_workers(self, procs=None, timeout: float = 120) -> dict[str, int]:
        """Wait for the workers to exit; {worker id: exit status}. Fails (with their logs) on timeout."""
        deadline = time.monotonic() + timeout
        codes = {}
        for proc in procs or self.procs:
            try:
                codes[proc.worker_id] = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"worker {proc.worker_id} still running after {timeout}s:\n"
                            + self.worker_log(proc.worker_id)[-3000:])
        return codes

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json", "--ledger", self.ledger_path, check=True).stdout)

    def dorado_while(self, flag: Path, once: bool = False, **knobs) -> None:
        """Make `dorado basecaller` on PATH apply the stand-in's `knobs` (LEDGERBC_SIM_*) only while `flag`
        exists (and remove the flag on first use with `once`): one slow, hanging... batch among normal ones.
        `dorado --version` (each worker's first call) is left alone."""
        stand_in = self.bin / "dorado-stand-in"
        (self.bin / "dorado").rename(stand_in)
        exports = "".join(f"{k}={shlex.quote(str(v))}; export {k}; " for k, v in knobs.items())
        remove = f"rm -f {shlex.quote(str(flag))}; " if once else ""
        script = self.bin / "dorado"
        script.write_text(
            "#!/bin/sh\n"
            f"if [ \"$1\" = basecaller ] && [ -e {shlex.quote(str(flag))} ]; then {remove}{exports}fi\n"
            f'exec {shlex.quote(str(stand_in))} "$@"\n'
        )
        script.chmod(0o755)

    def dorado_running(self, timeout: float = 30):
        """Wait for the one running batch and its stand-in dorado to start; (batch row, dorado pid)."""
        running = wait_for(lambda: running_batches(self.ledger), timeout, "a running batch")
        assert len(running) == 1
        log = self.output / "logs" / f"{running[0].id}.log"
        wait_for(lambda: log.exists() and "[info] Running:" in log.read_text(errors="replace"), timeout,
                 "the stand-in dorado to start")
        pids = wait_for(self.dorado_pids, timeout, "the stand-in's process")
        assert len(pids) == 1
        return running[0], pids[0]

    def published(self) -> list[Path]:
        return [p for kind in ("pass", "fail") for p in (self.output / kind).rglob("*") if p.is_file()]

    def dorado_pids(self) -> list[int]:
        """Stand-in dorado processes working in this study's folders."""
        return [pid for pid, cmd in _processes() if "ledgerbc.testkit.dorado" in cmd and str(self.root) + os.sep in cmd]

    def close(self) -> None:
        for proc in self.procs:  # only the processes this test started, by their pid
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        for pid in self.dorado_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def make_study(tmp_path: Path, n_files: int, batch_files: int, lease: str = "20s", prepare=None, init_args=(),
               output: Path | None = None, ledger: Path | None = None, kit_name: str | None = None, **sim) -> Study:
    """A Study with `n_files` small pod5 files (hostile names), `prepare(INPUT_DIR)` for more, and its ledger
    made (`init`, heartbeat 1 s, more `init_args`; `kit_name`: barcoded; OUTPUT_DIR `output` and the ledger at
    `ledger` when given); `sim` are the stand-in dorado's knobs (LEDGERBC_SIM_<KNOB>) for every process."""
    study = Study(tmp_path, **sim)
    if output is not None:
        study.output = output
        study.ledger_path = output / "ledgerbc.db"
    if ledger is not None:
        study.ledger_path = ledger
    make_dataset(study.input, n_files, seed=n_files, hostile_names=True, size_spread=False)
    if prepare is not None:  # more input files, written before init scans
        prepare(study.input)
    study.cli("init", study.input, study.output, "--batch-files", batch_files, "--lease", lease,
              "--heartbeat", "1s", "--clock-skew", "1s", *init_args, *(["--kit-name", kit_name] if kit_name else []),
              *(["--ledger", ledger] if ledger else []), check=True)
    return study


def _processes():
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            yield int(entry.name), cmd


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def copy_real_pod5(dest: Path) -> None:
    shutil.copytree(REAL_POD5, dest)
    for path in [dest, *dest.rglob("*")]:  # the shared copy is read-only
        path.chmod(0o755 if path.is_dir() else 0o644)


def children_of(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode("utf-8", "replace")
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses; split after the last ')'.
        rest = stat.rsplit(")", 1)[-1].split()
        if len(rest) > 1 and rest[1] == str(pid):
            found.append(int(entry))
    return found


def basecallers_of(pid: int) -> list[int]:
    """Children of a worker `pid` that run `dorado basecaller` (not its `dorado --version` at start)."""
    found = []
    for child in children_of(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"basecaller" in argv:
            found.append(child)
    return found


def pids_mentioning(text: str) -> list[int]:
    """Processes (other than this one) whose command line contains `text`: e.g. a test's tmp folder."""
    return [pid for pid, cmd in _processes() if text in cmd and pid != os.getpid()]


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by `pid` (workers and dorado run in their own sessions)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_leftovers(text: str) -> list[int]:
    """SIGKILL every process group whose leader's command line mentions `text`; returns their pids."""
    pids = pids_mentioning(text)
    for pid in pids:
        kill_group(pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return pids


# -- the ledger, as the test sees it ----------------------------------------------------------------------
def query(ledger: Ledger, statement):
    return ledger.transact(lambda conn: conn.execute(statement).all())


def files_by_rel(ledger: Ledger) -> dict:
    return {r.rel_path: r for r in query(ledger, sa.select(models.Pod5File))}


def batch(ledger: Ledger, batch_id: int):
    return query(ledger, sa.select(models.Batch).where(models.Batch.id == batch_id))[0]


def running_batches(ledger: Ledger) -> list:
    return query(ledger, sa.select(models.Batch).where(models.Batch.state == models.RUNNING))


def events(ledger: Ledger, kind: str | None = None, batch_id: int | None = None) -> list:
    stmt = sa.select(models.Event).order_by(models.Event.id)
    if kind is not None:
        stmt = stmt.where(models.Event.kind == kind)
    if batch_id is not None:
        stmt = stmt.where(models.Event.batch_id == batch_id)
    return query(ledger, stmt)


# -- pod5 in, reads out -----------------------------------------------------------------------------------
def pod5_read_ids(path) -> list[str]:
    with pod5.Reader(Path(path)) as reader:
        return [str(read_id) for read_id in reader.read_ids]


@dataclass
class Record:
    read_id: str
    tags: dict[str, str]  # tag -> "T:value", as samtools prints it
    sequence: str
    qualities: str

    @property
    def parent(self) -> str:
        return self.tags["pi"][2:] if "pi" in self.tags else self.read_id

    @property
    def qscore(self) -> float:
        return float(self.tags["qs"][2:])


def read_fastq(path: Path) -> list[Record]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        lines = fh.read().decode("utf-8", "surrogateescape").split("\n")
    assert lines[-1] == "" and (len(lines) - 1) % 4 == 0, f"{path} is not whole FASTQ"
    records = []
    for i in range(0, len(lines) - 1, 4):
        header, seq, plus, qual = lines[i : i + 4]
        assert header.startswith("@") and plus == "+" and len(seq) == len(qual), f"bad FASTQ record in {path}"
        read_id, *tags = header[1:].split("\t")
        records.append(Record(read_id, {t[:2]: t[3:] for t in tags}, seq, qual))
    return records


def read_bam(path: Path) -> list[Record]:
    with pysam.AlignmentFile(str(path), "rb", check_sq=False) as bam:
        records = []
        for r in bam:
            fields = r.to_string().split("\t")
            records.append(Record(fields[0], {t[:2]: t[3:] for t in fields[11:]}, fields[9], fields[10]))
        return records


def read_output(path: Path) -> list[Record]:
    return read_bam(path) if path.name.endswith(".bam") else read_fastq(path)


@dataclass
class Outputs:
    """Every published output under pass/ and fail/, by the input (rel path ending in .pod5) it belongs to;
    in a barcoded study also by `<barcode>` folder (`files`: (kind, barcode, rel) -> its records)."""

    passed: dict[str, list[Record]] = field(default_factory=dict)
    failed: dict[str, list[Record]] = field(default_factory=dict)
    files: dict[tuple[str, str | None, str], list[Record]] = field(default_factory=dict)

    def records(self, rel: str) -> list[Record]:
        return self.passed.get(rel, []) + self.failed.get(rel, [])

    @property
    def n_pass(self) -> int:
        return sum(map(len, self.passed.values()))

    @property
    def n_fail(self) -> int:
        return sum(map(len, self.failed.values()))


def collect_outputs(output_dir: Path, emit: str, barcoded: bool = False) -> Outputs:
    """Read every output; `barcoded`: outputs are pass|fail/<barcode>/<rel>.<emit>."""
    outputs = Outputs()
    for kind, into in (("pass", outputs.passed), ("fail", outputs.failed)):
        top = output_dir / kind
        for path in sorted(top.rglob("*")):
            if path.is_dir():
                continue
            rel = path.relative_to(top).as_posix()
            assert not path.name.startswith("."), f"temporary file left in {kind}/: {rel}"
            assert rel.endswith("." + emit), f"{kind}/{rel} is not a .{emit} output"
            barcode = None
            if barcoded:
                barcode, _, rel = rel.partition("/")
                assert rel, f"{kind}/{barcode} is an output outside a <barcode> folder"
            rel = rel[: -len(emit)] + "pod5"
            records = read_output(path)
            outputs.files[(kind, barcode, rel)] = records
            into.setdefault(rel, []).extend(records)
    return outputs


def study_settings(output_dir: Path) -> Settings | None:
    """The settings init wrote beside the outputs (None when there are none, e.g. a ledger made in a test)."""
    return Settings.read_json(output_dir) if (Path(output_dir) / SETTINGS_FILE).exists() else None


def barcode_expected(output_dir: Path):
    """For a barcoded study, `folder(read_id)`: the <barcode> folder the stand-in dorado's classification
    (`barcode_for`, the sample sheet's barcodes and aliases) sends a record to; None for an unbarcoded one."""
    settings = study_settings(output_dir)
    if settings is None or not settings.kit_name:
        return None
    allowed, aliases = None, {}
    if settings.sample_sheet:
        sheet = samplesheet.parse(Path(output_dir) / settings.sample_sheet)
        allowed, aliases = sheet.allowed_barcodes(), sheet.aliases()

    def folder(read_id: str) -> str:
        name = barcode_for(read_id, settings.kit_name, allowed)
        return (aliases.get(name) or name) if name else UNCLASSIFIED

    return folder


def read_summary(path: Path) -> list[dict]:
    """The rows of a summary/<rel>.tsv, checked to have exactly DESIGN §5's header."""
    lines = path.read_text(encoding="utf-8", errors="surrogateescape").split("\n")
    assert lines[-1] == "", f"{path}: no final newline"
    assert tuple(lines[0].split("\t")) == SUMMARY_COLUMNS, f"{path}: header {lines[0]!r}"
    rows = [dict(zip(SUMMARY_COLUMNS, line.split("\t"))) for line in lines[1:-1]]
    assert all(len(line.split("\t")) == len(SUMMARY_COLUMNS) for line in lines[1:-1]), f"{path}: a row is not 13 fields"
    return rows


def check_summary(output_dir: Path, rel: str, outputs: Outputs) -> list[dict]:
    """summary/<rel>.tsv lists every output record of input `rel` once (read id, pass/fail, barcode folder)."""
    rows = read_summary(Path(output_dir) / "summary" / (rel[: -len(".pod5")] + ".tsv"))
    listed = sorted((r["read_id"], r["passes_filtering"], r["barcode_arrangement"]) for r in rows)
    written = sorted((rec.read_id, "TRUE" if kind == "pass" else "FALSE", barcode or UNCLASSIFIED)
                     for (kind, barcode, r), records in outputs.files.items() if r == rel for rec in records)
    assert listed == written, f"{rel}: its summary lists other records than its outputs hold"
    for row in rows:
        assert row["filename"] == rel and row["parent_read_id"] and row["run_id"], row
        float(row["start_time"]), float(row["mean_qscore_template"]), int(row["sequence_length_template"])
    return rows


def link_basename(rel: str) -> str:
    """What the worker's link name ends with (the fn:Z value): the basename made tag-safe."""
    return _UNSAFE.sub("_", rel.rsplit("/", 1)[-1])


def check_outputs(study: Study, emit: str = "fastq", min_qscore: float = 0.0) -> Outputs:
    """The exactly-once property, from the files on disk and the ledger:

    - a done input has its pass/ file (and a fail/ file only if it has failing reads); nothing else has any;
      barcoded (`--kit-name`): a done input has its summary (the done marker), a pass/<barcode>/ file for each
      barcode with any of its records, a fail/<barcode>/ file where some failed;
    - each output holds only reads of its own pod5, all of them (by read id or pi:Z parent), each record
      once, split by qscore, counted in the ledger as on disk; barcoded: each record in the folder of its
      `BC` tag, the one the stand-in dorado's classification gives it;
    - an input's summary, where there is one, lists exactly its output records;
    - across all outputs every read id of every pod5 appears in exactly one output, a duplicate's via its twin;
    - `verify --deep` finds no violation.
    """
    rows = files_by_rel(study.ledger)
    done = {rel for rel, r in rows.items() if r.state == models.DONE}
    expected_folder = barcode_expected(study.output)
    barcoded = expected_folder is not None
    outputs = collect_outputs(study.output, emit, barcoded)
    if barcoded:
        summaries = {p.relative_to(study.output / "summary").as_posix()[: -len(".tsv")] + ".pod5"
                     for p in (study.output / "summary").rglob("*.tsv")}
        assert summaries == done, "summaries (the done markers) and done inputs differ"
        assert set(outputs.passed) <= done and set(outputs.failed) <= done
        kit = study_settings(study.output).kit_name
        for (kind, barcode, rel), records in outputs.files.items():
            assert ("pass", barcode, rel) in outputs.files, f"{rel}: fail/{barcode}/ output without its pass/ output"
            assert kind == "pass" or records, f"{rel}: empty fail/{barcode}/ file"
            for r in records:
                assert barcode == expected_folder(r.read_id), f"{rel}: read {r.read_id} in folder {barcode}"
                assert barcode_folder(r.tags.get("BC", "")[2:] or None, kit) == barcode, (rel, barcode, r.tags.get("BC"))
    else:
        assert set(outputs.passed) == done, "pass/ files and done inputs differ"
        assert set(outputs.failed) <= done
    owner: dict[str, str] = {}  # pod5 read id -> the input whose output holds it
    seen_records: set[str] = set()
    for rel in sorted(done):
        ids_in = set(pod5_read_ids(study.input / rel))
        records = outputs.records(rel)
        parents = {r.parent for r in records}
        assert parents <= ids_in, f"{rel}: output holds reads of another pod5: {sorted(parents - ids_in)[:3]}"
        assert parents == ids_in, f"{rel}: {len(ids_in - parents)} of its reads are missing"
        ids_out = [r.read_id for r in records]
        assert len(set(ids_out)) == len(ids_out), f"{rel}: a record is written twice"
        assert not seen_records & set(ids_out), f"{rel}: records also published for another input"
        seen_records |= set(ids_out)
        for read_id in parents:
            assert read_id not in owner, f"read {read_id} published for {owner[read_id]} and for {rel}"
            owner[read_id] = rel
        for r in records:
            assert r.tags["fn"][2:].endswith(link_basename(rel)), f"{rel}: a record of {r.tags['fn']}"
        assert all(r.qscore >= min_qscore for r in outputs.passed.get(rel, []))
        assert all(r.qscore < min_qscore for r in outputs.failed.get(rel, []))
        assert rel not in outputs.failed or outputs.failed[rel], f"{rel}: empty fail/ file"
        row = rows[rel]
        assert (row.reads_pass, row.reads_fail) == (len(outputs.passed.get(rel, [])), len(outputs.failed.get(rel, [])))
        if barcoded or (study.output / "summary" / (rel[: -len(".pod5")] + ".tsv")).exists():
            check_summary(study.output, rel, outputs)
    # Every read of every input that is done or a duplicate of a done one is in exactly one output.
    for rel, row in rows.items():
        if row.state == models.DUPLICATE:
            twin = next(r for r in rows.values() if r.id == row.duplicate_of)
            assert twin.file_identifier == row.file_identifier
            if twin.state != models.DONE:
                assert twin.state == models.FAILED  # e.g. a chemistry dorado refuses: neither path is published
                continue
            for read_id in pod5_read_ids(study.input / rel):
                assert owner.get(read_id) == twin.rel_path, f"{rel}: read {read_id} not published via its twin"
    assert_verified(study.ledger_path)
    return outputs


def assert_work_tree_clean(study: Study) -> None:
    work = study.output / "work"
    assert not [p.name for p in work.iterdir() if p.name.startswith("ASSIGNED_")], "ASSIGNED_ folders left"
    staging = work / "staging"
    assert not staging.exists() or not list(staging.iterdir()), f"staging not empty: {list(staging.iterdir())}"


# -- exactly once, from the files on disk (FASTQ outputs) ------------------------------------------------
def pod5_reads(input_dir) -> dict[str, list[str]]:
    """{rel path: read ids} of every pod5 file under `input_dir`, read with the pod5 library."""
    root = Path(input_dir)
    return {p.relative_to(root).as_posix(): pod5_read_ids(p) for p in sorted(root.rglob("*.pod5"))}


def fastq_records(path: Path, tag: str | None = None):
    """(read id, pi parent or None) for each record of a FASTQ written by ledgerbc; with `tag` (e.g. "BC"),
    (read id, parent, that tag's value or None)."""
    with open(path, "rb") as fh:
        for n, line in enumerate(fh):
            if n % 4:
                continue
            assert line.startswith(b"@"), f"{path}: line {n + 1} is not a FASTQ header: {line[:80]!r}"
            fields = line.decode("utf-8").rstrip("\n").split("\t")
            parent = next((f[5:] for f in fields[1:] if f.startswith("pi:Z:")), None)
            if tag is None:
                yield fields[0][1:], parent
            else:
                yield fields[0][1:], parent, next((f[5:] for f in fields[1:] if f.startswith(f"{tag}:Z:")), None)


def published_reads(output_dir) -> dict[str, list[tuple[str, str | None]]]:
    """{rel path of the input: [(read id, parent)]} over pass/ and fail/ (FASTQ outputs). In a barcoded study
    (pass|fail/<barcode>/<rel>), each record's folder is checked against its BC tag and the folder the
    stand-in dorado's classification gives it."""
    expected_folder = barcode_expected(Path(output_dir))
    kit = study_settings(Path(output_dir)).kit_name if expected_folder else None
    out = {}
    for kind in ("pass", "fail"):
        root = Path(output_dir) / kind
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.fastq")):
            rel = path.relative_to(root).as_posix()[: -len(".fastq")] + ".pod5"
            if expected_folder is None:
                out.setdefault(rel, []).extend(fastq_records(path))
                continue
            folder, _, rel = rel.partition("/")
            for read_id, parent, bc in fastq_records(path, "BC"):
                assert folder == barcode_folder(bc, kit) == expected_folder(read_id), (
                    f"{kind}/{folder}/{rel}: read {read_id} (BC {bc}) belongs to {expected_folder(read_id)}")
                out.setdefault(rel, []).append((read_id, parent))
    return out


def assert_verified(ledger_path, deep: bool = True):
    """`ledgerbc verify --deep` (its library call) finds no violation: the ledger and the outputs on disk
    keep every invariant, whatever the test did to get there. Returns the report."""
    from ledgerbc.verify import verify

    report = verify(Ledger(ledger_path), deep=deep)
    assert report.ok, f"verify{' --deep' if deep else ''} found violations:\n" + "\n".join(report.lines()[:30])
    return report


def check_exactly_once(expected: dict[str, list[str]], output_dir) -> dict:
    """Assert every read of every input appears exactly once in the outputs, in its own file's output,
    and that `verify --deep` holds on the study's ledger (OUTPUT_DIR/ledgerbc.db, when there is one).

    A read the stand-in dorado split shows up as two records with new ids and `pi:Z:<read id>`; the
    read counts as present once when each child id is unique and the parent is covered by no other
    record. Returns a few numbers for the test's printout.
    """
    published = published_reads(output_dir)
    assert set(published) == set(expected), (
        f"outputs for inputs not expected: {sorted(set(published) - set(expected))[:5]}; "
        f"inputs without output: {sorted(set(expected) - set(published))[:5]}"
    )
    ids = Counter(rid for recs in published.values() for rid, _ in recs)
    dup = [rid for rid, n in ids.items() if n > 1]
    assert not dup, f"{len(dup)} read ids published more than once, e.g. {dup[:3]}"
    split = 0
    for rel, want in expected.items():
        recs = published[rel]
        plain = Counter(rid for rid, parent in recs if parent is None)
        children = Counter(parent for _rid, parent in recs if parent is not None)
        covered = set(plain) | set(children)
        assert covered == set(want), (
            f"{rel}: {len(set(want) - covered)} reads missing, {len(covered - set(want))} foreign reads"
        )
        both = set(plain) & set(children)
        assert not both, f"{rel}: reads published both whole and split: {sorted(both)[:3]}"
        assert all(n == 2 for n in children.values()), f"{rel}: a split read has other than 2 pieces: {children}"
        split += len(children)
    if (Path(output_dir) / "ledgerbc.db").exists():
        assert_verified(Path(output_dir) / "ledgerbc.db")
    return {"files": len(expected), "reads": sum(len(v) for v in expected.values()), "split_reads": split}
