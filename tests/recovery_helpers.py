"""Helpers shared by the recovery tests (test_chaos, test_recover, test_janitor): what is on disk.

Reads are counted from the published FASTQ files themselves, never from the ledger, so a test that
uses them checks the outcome a user would see.
"""
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import sqlalchemy as sa
from click.testing import CliRunner

from ledgerbc import pod5check
from ledgerbc.cli import cli
from ledgerbc.db import Ledger
from ledgerbc.models import Pod5File
from ledgerbc.testkit.synth import make_dataset
from ledgerbc.testkit import install_fake_dorado

LEDGERBC = [sys.executable, "-m", "ledgerbc.cli"]


def pod5_reads(input_dir) -> dict[str, list[str]]:
    """{rel path: read ids} of every pod5 file under `input_dir`, read with the pod5 library."""
    root = Path(input_dir)
    return {p.relative_to(root).as_posix(): pod5check.read_ids(p) for p in sorted(root.rglob("*.pod5"))}


def fastq_records(path: Path):
    """(read id, pi parent or None) for each record of a FASTQ written by ledgerbc."""
    with open(path, "rb") as fh:
        for n, line in enumerate(fh):
            if n % 4:
                continue
            assert line.startswith(b"@"), f"{path}: line {n + 1} is not a FASTQ header: {line[:80]!r}"
            fields = line.decode("utf-8").rstrip("\n").split("\t")
            parent = next((f[5:] for f in fields[1:] if f.startswith("pi:Z:")), None)
            yield fields[0][1:], parent


def published_reads(output_dir) -> dict[str, list[tuple[str, str | None]]]:
    """{rel path of the input: [(read id, parent)]} over pass/ and fail/ (FASTQ outputs)."""
    out = {}
    for kind in ("pass", "fail"):
        root = Path(output_dir) / kind
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.fastq")):
            rel = path.relative_to(root).as_posix()[: -len(".fastq")] + ".pod5"
            out.setdefault(rel, []).extend(fastq_records(path))
    return out


def check_exactly_once(expected: dict[str, list[str]], output_dir) -> dict:
    """Assert every read of every input appears exactly once in the outputs, in its own file's output.

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
    return {"files": len(expected), "reads": sum(len(v) for v in expected.values()), "split_reads": split}


# -- a study on disk ---------------------------------------------------------------------------------
class Study:
    """INPUT_DIR with `n` small pod5 files, OUTPUT_DIR, the stand-in dorado and a clean environment."""

    def __init__(self, tmp_path: Path, n_files: int, batch_files: int, lease: str = "20s", prepare=None, **sim):
        self.tmp = tmp_path
        self.input, self.output = tmp_path / "in", tmp_path / "out"
        self.ledger = self.output / "ledgerbc.db"
        make_dataset(self.input, n_files, seed=n_files, hostile_names=True, size_spread=False)
        if prepare is not None:  # more input files, written before init scans
            prepare(self.input)
        bin_dir = tmp_path / "bin"
        install_fake_dorado(bin_dir)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGERBC_")}
        env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
                   PYTHONPATH=str(Path(__file__).resolve().parents[1]), LEDGERBC_LEDGER=str(self.ledger))
        env.update({f"LEDGERBC_SIM_{k.upper()}": str(v) for k, v in sim.items()})
        self.env = env
        done = self.cli("init", self.input, self.output, "--batch-files", batch_files, "--lease", lease,
                        "--heartbeat", "1s", "--clock-skew", "1s")
        assert done.returncode == 0, done.stderr

    def cli(self, *args, timeout=180, env=None):
        return subprocess.run(LEDGERBC + [str(a) for a in args], env=env or self.env, capture_output=True, text=True,
                              timeout=timeout)

    def invoke(self, *args):
        return CliRunner().invoke(cli, [str(a) for a in args], env={"LEDGERBC_LEDGER": str(self.ledger)})

    def start_worker(self, worker_id: str):
        log = open(self.tmp / f"{worker_id}.log", "wb")
        # --ledger puts the test's folder on the command line: kill_leftovers(tmp_path) finds the worker too.
        proc = subprocess.Popen(LEDGERBC + ["run", "--ledger", str(self.ledger), "--worker-id", worker_id],
                                env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        return proc

    def log_of(self, worker_id: str) -> str:
        return (self.tmp / f"{worker_id}.log").read_text(errors="replace")

    def outputs(self) -> dict[str, tuple[int, int]]:
        """Published pass/ files: {path: (inode, mtime_ns)}: a re-publication changes both."""
        return {str(p.relative_to(self.output)): (p.stat().st_ino, p.stat().st_mtime_ns)
                for p in sorted((self.output / "pass").rglob("*.fastq"))}

    def files(self) -> dict[str, tuple[str, int | None]]:
        rows = Ledger(self.ledger).transact(
            lambda c: c.execute(sa.select(Pod5File.rel_path, Pod5File.state, Pod5File.batch_id)).all())
        return {r.rel_path: (r.state, r.batch_id) for r in rows}

    def status(self) -> dict:
        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


# -- processes ---------------------------------------------------------------------------------------
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


def pids_mentioning(text: str) -> list[int]:
    """Processes (other than this one) whose command line contains `text`: e.g. a test's tmp folder."""
    needle = text.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                if needle in fh.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


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
