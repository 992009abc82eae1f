"""Seeded random histories of a study, and the invariants every one of them must end with (issue 11).

A history is a list of `Step`s drawn from a seed (`generate`): pod5 files arriving in any order (two
chemistries, reads the stand-in splits, barcoded studies), copies and moves of them, scans, workers that
claim, basecall and publish one stage per step, SIGKILL at any stage (also between the renames of a
publication), SIGSTOP with or without dorado past the lease then SIGCONT, SIGTERM, janitor passes, the clock
moving, `recover`, `recover --force`, `retry --all-failed`, the ledger deleted or corrupted and rebuilt, a
full disk. The steps only name their targets ("worker w2", "the 3rd file placed"); a step whose target does
not exist (yet) does nothing, so any sub-list of a history is a history too (`minimise`).

Two ways to run one:
- `InProcess` (most histories, a few seconds each): the real library in this process, with an injected
  clock. A worker is the real `run.Worker` loop and `batch.BatchRun` in a thread that stops at every stage
  (`Gate`) until the history moves it on; dorado is the stand-in basecalling in-process
  (`testkit.dorado.basecall_in_process`). Frozen = not moved on while the clock runs past the lease; killed =
  its thread unwound where it stands, no handler of ledgerbc running (its ASSIGNED folder, staging and
  lease file stay).
- `Subprocesses` (a fraction): real `ledgerbc run` processes with a short lease, real SIGKILL, SIGSTOP,
  SIGCONT and SIGTERM, real time, every operator step through the CLI.

At the end the history drains (frozen workers resumed, live ones run to their exit, then an operator's
`recover`, `retry --all-failed`, `scan` and a clean worker, as often as needed) and `check` looks at the
disk with its own eyes: every read of every distinct pod5 (file_identifier) published exactly once, in the
outputs of a path that held that pod5; nothing published for files not done; the ledger's counts equal the
files on disk; no work folder left; and, once the product has it, `ledgerbc verify --deep` agrees.

Replay a history: `LEDGERBC_TEST_HISTORY_SEED=123 pytest tests/test_history.py -k seeded` (a failing history
prints its seed, its steps and the violations).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pod5
import sqlalchemy as sa

from ledgerbc import claim, janitor, models, run, scan
from ledgerbc.batch import BatchRun
from ledgerbc.create import init_ledger
from ledgerbc.db import Ledger
from ledgerbc.errors import LedgerError, LockMaybeLost, NotOwner
from ledgerbc.rebuild import rebuild_ledger
from ledgerbc.settings import Settings
from ledgerbc.testkit import dorado as standin
from ledgerbc.testkit import install_fake_dorado, synth

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import link_basename, read_output  # noqa: E402

log = logging.getLogger("ledgerbc.history")

KIT = "SQK-NBD114-24"
# In-process histories run on a fake clock: a lease of 5 minutes costs nothing.
LEASE, HEARTBEAT, SKEW = 300.0, 30.0, 30.0
WINDOW = LEASE + SKEW
# Subprocess histories run on real time.
REAL_LEASE, REAL_HEARTBEAT, REAL_SKEW = 4.0, 1.0, 1.0
STEP_TIMEOUT = 120.0  # a worker that does not reach its next stage within this (real) time is stuck
TMPFS_BYTES = 24 << 20


# -- the pod5 files a history places: one library per machine, built once ---------------------------------
@dataclass(frozen=True)
class LibFile:
    key: str
    path: Path
    chemistry: str  # "A" or "B": two run-info keys that are never batched together
    split: bool  # every read above the stand-in's split threshold


def _library_spec():
    spec = [(f"a{i:02d}", "A", False) for i in range(20)] + [(f"s{i}", "A", True) for i in range(4)]
    spec += [(f"b{i:02d}", "B", False) for i in range(10)] + [(f"t{i}", "B", True) for i in range(2)]
    return spec


LIBRARY_VERSION = 1


def library() -> dict[str, LibFile]:
    """The pool of pod5 files histories copy from (tiny: 1-12 reads each), built once in a cache folder."""
    root = Path(os.environ.get("LEDGERBC_TEST_HISTORY_CACHE") or tempfile.gettempdir()) / (
        f"ledgerbc-history-library-v{LIBRARY_VERSION}-{os.getuid()}")
    spec = _library_spec()
    if not (root / "complete").exists():
        tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
        for n, (key, chem, split) in enumerate(spec):
            chemistry = synth.DNA_5KHZ if chem == "A" else synth.DNA_5KHZ_NBD
            if split:
                synth.write_pod5(tmp / f"{key}.pod5", 2, (synth.SPLIT_READ_SAMPLES - 10_000, synth.SPLIT_READ_SAMPLES),
                                 seed=1000 + n, chemistry=chemistry)
            else:
                synth.write_pod5(tmp / f"{key}.pod5", 1 + n % 12, (1000, 12000), seed=1000 + n, chemistry=chemistry)
        (tmp / "complete").write_text("")
        try:
            tmp.rename(root)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    return {key: LibFile(key, root / f"{key}.pod5", chem, split) for key, chem, split in spec}


# -- a history: its configuration and its steps -------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    op: str
    args: tuple = ()

    def __str__(self) -> str:
        return " ".join([self.op] + [str(a) for a in self.args])


@dataclass
class Plan:
    seed: int
    mode: str  # "inprocess" | "subprocess"
    config: dict
    steps: list[Step]

    def describe(self) -> str:
        lines = [f"history seed={self.seed} mode={self.mode} config={json.dumps(self.config, sort_keys=True)}"]
        lines += [f"  {i:3d}. {s}" for i, s in enumerate(self.steps)]
        return "\n".join(lines)


FOLDERS = ["run1/pod5", "run2/pod5", "run1/pod5/more", "élan/with space"]


def generate(seed: int, mode: str = "inprocess", tmpfs: bool | None = None) -> Plan:
    """The history of `seed`: a configuration and 40-140 steps (same seed, same history)."""
    rng = random.Random(seed)
    lib = library()
    two = rng.random() < 0.4
    keys = [k for k, f in lib.items() if two or f.chemistry == "A"]
    n_files = rng.randint(4, 10 if mode == "inprocess" else 7)
    chosen = rng.sample(keys, n_files)
    can_fill = tmpfs if tmpfs is not None else tmpfs_possible()
    config = dict(
        barcoded=rng.random() < 0.3,
        emit=rng.choice(["fastq", "fastq", "fastq.gz", "bam"]),
        batch_files=rng.choice([1, 2, 3, 4]),
        min_qscore=rng.choice([0.0, 10.0]),
        max_attempts=rng.choice([2, 3, 3]),
        tmpfs=bool(can_fill and rng.random() < 0.3),
        at_init=rng.randint(0, 3),  # files present when init scans
    )
    steps: list[Step] = []
    placed = 0
    used: set[int] = set()

    def new_rel(prefix="PAW") -> str:
        """A new name, numbered at random: files arrive out of sorted order (`_10` before `_2`)."""
        n = rng.randint(1, 40 + len(used))
        while n in used:
            n = rng.randint(1, 40 + len(used))
        used.add(n)
        return f"{rng.choice(FOLDERS)}/{prefix}_pass_{n}.pod5"

    for _ in range(min(config["at_init"], n_files)):
        steps.append(Step("add", (chosen[placed], new_rel())))
        placed += 1
    steps.append(Step("init"))
    workers: list[str] = []
    frozen: set[str] = set()
    n_workers = 0
    length = rng.randint(40, 140 if mode == "inprocess" else 60)

    def start() -> None:
        nonlocal n_workers
        if workers and rng.random() < 0.15:  # a requeued task: the same worker id again
            wid = rng.choice(workers)
        else:
            n_workers += 1
            wid = f"w{n_workers}"
            workers.append(wid)
        # In-process, a worker's clock may be off by more than the skew margin: expiry is then wrong, exactly
        # once must hold all the same (the fencing token decides, never the clock).
        skew = rng.choice([0, 0, 0, 20, -20, 90, -90]) if mode == "inprocess" else 0
        steps.append(Step("start", (wid, skew) if skew else (wid,)))

    partial: list[int] = []  # files placed half-written, not completed yet
    weights = dict(add=8, complete=3, copy=3, move=3, scan=5, start=4, step=36, kill=4, freeze=3, thaw=3, term=1, advance=6,
                   recover=3, recover_force=1, retry=2, lose_ledger=2, disk=2, scenario=3)
    if mode == "inprocess":
        weights.update(kill_in_publish=2, stall_in_publish=1, janitor=4)
    while len(steps) < length:
        w = rng.choice(workers) if workers else None
        possible = {
            "add": placed < n_files, "copy": placed > 0, "move": placed > 0, "start": len(workers) - len(frozen) < 4,
            "thaw": bool(frozen), "disk": config["tmpfs"], "freeze": w is not None and w not in frozen,
            "complete": bool(partial),
        }
        kinds = [k for k in weights if possible.get(k, w is not None or k in ("scan", "advance", "recover",
                                                                              "recover_force", "retry", "lose_ledger"))]
        kind = rng.choices(kinds, [weights[k] for k in kinds])[0]
        if kind == "add":
            if rng.random() < 0.15:  # copied in place, not atomically: a scan may see it half-written
                steps.append(Step("add-partial", (chosen[placed], new_rel())))
                partial.append(placed)
            else:
                steps.append(Step("add", (chosen[placed], new_rel())))
            placed += 1
        elif kind == "complete":
            steps.append(Step("complete", (partial.pop(rng.randrange(len(partial))),)))
        elif kind in ("copy", "move"):
            steps.append(Step(kind, (rng.randrange(placed), new_rel(kind.upper()))))
        elif kind == "start":
            start()
        elif kind == "step":
            if mode == "inprocess":
                steps.append(Step("step", (w, rng.choice(["finish"] * 3 + ["lease-beat", "ledger-beat"]))))
            else:
                steps.append(Step("sleep", (rng.choice([0.2, 0.5, 1.0, 2.0]),)))
        elif kind in ("kill_in_publish", "stall_in_publish"):
            steps.append(Step(kind.replace("_", "-"), (w, rng.randint(1, 6))))
        elif kind == "freeze":
            steps.append(Step("freeze", (w, rng.choice(["with-dorado", "without-dorado"]))))
            frozen.add(w)
        elif kind == "thaw":
            w = rng.choice(sorted(frozen))
            frozen.discard(w)
            steps.append(Step("thaw", (w,)))
        elif kind in ("kill", "term", "janitor"):
            steps.append(Step(kind, (w,)))
        elif kind == "advance":
            if mode == "inprocess":
                steps.append(Step("advance", (rng.choice([10, 45, LEASE / 2, WINDOW + 1, WINDOW + 1]),)))
            else:
                steps.append(Step("sleep", (rng.choice([1.0, REAL_LEASE + REAL_SKEW + 1]),)))
        elif kind == "lose_ledger":
            steps.append(Step("lose-ledger", (rng.choice(["delete", "corrupt"]),)))
        elif kind == "disk":
            steps.append(Step(rng.choice(["fill-disk", "free-disk"]), (rng.choice([0, 0, 64 << 10]),)))
        elif kind == "scenario":
            _scenario(rng, steps, w, mode)
        else:  # scan, recover, recover_force, retry
            steps.append(Step(kind.replace("_", "-")))
    while placed < n_files:  # every chosen file arrives before the end, complete
        steps.append(Step("add", (chosen[placed], new_rel())))
        placed += 1
    steps += [Step("complete", (slot,)) for slot in partial]
    return Plan(seed, mode, config, steps)


def _scenario(rng, steps, w, mode) -> None:
    """A few steps that reach deep states more often than chance: freeze past the lease while another worker
    redoes the batch, then resume; or lose the ledger while a worker is mid-batch."""
    other = f"{w}x"
    if rng.random() < 0.6:
        if mode == "inprocess":
            steps += [Step("step", (w, "finish"))] * rng.randint(1, 4)
            steps += [Step("freeze", (w, rng.choice(["with-dorado", "without-dorado"]))), Step("advance", (WINDOW + 1,)),
                      Step(rng.choice(["recover", "recover", "recover-force"])), Step("start", (other,))]
            steps += [Step("step", (other, "finish"))] * rng.randint(3, 10)
            steps += [Step("thaw", (w,))] + [Step("step", (w, rng.choice(["finish", "ledger-beat"])))] * rng.randint(1, 5)
        else:
            steps += [Step("sleep", (rng.choice([0.5, 1.5, 3.0]),)),
                      Step("freeze", (w, rng.choice(["with-dorado", "without-dorado"]))),
                      Step("sleep", (REAL_LEASE + REAL_SKEW + 1,)), Step("recover"), Step("start", (other,)),
                      Step("sleep", (rng.choice([2.0, 5.0]),)), Step("thaw", (w,)), Step("sleep", (2.0,))]
    else:
        if mode == "inprocess":
            steps += [Step("step", (w, "finish"))] * rng.randint(1, 4)
        else:
            steps += [Step("sleep", (rng.choice([0.5, 1.5, 3.0]),))]
        steps += [Step("lose-ledger", (rng.choice(["delete", "corrupt"]),))]


# -- what a history leaves to check: which pod5 each path held ---------------------------------------------
@dataclass
class Truth:
    held: dict[str, str] = field(default_factory=dict)  # every rel path ever placed -> library key it held
    slots: list[str] = field(default_factory=list)  # the n-th file placed -> its current rel path
    partial: set[int] = field(default_factory=set)  # slots still half-written
    notes: list[str] = field(default_factory=list)  # what happened, for the report of a failing history


# -- the study on disk ---------------------------------------------------------------------------------------
def tmpfs_possible() -> bool:
    """Can this process mount a small tmpfs for OUTPUT_DIR (root, and `mount` present)? Then histories fill it."""
    return os.geteuid() == 0 and shutil.which("mount") is not None and os.environ.get("LEDGERBC_TEST_HISTORY_TMPFS", "1") != "0"


class Study:
    """INPUT_DIR, OUTPUT_DIR (maybe on a small tmpfs) and the placement of library files."""

    def __init__(self, root: Path, plan: Plan):
        self.root = root
        self.plan = plan
        self.config = plan.config
        self.input = root / "in"
        self.output = root / "out"
        self.ledger_path = self.output / "ledgerbc.db"
        self.input.mkdir(parents=True)
        self.output.mkdir()
        self.mounted = False
        self.filler = self.output / "filler"
        if self.config["tmpfs"]:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(self.output)],
                                  capture_output=True, text=True)
            self.mounted = done.returncode == 0
        self.lib = library()
        self.truth = Truth()

    def settings(self) -> Settings:
        c = self.config
        return Settings(
            input_dir=str(self.input), output_dir=str(self.output), model="hac", batch_files=c["batch_files"],
            batch_bytes=None, lease=LEASE if self.plan.mode == "inprocess" else REAL_LEASE,
            heartbeat=HEARTBEAT if self.plan.mode == "inprocess" else REAL_HEARTBEAT,
            clock_skew=SKEW if self.plan.mode == "inprocess" else REAL_SKEW, max_attempts=c["max_attempts"],
            min_qscore=c["min_qscore"], emit=c["emit"], kit_name=KIT if c["barcoded"] else None,
        )

    # -- files: each rel path holds one pod5 in a history, never another one later --
    def add(self, key: str, rel: str) -> bool:
        if key not in self.lib or rel in self.truth.held or key in self.truth.held.values():
            return False
        self._place(self.lib[key].path, rel, key, copy=True)
        self.truth.slots.append(rel)
        return True

    def add_partial(self, key: str, rel: str) -> bool:
        """A copy in place, caught halfway: the first half of the pod5 under its final name (`complete` ends it)."""
        if key not in self.lib or rel in self.truth.held or key in self.truth.held.values():
            return False
        (self.input / rel).parent.mkdir(parents=True, exist_ok=True)
        synth.truncate_copy(self.lib[key].path, self.input / rel)
        self.truth.held[rel] = key
        self.truth.slots.append(rel)
        self.truth.partial.add(len(self.truth.slots) - 1)
        return True

    def complete(self, slot: int) -> bool:
        if slot not in self.truth.partial:
            return False
        self.truth.partial.discard(slot)
        rel = self.truth.slots[slot]
        shutil.copyfile(self.lib[self.truth.held[rel]].path, self.input / rel)
        return True

    def copy(self, slot: int, rel: str) -> bool:
        if slot >= len(self.truth.slots) or rel in self.truth.held or slot in self.truth.partial:
            return False
        src = self.truth.slots[slot]
        self._place(self.input / src, rel, self.truth.held[src], copy=True)
        return True

    def move(self, slot: int, rel: str) -> bool:
        """`mv`: the n-th file placed goes to `rel` (its old path stays in `truth.held`: outputs may name it)."""
        if slot >= len(self.truth.slots) or rel in self.truth.held:
            return False
        src = self.truth.slots[slot]
        self._place(self.input / src, rel, self.truth.held[src], copy=False)
        self.truth.slots[slot] = rel
        return True

    def _place(self, src: Path, rel: str, key: str, copy: bool) -> None:
        dest = self.input / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if copy:  # under a hidden name until complete, as a careful copy does: no scan sees half a file
            tmp = dest.with_name(f".{dest.name}.arriving")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        else:
            os.rename(src, dest)
        self.truth.held[rel] = key

    # -- disk --
    def fill(self, leave: int) -> bool:
        if not self.mounted:
            return False
        chunk = b"\0" * (64 << 10)
        try:
            with open(self.filler, "ab") as fh:
                while True:
                    fh.write(chunk)
                    fh.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        if not self.filler.exists():
            return False
        if leave:
            with open(self.filler, "r+b") as fh:
                fh.truncate(max(0, os.path.getsize(self.filler) - leave))
        return True

    def free(self) -> bool:
        if self.filler.exists():
            self.filler.unlink()
            return True
        return False

    @property
    def full(self) -> bool:
        return self.filler.exists()

    def lose_ledger(self, how: str) -> None:
        if how == "delete":
            self.ledger_path.unlink(missing_ok=True)
        else:  # a torn or overwritten file: not a database any more
            with open(self.ledger_path, "r+b") as fh:
                fh.write(b"this is no longer an SQLite file" * 4)

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.output)], capture_output=True)
            self.mounted = False


# -- in-process workers ----------------------------------------------------------------------------------------
class Killed(BaseException):
    """SIGKILL of an in-process worker: unwinds its thread past every `except Exception` of ledgerbc."""


class Stuck(Exception):
    pass


class Gate:
    """Where a worker's thread waits for the history: it runs only between `send` and its next `wait`, so one
    thread runs at a time and a history is deterministic."""

    def __init__(self):
        self.cv = threading.Condition()
        self.stage: str | None = None  # where the thread waits; None while it runs (or before it starts)
        self.order: str | None = None
        self.ended: tuple | None = None  # ("exit", code) | ("killed",) | ("crash", traceback)
        self.dead = False  # killed: its undo of a publication must not run (a dead process runs nothing)
        self.auto = False  # drain: janitor passes in the loop, as a real worker makes them
        self.lock_checks: int | None = None  # die (or stall) at this many more lock checks of a publication
        self.stall = False
        self.job = None  # the BatchRun it is in, while in one
        self.nap = 0.0  # how long its last nap was meant to last (a watchman's)

    # the worker's side
    def wait(self, stage: str) -> str:
        with self.cv:
            self.stage = stage
            self.cv.notify_all()
            self.cv.wait_for(lambda: self.order is not None)
            order, self.order, self.stage = self.order, None, None
        if order == "kill":
            self.dead = True
            raise Killed()
        return order

    def end(self, outcome: tuple) -> None:
        with self.cv:
            self.ended, self.stage = outcome, None
            self.cv.notify_all()

    # the history's side
    def arrived(self, timeout: float = STEP_TIMEOUT) -> None:
        with self.cv:
            if not self.cv.wait_for(lambda: self.order is None and (self.stage is not None or self.ended), timeout):
                raise Stuck(f"no next stage within {timeout:.0f}s")

    def send(self, order: str) -> None:
        with self.cv:
            assert self.stage is not None and self.order is None
            self.order = order
            self.cv.notify_all()
        self.arrived()


class SteppedLedger(Ledger):
    """A worker's own handle on the ledger: a publication can be killed (or stalled past the lock's trust)
    at its n-th lock check — before each rename and before the COMMIT."""

    def __init__(self, path, clock, gate: Gate):
        super().__init__(path, clock=clock)
        self.gate = gate

    def check_lock_trusted(self) -> None:
        super().check_lock_trusted()
        g = self.gate
        if g.lock_checks is not None:
            g.lock_checks -= 1
            if g.lock_checks <= 0:
                g.lock_checks = None
                if g.stall:
                    raise LockMaybeLost("history: this publication stalled past the lock's trust")
                g.dead = True
                raise Killed()

    def transact(self, fn, *args, undo=None, **kwargs):
        if undo is not None:
            inner = undo
            undo = lambda: None if self.gate.dead else inner()  # noqa: E731
        return super().transact(fn, *args, undo=undo, **kwargs)


class SteppedStop(run.StopFlag):
    """The worker's stop flag (SIGTERM) carries its gate to the BatchRun, which knows only its crew."""

    def __init__(self, gate: Gate):
        super().__init__()
        self.gate = gate


