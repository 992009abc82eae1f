"""Fencing under freezes (DESIGN §4 Lease, Publish): a worker frozen with SIGSTOP (with or without its
dorado) past lease + clock skew, resumed after other workers redid its batch, publishes nothing and
says so in one log line, never a traceback; `recover --force` during a run takes only the frozen worker's
batch (no attempt counted) and leaves the live one. Each run ends exactly once (`verify --deep`).
"""
import os
import re
import signal
import time

import pytest
import sqlalchemy as sa

from ledgerbc import models
from ledgerbc.models import Batch, Event
from helpers import check_exactly_once, basecallers_of, make_study, pod5_reads

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_stray_processes")]

LEASE = "4s"  # + 1 s clock skew: a batch silent for 5 s expires


def wait_for(predicate, what: str, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def batch_of(study, worker_id) -> int:
    folder = wait_for(lambda: list((study.output / "work").glob(f"ASSIGNED_*_{worker_id}")), f"{worker_id}'s batch")
    return int(folder[0].name.split("_")[1])


def batch_state(study, batch_id) -> str:
    return study.ledger.transact(lambda c: c.execute(sa.select(Batch.state).where(Batch.id == batch_id)).scalar_one())


def events_of(study, kind, batch_id):
    return study.ledger.transact(lambda c: c.execute(
        sa.select(Event.worker_id).where(Event.kind == kind, Event.batch_id == batch_id)).scalars().all())


def fenced_once(study, worker_id, batch_id):
    log = study.worker_log(worker_id)
    assert "Traceback" not in log, log
    said = [line for line in log.splitlines() if "fenced" in line]
    assert said == [line for line in log.splitlines() if f"batch {batch_id} was taken back" in line], log
    assert len(said) == 1, log


@pytest.mark.parametrize("frozen", ["worker", "worker-and-dorado"])
def test_a_worker_frozen_past_its_lease_and_resumed_after_its_batch_was_redone_publishes_nothing(tmp_path, frozen):
    study = make_study(tmp_path, 6, 3, lease=LEASE, delay=2)
    zombie = study.start_worker("zombie")
    batch_id = batch_of(study, "zombie")
    dorado = wait_for(lambda: basecallers_of(zombie.pid), "the zombie's dorado")
    stopped = [zombie.pid] + (dorado if frozen == "worker-and-dorado" else [])
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        helper = study.start_worker("helper")  # drains the rest, reclaims the silent batch, redoes it, leaves
        assert helper.wait(timeout=120) == 0, study.worker_log("helper")
    finally:
        for pid in reversed(stopped):  # dorado first: the worker finds it running (or finished), as after a real freeze
            os.kill(pid, signal.SIGCONT)
    assert events_of(study, "batch-reclaimed", batch_id) and batch_state(study, batch_id) == models.RECLAIMED
    before = study.outputs()
    assert zombie.wait(timeout=120) == 0, study.worker_log("zombie")
    fenced_once(study, "zombie", batch_id)
    assert study.outputs() == before, "the resumed zombie published"
    assert batch_state(study, batch_id) == models.RECLAIMED, "the zombie's batch ended otherwise"
    assert {s for s, _b in study.files().values()} == {models.DONE}
    check_exactly_once(pod5_reads(study.input), study.output)


def test_recover_force_mid_run_takes_the_frozen_batch_without_an_attempt_and_leaves_the_live_one(tmp_path):
    study = make_study(tmp_path, 6, 3, lease="30s", delay=3, init_args=("--max-attempts", "1"))
    zombie = study.start_worker("zombie")
    frozen_batch = batch_of(study, "zombie")
    wait_for(lambda: basecallers_of(zombie.pid), "the zombie's dorado")
    os.kill(zombie.pid, signal.SIGSTOP)
    try:
        helper = study.start_worker("helper")
        batch_of(study, "helper")
        wait_for(lambda: basecallers_of(helper.pid), "the helper's dorado")
        time.sleep(4)  # the frozen worker's lease goes stale (its lease file is no longer renewed)
        forced = study.cli("recover", "--force")
    finally:
        os.kill(zombie.pid, signal.SIGCONT)
    assert forced.returncode == 0, forced.stderr
    lines = forced.stdout.splitlines()
    assert f"reclaimed batch {frozen_batch}" in lines, forced.stdout
    assert any(re.match(r"left batch \d+ of helper running: its lease was renewed \d+s ago", line) for line in lines), forced.stdout
    assert zombie.wait(timeout=120) == 0, study.worker_log("zombie")
    assert helper.wait(timeout=120) == 0, study.worker_log("helper")
    fenced_once(study, "zombie", frozen_batch)
    assert "Traceback" not in study.worker_log("helper") and "fenced" not in study.worker_log("helper")
    # --force counted no attempt: with --max-attempts 1 a counted one would have failed good files.
    assert {s for s, _b in study.files().values()} == {models.DONE}
    check_exactly_once(pod5_reads(study.input), study.output)
