"""Chaos: six `ledgerbc run` workers drain 400 pod5 files while a killer SIGKILLs workers (and sometimes
only their dorado), starts replacements, and once deletes the ledger and rebuilds it mid-run.

Short leases make a killed worker's batch expire within seconds, so the survivors' janitors (or the
watchman) reclaim it. At the end every read of every pod5 must be published exactly once, the work
tree must be empty and the ledger must show nothing pending or claimed.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from ledgerbc import claim, models, roles
from ledgerbc.db import Ledger
from ledgerbc.models import Batch
from ledgerbc.testkit.synth import make_dataset
from ledgerbc.testkit import install_fake_dorado
from helpers import (
    KIT, ledgerbc_argv, wait_for, check_exactly_once, basecallers_of, kill_group,
    kill_leftovers, pids_mentioning, pod5_reads,
)

pytestmark = pytest.mark.slow

N_FILES = 400
N_WORKERS = 6
MIN_KILLS = 10  # worker SIGKILLs the test insists on
MAX_KILLS = 14  # then the killer stops and lets the survivors finish
REBUILD_AT_KILL = 5  # after this many worker kills the ledger is deleted and rebuilt
KILLER_BUDGET = 150.0  # seconds the killer may run
TOTAL_BUDGET = 235.0  # seconds for the whole run, killer included
RUN_OPTIONS = ["--batch-files", "5", "--lease", "6s", "--heartbeat", "1s", "--clock-skew", "1s",
               "--min-qscore", "10",  # about a third of the reads go to fail/: both halves must survive kills
               # attempts are spent by every kill; the test is about exactly-once, not about giving up
               "--max-attempts", "50"]


class Fleet:
    """The worker processes of the test, each in its own session (so its group can be killed)."""

    def __init__(self, tmp_path: Path, env: dict):
        self.env = env
        self.logs = tmp_path / "worker-logs"
        self.logs.mkdir()
        self.procs: dict[str, subprocess.Popen] = {}
        self.started = 0

    def start(self, tag: str = "w") -> str:
        self.started += 1
        worker_id = f"{tag}{self.started:03d}"
        log = open(self.logs / f"{worker_id}.log", "wb")
        self.procs[worker_id] = subprocess.Popen(
            ledgerbc_argv() + ["run", "--ledger", self.env["LEDGERBC_LEDGER"], "--worker-id", worker_id],
            stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=self.env, start_new_session=True,
        )
        log.close()
        return worker_id

    def alive(self) -> list[str]:
        return [w for w, p in self.procs.items() if p.poll() is None]

    def dorado_of(self, worker_id: str) -> list[int]:
        return basecallers_of(self.procs[worker_id].pid)

    def codes(self) -> dict[str, int | None]:
        return {w: p.poll() for w, p in self.procs.items()}

    def tail(self, n_workers: int = 4, lines: int = 15) -> str:
        out = []
        for log in sorted(self.logs.iterdir())[-n_workers:]:
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                kill_group(p.pid)
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def cli(env, *args, timeout=120):
    return subprocess.run(ledgerbc_argv() + list(args), env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def chaos_env(tmp_path):
    input_dir, output_dir = tmp_path / "in", tmp_path / "out"
    make_dataset(input_dir, N_FILES, seed=20240611)
    bin_dir = tmp_path / "bin"
    install_fake_dorado(bin_dir)
    env = dict(os.environ)  # conftest.py has removed the developer's LEDGERBC_*
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
        LEDGERBC_LEDGER=str(output_dir / "ledgerbc.db"),
        LEDGERBC_SIM_DELAY="1.0",  # dorado's start-up, shortened
        LEDGERBC_SIM_SECONDS_PER_MB="1.0",  # a batch of 5 small files: about 1-3 s in all
    )
    fleet = Fleet(tmp_path, env)
    yield input_dir, output_dir, env, fleet
    fleet.kill_all()
    # Killed workers leave their dorado running in its own session: no stray process may outlive the test.
    # Twice: a dorado forked just before its worker died has its own argv (naming tmp_path) only once it exec'd.
    kill_leftovers(str(tmp_path))
    time.sleep(0.5)
    kill_leftovers(str(tmp_path))


@pytest.mark.parametrize("kit", [None, KIT], ids=["flat", "barcoded"])
def test_workers_killed_and_ledger_lost_mid_run_still_basecall_every_read_exactly_once(chaos_env, kit):
    input_dir, output_dir, env, fleet = chaos_env
    rng = random.Random(7)
    expected = pod5_reads(input_dir)
    assert len(expected) == N_FILES

    init = cli(env, "init", str(input_dir), str(output_dir), *RUN_OPTIONS, *(["--kit-name", kit] if kit else []))
    assert init.returncode == 0, init.stderr
    started = time.monotonic()
    for _ in range(N_WORKERS):
        fleet.start()

    kills, dorado_kills, replaced_lost, rebuilds, handled = 0, 0, 0, [], set()
    killer_end = started + KILLER_BUDGET
    while kills < MAX_KILLS and time.monotonic() < killer_end:
        time.sleep(rng.uniform(1.0, 2.5))
        # A worker that gave up on a missing ledger (exit 4) is replaced like a killed one.
        for w, code in fleet.codes().items():
            if code == 4 and w not in handled:
                handled.add(w)
                fleet.start("lost")
                replaced_lost += 1
        alive = fleet.alive()
        if not alive:
            break
        busy = [w for w in alive if fleet.dorado_of(w)]
        if busy and rng.random() < 0.3:
            # Kill only dorado (its own process group): the worker sees it die and fails the batch.
            victim = rng.choice(busy)
            for pid in fleet.dorado_of(victim):
                kill_group(pid)
            dorado_kills += 1
            continue
        # Mostly mid-dorado; sometimes anywhere (claiming, splitting, publishing, watching).
        victim = rng.choice(busy if busy and rng.random() < 0.7 else alive)
        kill_group(fleet.procs[victim].pid)
        fleet.procs[victim].wait(timeout=10)
        kills += 1
        fleet.start()
        if kills == REBUILD_AT_KILL:
            # The ledger is lost mid-run; an operator rebuilds it from the files on disk while workers run.
            (output_dir / "ledgerbc.db").unlink()
            rebuild = cli(env, "recover", "--rebuild", "--input", str(input_dir), "--output", str(output_dir))
            assert rebuild.returncode == 0, rebuild.stderr
            rebuilds.append(rebuild.stdout)
            print("chaos: ledger deleted and rebuilt:\n  " + "\n  ".join(rebuild.stdout.splitlines()))

    print(f"chaos: {kills} workers SIGKILLed, {dorado_kills} dorado SIGKILLed, "
          f"{replaced_lost} workers replaced after losing the ledger, {fleet.started} workers started, "
          f"killer ran {time.monotonic() - started:.0f}s")
    assert kills >= MIN_KILLS, f"the run ended before the killer could kill {MIN_KILLS} workers ({kills})"
    assert rebuilds, "the ledger was never deleted and rebuilt"

    # The survivors (and the replacements) finish on their own: reclaim, redo, drain, exit.
    deadline = started + TOTAL_BUDGET
    while fleet.alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not fleet.alive(), f"workers still running after {TOTAL_BUDGET:.0f}s:\n{fleet.tail()}"
    codes = fleet.codes()
    print(f"chaos: all workers exited after {time.monotonic() - started:.0f}s; exit codes {sorted(set(codes.values()))}")
    # SIGKILLed (-9), finished (0), or gave up on the missing ledger after a whole lease (4, replaced above).
    odd = {w: c for w, c in codes.items() if c not in (-9, 0, 4)}
    assert not odd, f"workers ended badly: {odd}\n" + "\n".join(
        (fleet.logs / f"{w}.log").read_text(errors="replace")[-2000:] for w in odd)

    status = cli(env, "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    files = report["files"]
    assert report["running_batches"] == [], f"batches left running:\n{fleet.tail()}"
    assert (files["pending"], files["claimed"], files["failed"]) == (0, 0, 0), files
    assert files["done"] == N_FILES

    counts = check_exactly_once(expected, output_dir)
    print(f"chaos: {counts['reads']} reads ({counts['split_reads']} split by dorado) in {counts['files']} "
          "files, each published exactly once")

    work = output_dir / "work"
    leftovers = sorted(p.name for p in work.iterdir() if p.name != "staging")
    assert leftovers == [], f"work folders left behind: {leftovers}"
    assert list((work / "staging").iterdir()) == [], "staging not cleaned"
    assert not list(output_dir.rglob(".*.tmp-*")), "temporary output files left behind"
    assert report["reads"]["out"] == counts["reads"] + counts["split_reads"]
    if kit:  # the per-barcode yields (kept by triggers on `outputs`) add up to the records written
        assert report["barcoding"]["reads"] == report["reads"]["out"]
    # Workers alive at the rebuild kept their batch (same id, adopted from their ASSIGNED folder) and
    # published it into the rebuilt ledger; the batches of dead ones were reclaimed.
    adopted = {int(m.group(1)): m.group(2) for m in re.finditer(r"^batch (\d+) of (\S+): ", rebuilds[0], re.M)}
    ledger = Ledger(output_dir / "ledgerbc.db")
    ended = dict(ledger.transact(lambda c: c.execute(
        sa.select(Batch.id, Batch.state).where(Batch.id.in_(list(adopted)))).all()))
    print(f"chaos: batches adopted by the rebuild and how they ended: {ended}")
    assert models.BATCH_DONE in ended.values(), "no worker kept its batch across the rebuild"
    assert models.RUNNING not in ended.values()


def test_teardown_helper_kills_a_process_left_in_its_own_session(tmp_path):
    """What the chaos fixture relies on: an orphan (like the dorado of a SIGKILLed worker, own session)
    is found by the test folder in its command line and killed."""
    marker = str(tmp_path / "orphan-marker")
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", marker], start_new_session=True)
    try:
        wait_for(lambda: orphan.pid in pids_mentioning(marker), 30, "the child to exec (its argv is ours)", 0.05)
        assert orphan.pid in kill_leftovers(marker)
        assert orphan.wait(timeout=5) == -signal.SIGKILL
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


@pytest.mark.parametrize("kit", [None, KIT], ids=["flat", "barcoded"])
def test_a_dead_watchman_does_not_strand_a_dead_workers_batch(tmp_path, kit):
    """The tail of a run: one worker died mid-batch, the watchman died too (its role not expired yet).
    A worker that finds nothing pending must not leave on the word of a dead watchman: it stays,
    takes the role over once it expires, reclaims the dead batch, basecalls it and only then exits."""
    input_dir, output_dir = tmp_path / "in", tmp_path / "out"
    make_dataset(input_dir, 4, seed=5, hostile_names=False, size_spread=False)
    bin_dir = tmp_path / "bin"
    install_fake_dorado(bin_dir)
    env = dict(os.environ)  # conftest.py has removed the developer's LEDGERBC_*
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               LEDGERBC_LEDGER=str(output_dir / "ledgerbc.db"))
    init = cli(env, "init", str(input_dir), str(output_dir), "--batch-files", "4", "--lease", "8s",
               "--heartbeat", "1s", "--clock-skew", "1s", *(["--kit-name", kit] if kit else []))
    assert init.returncode == 0, init.stderr
    ledger = Ledger(output_dir / "ledgerbc.db")
    settings = ledger.read_settings()
    claim.register_worker(ledger, "dead-worker", "node", 1, None)
    dead = []
    while (batch := claim.claim_batch(ledger, "dead-worker", settings)) is not None:
        dead.append(batch)
    assert sum(len(b.files) for b in dead) == 4
    # The watchman died 3 s ago: its role (ttl lease + skew = 9 s) has not expired yet.
    three_seconds_ago = Ledger(ledger.path, clock=lambda: time.time() - 3)
    assert roles.take_role(three_seconds_ago, roles.WATCHMAN, "dead-watchman", settings.lease + settings.clock_skew)

    try:
        proc = subprocess.run(ledgerbc_argv() + ["run", "--worker-id", "last"], env=env, capture_output=True, text=True,
                              timeout=90)
    finally:
        kill_leftovers(str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(cli(env, "status", "--json").stdout)
    assert report["running_batches"] == [], proc.stderr[-3000:]
    assert report["files"]["done"] == 4
    check_exactly_once(pod5_reads(input_dir), output_dir)