class InProcessDorado:
    """What BatchRun uses of `dorado.DoradoProcess`; the stand-in basecalls (in this process) when told to."""

    def __init__(self, argv, bam_path: Path, log_path: Path):
        self.argv, self.bam_path, self.log_path = argv, bam_path, log_path
        bam_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        bam_path.write_bytes(b"")  # DoradoProcess opens its stdout file at start
        self.returncode: int | None = None

    @property
    def proc(self):
        return self

    def poll(self, timeout=None):
        return self.returncode

    def wait(self):
        return self.returncode

    def run(self) -> None:
        if self.returncode is not None:
            return
        if self.bam_path.parent.is_dir():
            self.returncode = standin.basecall_in_process(self.argv[1:], self.bam_path, self.log_path)
        else:  # its staging was removed while it ran: it wrote into a deleted file
            with tempfile.TemporaryDirectory() as sink:
                self.returncode = standin.basecall_in_process(self.argv[1:], Path(sink) / "calls.bam", self.log_path)

    def stop(self, grace: float = 0) -> int:
        if self.returncode is None:
            self.returncode = -signal.SIGKILL
        return self.returncode


class SteppedBatchRun(BatchRun):
    """`BatchRun` with a gate before each stage; dorado is `InProcessDorado` and its heartbeats are steps."""

    @property
    def gate(self) -> Gate:
        return self.crew.stop.gate

    def execute(self) -> str:
        self.gate.job = self
        self.gate.wait("claimed")
        return super().execute()

    def basecall(self) -> str:
        from ledgerbc import dorado, modelplan

        crew = self.crew
        argv = dorado.build_argv(crew.settings, self.assigned, crew.device, crew.executable,
                                 modelplan.model_for(crew.settings, self.batch.chemistry))
        if crew.settings.kit_name and "--kit-name" not in argv:
            # dorado classifies while it basecalls (DESIGN §5); until build_argv passes the study's kit itself
            # (`init --kit-name`, refused as a --dorado-arg), the harness does, so barcoded outputs have barcodes.
            argv += ["--kit-name", crew.settings.kit_name]
        self.proc = InProcessDorado(argv, self.staging / "calls.bam", crew.layout.log(self.batch.batch_id))
        while True:  # what BatchRun.basecall does each tick, one tick per step
            order = self.gate.wait("basecall")
            if crew.stop.requested:
                self._stop_dorado()
                return "stopped"
            if order in ("lease-beat", "ledger-beat"):
                if order == "ledger-beat":
                    self.beat.last_ledger = -math.inf
                try:
                    self.beat.beat()
                except NotOwner:
                    self._stop_dorado()
                    return "fenced"
                except LedgerError as exc:
                    log.warning("heartbeat of batch %s failed: %s", self.batch.batch_id, exc)
                continue
            self.proc.run()
            return "exited"

    def _heartbeating(self, fn):
        self.gate.wait("split")  # splitting a tiny batch takes no heartbeat
        return fn()

    def publish(self, links, result, results) -> str:
        self.gate.wait("publish")
        return super().publish(links, result, results)

    def cleanup(self) -> None:
        self.gate.wait("cleanup")
        super().cleanup()


class SteppedWorker(run.Worker):
    """The real worker loop; claims, naps and janitor passes wait for the history."""

    @property
    def gate(self) -> Gate:
        return self.stop.gate

    def patiently(self, fn, *args, **kwargs):
        name = getattr(fn, "__name__", "")
        if name == "maybe_run":  # janitor passes are steps of their own, or every loop turn in a drain
            return super().patiently(self.janitor.run_pass) if self.gate.auto else None
        if name == "claim_batch":
            self.gate.wait("claim")
        return super().patiently(fn, *args, **kwargs)

    def dorado_version(self) -> str:
        return standin.version()  # what `dorado --version` of the stand-in says, without a process

    def nap(self, seconds: float) -> None:
        self.gate.nap = seconds
        self.gate.wait("nap")  # the watchman: the history moves the clock

    def _leave(self, pending, code) -> None:
        if not self.gate.dead:
            super()._leave(pending, code)


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Handle:
    wid: str
    gate: Gate
    ledger: SteppedLedger
    worker: SteppedWorker | None = None
    frozen: bool = False

    @property
    def alive(self) -> bool:
        return self.gate.ended is None

    @property
    def stage(self) -> str | None:
        return self.gate.stage


class _LogWatch(logging.Handler):
    """Every ledgerbc log record of a history: tracebacks in them are violations, warnings go in the report."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def tracebacks(self) -> list[str]:
        return [f"{r.name}: {r.getMessage()}\n" + "".join(traceback.format_exception(*r.exc_info))
                for r in self.records if r.exc_info]

    def lines(self, level=logging.WARNING) -> list[str]:
        return [f"{r.name} {r.levelname}: {r.getMessage()}" for r in self.records if r.levelno >= level]


_WORKER_STEPS = ("start", "step", "kill", "kill-in-publish", "stall-in-publish", "freeze", "thaw", "term", "janitor")
_FILE_STEPS = {"add": "add", "add-partial": "add_partial", "complete": "complete", "copy": "copy", "move": "move"}


class Runner:
    """What both ways of running a plan share: the steps on files and disk, the operator's commands, the drain.
    A subclass runs the workers (`worker_step`, `resume_all`, `clean_worker`) and the commands."""

    rounds = 6  # operator rounds of the drain (recover, retry, a clean worker)

    def __init__(self, study: Study):
        self.study = study
        self.violations: list[str] = []
        self.did: Counter = Counter()  # what the steps met and how workers ended: coverage
        self.initialised = False
        self.at = None

    def execute(self, plan: Plan) -> None:
        s = self.study
        for n, st in enumerate(plan.steps):
            self.at = n
            self.did[self.met(st)] += 1
            if st.op in _FILE_STEPS:
                getattr(s, _FILE_STEPS[st.op])(*st.args)
            elif st.op == "init":
                self.init()
            elif not self.initialised:
                continue  # before init (a minimised history): nothing else applies
            elif st.op in ("scan", "retry"):
                getattr(self, st.op)()
            elif st.op in ("recover", "recover-force"):
                self.recover(force=st.op == "recover-force")
            elif st.op == "lose-ledger":
                if not s.full and s.ledger_path.exists():  # (a rebuild cannot write a full disk either)
                    s.lose_ledger(st.args[0])
                    self.rebuild()
            elif st.op == "fill-disk":
                s.fill(st.args[0])
            elif st.op == "free-disk":
                s.free()
            elif st.op in ("advance", "sleep"):  # the fake clock moves; real time passes
                self.pass_time(st.args[0])
            else:
                self.worker_step(st)
            self.violations += published_twice(s)
            if self.violations:
                return

    def drain(self) -> None:
        """The end of the run: the disk freed, frozen workers resumed and every live worker run to its exit; then
        the operator recovers, retries failed files and runs a clean worker, until nothing is left."""
        s = self.study
        s.free()
        for slot in sorted(s.truth.partial):  # the copies in place end (a history cut short by `minimise` too)
            s.complete(slot)
        if not self.initialised:
            self.init()
        self.resume_all()
        for round_ in range(self.rounds):
            if self.violations:
                return
            self.before_round()
            if not s.ledger_path.exists():
                self.rebuild()
            self.recover(force=False)
            self.retry()  # (rescans too)
            if round_ and _settled(self.ledger()):
                return
            self.clean_worker(f"drain{round_}")

    def before_round(self) -> None:
        pass

    def met(self, st: Step) -> str:
        return st.op


class InProcess(Runner):
    """Runs a plan's steps against the library in this process."""

    def __init__(self, study: Study):
        super().__init__(study)
        self.clock = Clock()
        self.handles: dict[str, Handle] = {}  # the newest incarnation of each worker id
        self.all: list[Handle] = []
        self.settings: Settings | None = None

    def ledger(self) -> Ledger:
        return Ledger(self.study.ledger_path, clock=self.clock)

    # -- operators --
    def init(self) -> None:
        init_ledger(self.study.settings())
        self.settings = self.ledger().read_settings()
        self.initialised = True

    def operator(self, what: str, fn, *args, **kwargs):
        """An operator's command: a LedgerError is its one-line refusal (e.g. a full disk), not a bug."""
        try:
            return fn(*args, **kwargs)
        except LedgerError as exc:
            self.study.truth.notes.append(f"{what}: Error: {exc}")
        except Exception:
            self.violations.append(f"`{what}` crashed:\n{traceback.format_exc()}")

    def scan(self) -> None:
        self.operator("scan", lambda: scan.Scanner(self.ledger(), self.settings).scan())

    def recover(self, force: bool) -> None:
        self.operator("recover" + (" --force" if force else ""), janitor.recover, self.ledger(), force=force)

    def retry(self) -> None:
        def retry_all():  # what `ledgerbc retry --all-failed` does
            ledger = self.ledger()
            claim.retry_failed(ledger, None)
            scan.Scanner(ledger, self.settings).scan()

        self.operator("retry --all-failed", retry_all)

    def rebuild(self) -> None:
        self.operator("recover --rebuild", rebuild_ledger, self.study.input, self.study.output, clock=self.clock)

    # -- workers --
    def start(self, wid: str, skew: float = 0) -> Handle:
        gate = Gate()
        ledger = SteppedLedger(self.study.ledger_path, (lambda: self.clock() + skew) if skew else self.clock, gate)
        handle = Handle(wid, gate, ledger)
        thread = threading.Thread(target=self._body, args=(handle,), name=f"worker-{wid}", daemon=True)
        thread.start()
        handle.gate.arrived()
        self.handles[wid] = handle
        self.all.append(handle)
        return handle

    def _body(self, h: Handle) -> None:
        try:
            h.gate.wait("start")
            settings = h.ledger.read_settings()
            h.worker = SteppedWorker(h.ledger, settings, run.WorkerOptions(worker_id=f"{h.wid}@history"),
                                     executable="dorado", stop=SteppedStop(h.gate))
            h.gate.end(("exit", h.worker.run()))
        except Killed:
            h.gate.end(("killed",))
        except LedgerError as exc:  # what the CLI turns into one line and its exit code
            h.gate.end(("exit", exc.exit_code, str(exc)))
        except BaseException:
            h.gate.end(("crash", traceback.format_exc()))

    def step(self, h: Handle, how: str) -> None:
        if not h.alive or h.frozen:
            return
        h.gate.send(how if h.stage == "basecall" else "go")

    def kill(self, h: Handle) -> None:
        if h.alive:
            h.frozen = False
            h.gate.send("kill")

    def freeze(self, h: Handle, with_dorado: bool) -> None:
        if not h.alive or h.frozen:
            return
        h.frozen = True
        job = h.gate.job
        if not with_dorado and h.stage == "basecall" and isinstance(job.proc, InProcessDorado):
            job.proc.run()  # dorado is not stopped with its worker: it finishes meanwhile

    def in_publish(self, h: Handle, checks: int, stall: bool) -> None:
        """Move a worker in a batch on to its publication, then kill it (or stall it past the lock's trust) at
        its `checks`-th lock check: between two renames, or before the COMMIT."""
        while h.alive and not h.frozen and h.stage in ("claimed", "basecall", "split"):
            h.gate.send("finish" if h.stage == "basecall" else "go")
        if h.alive and not h.frozen and h.stage == "publish":
            self.did["stall-in-publish@renames" if stall else "kill-in-publish@renames"] += 1
            h.gate.lock_checks, h.gate.stall = checks, stall
            h.gate.send("go")
            h.gate.lock_checks, h.gate.stall = None, False

    def janitor_pass(self, h: Handle) -> None:
        if h.alive and not h.frozen and h.worker is not None:
            try:
                h.worker.janitor.run_pass()
            except (LedgerError, OSError) as exc:
                self.study.truth.notes.append(f"janitor of {h.wid}: {exc}")

    # -- a plan --
    def met(self, st: Step) -> str:
        h = self.handles.get(st.args[0]) if st.op in _WORKER_STEPS else None
        return f"{st.op}@{h.stage}" if h and h.alive and (not h.frozen or st.op == "kill") else st.op

    def worker_step(self, st: Step) -> None:
        wid = st.args[0]
        h = self.handles.get(wid)
        if st.op == "start":
            # a new worker, a task requeued after it died, or one requeued while the old incarnation is frozen
            # on its node (the same worker id twice)
            if h is None or not h.alive or h.frozen:
                self.start(*st.args)
        elif st.op == "thaw":
            for old in self.all:  # every incarnation of that worker id
                if old.wid == wid:
                    old.frozen = False
        elif h is None:
            return
        elif st.op == "step":
            self.step(h, st.args[1])
        elif st.op == "kill":
            self.kill(h)
        elif st.op in ("kill-in-publish", "stall-in-publish"):
            self.in_publish(h, st.args[1], stall=st.op == "stall-in-publish")
        elif st.op == "freeze":
            self.freeze(h, st.args[1] == "with-dorado")
        elif st.op == "term":
            if h.alive and h.worker is not None:
                h.worker.stop.requested = True
        elif st.op == "janitor":
            self.janitor_pass(h)

    def pass_time(self, seconds: float) -> None:
        self.clock.now += seconds

    def resume_all(self) -> None:
        for h in self.all:
            h.frozen = False
        self.run_out([h for h in self.all if h.alive])

    def before_round(self) -> None:
        self.clock.now += WINDOW + 1  # whatever is still running is expired

    def clean_worker(self, wid: str) -> None:
        self.run_out([self.start(wid)])

    def run_out(self, handles: list[Handle], rounds: int = 1000) -> None:
        """Step workers until they exit, as real ones run side by side: each moves one stage a round, dorado
        finishes when asked, and the clock moves by the longest nap of the round (a watchman's)."""
        for h in handles:
            h.gate.auto = True
        for _ in range(rounds):
            live = [h for h in handles if h.alive]
            if not live:
                return
            self.clock.now += max((h.gate.nap for h in live if h.stage == "nap"), default=0)
            for h in live:
                h.gate.send("finish" if h.stage == "basecall" else "go")
        running = _running(self.ledger())
        self.violations.append(f"workers (id, stage) {[(h.wid, h.stage) for h in handles if h.alive]} still running after "
                               f"{rounds} rounds; running batches (id, worker, heartbeat age): {running}")

    def outcomes(self) -> list[str]:
        """Violations in how the workers ended: a crash, a traceback in the log, an unexpected exit code."""
        out = []
        for h in self.all:
            if h.gate.ended:
                self.did[" ".join(["worker", *map(str, h.gate.ended[:2])])] += 1
            if h.gate.ended and h.gate.ended[0] == "crash":
                out.append(f"worker {h.wid} crashed:\n{h.gate.ended[1]}")
            elif h.gate.ended and h.gate.ended[0] == "exit" and h.gate.ended[1] not in (0, 11, 143):
                out.append(f"worker {h.wid} exited {h.gate.ended[1]}: {h.gate.ended[2:] or ''}")
        return out

    def abandon(self) -> None:
        """End every thread still parked (a failing history): killed where it stands."""
        for h in self.all:
            if h.alive and h.stage is not None:
                try:
                    h.gate.send("kill")
                except Stuck:
                    pass


def _running(ledger: Ledger) -> list:
    try:
        return [(b.id, b.worker_id, round(ledger.clock() - b.heartbeat_at)) for b in ledger.transact(
            lambda c: c.execute(sa.select(models.Batch).where(models.Batch.state == models.RUNNING)).all())]
    except LedgerError as exc:
        return [str(exc)]


def _settled(ledger: Ledger) -> bool:
    def txn(conn):
        busy = conn.execute(sa.select(sa.func.count()).select_from(models.Pod5File).where(
            models.Pod5File.state.in_((models.PENDING, models.CLAIMED, models.WAITING)))).scalar_one()
        running = conn.execute(sa.select(sa.func.count()).select_from(models.Batch)
                               .where(models.Batch.state == models.RUNNING)).scalar_one()
        return busy == 0 and running == 0

    try:
        return ledger.transact(txn)
    except LedgerError:
        return False


# -- the invariants ---------------------------------------------------------------------------------------------
_BARCODE_DIR = re.compile(r"^(barcode\d+|unclassified|.+_barcode\d+)$")


def _outputs_on_disk(study: Study) -> dict[str, list[Path]]:
    """{input rel: [its output files under pass/ and fail/]} from the folder names alone."""
    emit = study.config["emit"]
    found: dict[str, list[Path]] = defaultdict(list)
    for kind in ("pass", "fail"):
        top = study.output / kind
        if not top.is_dir():
            continue
        for path in top.rglob("*"):
            if not path.is_file() or not path.name.endswith("." + emit):
                continue
            rel = path.relative_to(top).as_posix()
            if study.config["barcoded"]:
                rel = rel.split("/", 1)[1] if "/" in rel else rel
            found[rel[: -len(emit)] + "pod5"].append(path)
    return found


def _done_markers(study: Study) -> dict[str, Path]:
    """{input rel: the output that says it is done}: pass/<rel> unbarcoded, summary/<rel>.tsv barcoded."""
    if not study.config["barcoded"]:
        return {rel: p for rel, ps in _outputs_on_disk(study).items() for p in ps
                if p.relative_to(study.output).parts[0] == "pass"}
    top = study.output / "summary"
    return {p.relative_to(top).as_posix()[: -len(".tsv")] + ".pod5": p for p in top.rglob("*.tsv")} if top.is_dir() else {}


def published_twice(study: Study) -> list[str]:
    """Cheap, after every step: no pod5 (library file) has a done marker under two paths."""
    by_key = defaultdict(list)
    for rel in _done_markers(study):
        by_key[study.truth.held.get(rel, f"?{rel}")].append(rel)
    return [f"one pod5 ({key}) published under two paths: {sorted(rels)}" for key, rels in by_key.items() if len(rels) > 1]


def pod5_on_disk(root: Path) -> dict[str, tuple[str, list[str]]]:
    """{rel: (file_identifier, read ids)} of every visible pod5 under `root`, read with the pod5 library."""
    out = {}
    for path in sorted(root.rglob("*.pod5")):
        rel = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        with pod5.Reader(path) as reader:
            out[rel] = (str(reader.file_identifier), [str(r) for r in reader.read_ids])
    return out


def check(study: Study, ledger: Ledger) -> list[str]:
    """Every invariant of a drained study, from the disk (and the ledger for its counts); violations as lines."""
    v: list[str] = []
    barcoded = study.config["barcoded"]
    disk = pod5_on_disk(study.input)
    reads_of: dict[str, set[str]] = {}  # library key (one pod5 file_identifier) -> read ids
    for rel, (_fid, ids) in disk.items():
        key = study.truth.held.get(rel)
        if key is None:
            v.append(f"{rel}: a pod5 on disk that the history never placed")
            continue
        reads_of[key] = set(ids)
    outputs = _outputs_on_disk(study)
    # 1. each output holds reads of the pod5 its path held, every record once; every read once overall
    covered: dict[str, set[str]] = defaultdict(set)  # pod5 read id -> rels whose outputs hold it
    pieces: dict[str, list[str]] = defaultdict(list)  # parent -> split record ids
    whole: Counter = Counter()
    records_seen: Counter = Counter()
    counted: dict[str, list[int]] = {}
    for rel, paths in sorted(outputs.items()):
        key = study.truth.held.get(rel)
        if key is None:
            v.append(f"{rel}: outputs for a path that never held a pod5: {[str(p) for p in paths]}")
            continue
        n_pass = n_fail = 0
        for path in paths:
            kind = path.relative_to(study.output).parts[0]
            for r in read_output(path):
                records_seen[r.read_id] += 1
                parent = r.parent
                if parent not in reads_of.get(key, ()):
                    v.append(f"{rel}: {path.name} holds read {parent}, not of the pod5 this path held ({key})")
                if not r.tags.get("fn", "")[2:].endswith(link_basename(rel)):
                    v.append(f"{rel}: a record made from {r.tags.get('fn')}")
                covered[parent].add(rel)
                if "pi" in r.tags:
                    pieces[parent].append(r.read_id)
                else:
                    whole[parent] += 1
                if kind == "pass":
                    n_pass += 1
                else:
                    n_fail += 1
        counted[rel] = [n_pass, n_fail]
    v += [f"record {rid} written {n} times" for rid, n in records_seen.items() if n > 1][:5]
    for key, ids in sorted(reads_of.items()):
        twice = [r for r in ids if len(covered.get(r, ())) > 1]
        if twice:
            v.append(f"pod5 {key}: {len(twice)} reads published under several paths: {sorted(covered[twice[0]])}")
        missing = [r for r in ids if not covered.get(r)]
        if missing:
            paths = sorted(rel for rel, k in study.truth.held.items() if k == key)
            v.append(f"pod5 {key} ({paths}): {len(missing)} of {len(ids)} reads never published")
        for r in ids:
            if whole[r] > 1 or (whole[r] and pieces.get(r)) or (pieces.get(r) and len(pieces[r]) != 2):
                v.append(f"pod5 {key}: read {r} published {whole[r]} times whole and in {len(pieces.get(r, []))} pieces")
                break
    # 2. the ledger agrees with the disk
    try:
        rows = ledger.transact(lambda c: c.execute(sa.select(models.Pod5File)).all())
        running = ledger.transact(lambda c: c.execute(sa.select(models.Batch.id).where(
            models.Batch.state == models.RUNNING)).scalars().all())
        out_rows = ledger.transact(lambda c: c.execute(sa.select(models.Output.path, models.Output.file_id)).all())
    except LedgerError as exc:
        return v + [f"the ledger cannot be read after the drain: {exc}"]
    by_rel = {r.rel_path: r for r in rows}
    by_id = {r.id: r for r in rows}
    markers = _done_markers(study)
    for rel in disk:
        if rel not in by_rel:
            v.append(f"{rel}: on disk, unknown to the ledger")
    for r in rows:
        on_disk = r.rel_path in disk
        if r.state == models.DONE:
            if r.rel_path not in markers:
                v.append(f"{r.rel_path}: done in the ledger, no {'summary' if barcoded else 'pass/'} output")
            elif [r.reads_pass, r.reads_fail] != counted.get(r.rel_path, [0, 0]):
                v.append(f"{r.rel_path}: the ledger counts {r.reads_pass} pass + {r.reads_fail} fail reads, the disk "
                         f"{counted.get(r.rel_path)}")
        else:
            if r.rel_path in outputs or r.rel_path in markers:
                v.append(f"{r.rel_path}: {r.state} in the ledger, yet has outputs")
            if r.state in (models.PENDING, models.CLAIMED, models.WAITING):
                v.append(f"{r.rel_path}: still {r.state} after the drain")
            if r.state == models.FAILED and on_disk:
                v.append(f"{r.rel_path}: failed after the drain ({r.last_error})")
            if r.state == models.DUPLICATE:
                twin = by_id.get(r.duplicate_of)
                if twin is None or twin.file_identifier != r.file_identifier:
                    v.append(f"{r.rel_path}: duplicate of a row that is not the same pod5")
    if running:
        v.append(f"batches still running after the drain: {running}")
    recorded = {p for p, fid in out_rows if fid in by_id and by_id[fid].state == models.DONE}
    on_disk_outputs = {p.relative_to(study.output).as_posix() for ps in outputs.values() for p in ps}
    if barcoded or (study.output / "summary").is_dir():
        on_disk_outputs |= {p.relative_to(study.output).as_posix() for p in (study.output / "summary").rglob("*.tsv")}
    if recorded != on_disk_outputs:
        v.append(f"outputs recorded in the ledger != outputs on disk: only recorded {sorted(recorded - on_disk_outputs)[:3]}, "
                 f"only on disk {sorted(on_disk_outputs - recorded)[:3]}")
    # 3. no work left behind
    work = study.output / "work"
    left = [p.name for p in work.iterdir() if p.name.startswith("ASSIGNED_") or p.name.startswith(".ASSIGNED_")] \
        if work.is_dir() else []
    staging = [p.name for p in (work / "staging").iterdir()] if (work / "staging").is_dir() else []
    leases = [p.name for p in Path(f"{study.ledger_path}.leases").glob("*")]
    if left or staging or leases:
        v.append(f"work folders left: {left + staging}, lease files left: {leases}")
    temps = [p for top in ("pass", "fail", "summary") for p in (study.output / top).rglob(".*")]
    if temps:
        v.append(f"temporary files left in the outputs: {[str(t) for t in temps[:3]]}")
    # 4. the product's own checker, once it has one
    v += product_verify(ledger)
    return v


def product_verify(ledger: Ledger) -> list[str]:
    """`ledgerbc verify --deep`, when this ledgerbc has it (issue 11): must agree that all holds."""
    try:
        from ledgerbc import verify
    except ImportError:
        return []
    report = verify.verify(ledger, deep=True)
    return [f"verify --deep: {line}" for line in report.lines()]


def ledger_rows(study: Study) -> list[str]:
    """The ledger's files, for the report of a failing history."""
    try:
        rows = Ledger(study.ledger_path).transact(lambda c: c.execute(sa.select(models.Pod5File).order_by(models.Pod5File.id)).all())
    except (LedgerError, OSError) as exc:
        return [f"ledger unreadable: {exc}"]
    return ["ledger rows (id rel state attempts batch duplicate_of pod5 last_error):"] + [
        f"  {r.id} {r.rel_path} {r.state} {r.attempts} {r.batch_id} {r.duplicate_of} "
        f"{study.truth.held.get(r.rel_path)} {(r.last_error or '')[:120]}" for r in rows]


# -- one history, start to end ----------------------------------------------------------------------------------
@dataclass
class Outcome:
    plan: Plan
    violations: list[str]
    notes: list[str]
    log: list[str]
    seconds: float
    did: Counter = field(default_factory=Counter)  # what the steps met and how workers ended: coverage

    @property
    def ok(self) -> bool:
        return not self.violations

    def report(self) -> str:
        parts = [self.plan.describe(), "violations:"] + [f"  - {x}" for x in self.violations]
        if self.notes:
            parts += ["notes:"] + [f"  {n}" for n in self.notes[-60:]]
        if self.log:
            parts += ["ledgerbc warnings (last 30):"] + [f"  {line}" for line in self.log[-30:]]
        without = ",".join(self.plan.config.get("without", ()))
        parts.append(f"replay: LEDGERBC_TEST_HISTORY_SEED={self.plan.seed} LEDGERBC_TEST_HISTORY_MODE={self.plan.mode} "
                     + (f"LEDGERBC_TEST_HISTORY_WITHOUT={without} " if without else "") + "pytest tests/test_history.py -k seeded")
        return "\n".join(parts)


def run_plan(plan: Plan, root: Path) -> Outcome:
    """Execute a plan in `root` (a fresh folder), drain, check."""
    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    descriptors = set(os.listdir("/proc/self/fd"))
    study = Study(root, plan)
    watch = _LogWatch()
    logger = logging.getLogger("ledgerbc")
    logger.addHandler(watch)
    old_level = logger.level
    logger.setLevel(logging.WARNING)
    runner = InProcess(study) if plan.mode == "inprocess" else Subprocesses(study)
    try:
        with _stepped_batches(plan.mode):
            try:
                runner.execute(plan)
                if not runner.violations:
                    runner.drain()
            except Stuck as exc:
                runner.violations.append(f"step {getattr(runner, 'at', '?')}: a worker is stuck: {exc}")
            finally:
                runner.abandon()
        violations = list(runner.violations) + runner.outcomes()
        if plan.mode == "inprocess":
            violations += [f"a traceback in a worker's log: {t}" for t in watch.tracebacks()]
        if not runner.violations:
            violations += check(study, Ledger(study.ledger_path, clock=getattr(runner, "clock", time.time)))
        if violations:
            study.truth.notes += ledger_rows(study)
    finally:
        logger.removeHandler(watch)
        logger.setLevel(old_level)
        study.close()
        _close_descriptors(descriptors)
    lines = watch.lines() + getattr(runner, "log_lines", [])
    did = runner.did + Counter(what for line in lines for what in _LOGGED if what in line)
    return Outcome(plan, violations, study.truth.notes, lines, time.monotonic() - started, did)


def _close_descriptors(before: set[str]) -> None:
    """Close what a history's Ledger objects left open: each keeps its `<ledger>.turnstile` (and lock file) open
    for the life of the process, which is right for a worker (one Ledger a process) but a history makes dozens,
    and a soak hundreds of histories (rebuild's own, aside, included). A lazily unmounted tmpfs lives as long."""
    for fd in set(os.listdir("/proc/self/fd")) - before:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if re.search(r"/\.?ledgerbc\.db[^/]*\.(turnstile|lock)( \(deleted\))?$", target):
            with contextlib.suppress(OSError):
                os.close(int(fd))


# Log lines worth counting as coverage: what the product said it did.
_LOGGED = ("(fenced)", "reclaimed batch", "no space left", "could not release", "heartbeat of batch", "was taken back",
           "lock", "ledger unavailable", "giving up")


@contextlib.contextmanager
def _stepped_batches(mode: str):
    if mode != "inprocess":
        yield
        return
    with mock.patch.object(run, "BatchRun", SteppedBatchRun):
        yield


def run_seed(seed: int, root: Path, mode: str = "inprocess", without: tuple = ()) -> Outcome:
    """The history of `seed`; `without`: step kinds left out (to look past a known bug with the soak)."""
    plan = generate(seed, mode)
    if without:
        plan.steps = [st for st in plan.steps if st.op not in without]
        plan.config["without"] = sorted(without)
    return run_plan(plan, root)


# -- minimising a failing history ---------------------------------------------------------------------------------
def kind(violation: str) -> str:
    """What a violation is about, without the names and numbers that change when steps are removed."""
    first = violation.splitlines()[0]
    first = re.sub(r"'[^']*'|\[[^\]]*\]|\([^)]*\)", "…", first)  # quoted names, lists, asides
    first = re.sub(r"\S*/\S*|[0-9a-f]{8}-[0-9a-f-]{27}", "<path>", first)  # paths, read ids
    return re.sub(r"\b[a-z]?\d+\b", "#", first)[:100]  # numbers, library keys (a07), worker ids


def minimise(plan: Plan, root: Path, budget: float = 900.0) -> Plan:
    """A shorter history failing the same way (delta debugging over the steps, within `budget` seconds)."""
    first = run_plan(plan, root / "m0")
    if first.ok:
        return plan
    target = {kind(x) for x in first.violations}
    steps = list(plan.steps)
    deadline = time.monotonic() + budget
    n = 0
    chunk = max(1, len(steps) // 2)
    while chunk >= 1 and time.monotonic() < deadline:
        i, removed = 0, False
        while i < len(steps) and time.monotonic() < deadline:
            trial = steps[:i] + steps[i + chunk:]
            if Step("init") in trial:
                n += 1
                out = run_plan(Plan(plan.seed, plan.mode, plan.config, trial), root / f"m{n}")
                shutil.rmtree(root / f"m{n}", ignore_errors=True)
                if not out.ok and target & {kind(x) for x in out.violations}:
                    steps, removed = trial, True
                    continue
            i += chunk
        if not removed:
            chunk //= 2
    return Plan(plan.seed, plan.mode, plan.config, steps)


# -- subprocess histories ---------------------------------------------------------------------------------------
class Subprocesses(Runner):
    """Runs a plan with real `ledgerbc run` processes (short lease, real time), real signals, and the CLI for
    every operator step. A SIGKILL takes the worker's dorado with it (Slurm kills the task's cgroup); a
    SIGSTOP without dorado lets dorado run on."""

    rounds = 4
    patience = 8 * (REAL_LEASE + REAL_SKEW) + 120  # how long the drain waits for workers to exit (real seconds)

    def __init__(self, study: Study):
        super().__init__(study)
        self.bin = study.root / "bin"
        install_fake_dorado(self.bin)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGERBC_")}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        # dorado takes 10-20 s to start; the stand-in 1.5 s, then about a second per batch: time to hit it mid-batch
        env.update(LEDGERBC_SIM_DELAY="1.5", LEDGERBC_SIM_SECONDS_PER_MB="3")
        self.env = env
        self.procs: dict[str, list[subprocess.Popen]] = defaultdict(list)
        self.frozen: set[int] = set()
        self.log_lines: list[str] = []

    def ledger(self) -> Ledger:
        return Ledger(self.study.ledger_path)

    # -- operators: the CLI --
    def cli(self, *args, timeout: float = 300) -> subprocess.CompletedProcess:
        from helpers import ledgerbc_argv

        done = subprocess.run(ledgerbc_argv() + [str(a) for a in args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.study.root)
        line = f"$ ledgerbc {' '.join(str(a) for a in args)} -> {done.returncode}: {done.stderr.strip()[-300:]}"
        self.study.truth.notes.append(line)
        if "Traceback" in done.stderr or "internal error" in done.stderr:
            self.violations.append(f"`ledgerbc {args[0]}` crashed:\n{done.stderr[-3000:]}")
        return done

    def init(self) -> None:
        init_ledger(self.study.settings())  # the library: the CLI has no --kit-name yet
        self.initialised = True

    def scan(self) -> None:
        self.cli("scan", "--ledger", self.study.ledger_path)

    def recover(self, force: bool) -> None:
        self.cli("recover", "--ledger", self.study.ledger_path, *(["--force"] if force else []))

    def retry(self) -> None:
        self.cli("retry", "--all-failed", "--ledger", self.study.ledger_path)

    def rebuild(self) -> None:
        time.sleep(0.5)  # workers meet the lost ledger before the operator notices
        self.cli("recover", "--rebuild", "--input", self.study.input, "--output", self.study.output)

    # -- workers: processes and signals --
    def start(self, wid: str) -> subprocess.Popen:
        from helpers import ledgerbc_argv

        log_path = self.study.root / f"worker-{wid}-{sum(map(len, self.procs.values()))}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                ledgerbc_argv() + ["run", "--ledger", str(self.study.ledger_path), "--worker-id", f"{wid}@history"],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                cwd=self.study.root)
        proc.log_path = log_path
        self.procs[wid].append(proc)
        return proc

    def _live(self, wid) -> list[subprocess.Popen]:
        return [p for p in self.procs.get(wid, []) if p.poll() is None]

    def _signal(self, proc, sig, with_children: bool = True) -> None:
        from helpers import children_of

        for pid in [proc.pid] + (children_of(proc.pid) if with_children else []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if sig == signal.SIGSTOP:
                self.frozen.add(pid)
            elif sig in (signal.SIGCONT, signal.SIGKILL):
                self.frozen.discard(pid)
        if sig == signal.SIGKILL:
            proc.wait()

    def met(self, st: Step) -> str:
        return st.op + ("@live" if st.op in _WORKER_STEPS and self._live(st.args[0]) else "")

    def worker_step(self, st: Step) -> None:
        live = self._live(st.args[0])
        newest = live[-1] if live else None
        if st.op == "start":
            if not live or all(p.pid in self.frozen for p in live):
                self.start(st.args[0])
        elif st.op == "thaw":
            for p in live:
                self._signal(p, signal.SIGCONT)
        elif newest is None:
            return
        elif st.op == "kill":
            self._signal(newest, signal.SIGCONT)
            self._signal(newest, signal.SIGKILL)
        elif st.op == "freeze" and newest.pid not in self.frozen:
            self._signal(newest, signal.SIGSTOP, with_children=st.args[1] == "with-dorado")
        elif st.op == "term":
            self._signal(newest, signal.SIGTERM, with_children=False)

    def pass_time(self, seconds: float) -> None:
        time.sleep(seconds)

    def wait_all(self) -> None:
        deadline = time.monotonic() + self.patience
        for wid, procs in self.procs.items():
            for p in procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.violations.append(f"worker {wid} (pid {p.pid}) did not exit within {self.patience:.0f}s of the "
                                           "drain:\n" + p.log_path.read_text(errors="replace")[-3000:])
                    return

    def resume_all(self) -> None:
        for procs in self.procs.values():
            for p in procs:
                if p.poll() is None:
                    self._signal(p, signal.SIGCONT)
        # A frozen worker resumed past its lease exits on its own (fenced); live ones finish as watchmen do.
        self.wait_all()

    def clean_worker(self, wid: str) -> None:
        self.start(wid)
        self.wait_all()

    def outcomes(self) -> list[str]:
        out = []
        for wid, procs in self.procs.items():
            for p in procs:
                text = p.log_path.read_text(errors="replace")
                self.log_lines += [f"{wid}: {line}" for line in text.splitlines() if " WARNING " in line or " ERROR " in line]
                self.did[f"worker exit {p.returncode}"] += 1
                if "Traceback" in text:
                    out.append(f"a traceback in the log of worker {wid} (pid {p.pid}):\n{text[-3000:]}")
                # 4: the ledger was lost for a whole lease; 5: it was started while the ledger was corrupt; SIGTERM
                # before Python installed the handler (still starting, nothing logged yet) ends it as the signal does
                early_term = p.returncode == -signal.SIGTERM and not text.strip()
                if p.returncode not in (None, 0, 4, 5, 11, 143, -signal.SIGKILL) and not early_term:
                    out.append(f"worker {wid} (pid {p.pid}) exited {p.returncode}:\n{text[-2000:]}")
        return out

    def abandon(self) -> None:
        for procs in self.procs.values():
            for p in procs:
                if p.poll() is None:
                    self._signal(p, signal.SIGCONT)
                    self._signal(p, signal.SIGKILL)
        from helpers import kill_leftovers

        kill_leftovers(str(self.study.root) + os.sep)  # dorado children of workers killed alone
