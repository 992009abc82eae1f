"""16 processes claim from one 2000-file ledger until it is empty: every file is claimed exactly once and
no batch has two owners. On local disk always; on a GlusterFS volume (half the processes through a
second mount of it) when LEDGERBC_TEST_GLUSTER_A and LEDGERBC_TEST_GLUSTER_B are set (ci/cluster-up.sh).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
import traceback
import uuid
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa

from ledgerbc import claim, db, models
from ledgerbc.settings import Settings

N_PROCS = 16
N_FILES = 2000
BATCH_FILES = 16  # ~130 contended claims: each commit fsyncs, so more would only slow the test
START_TIMEOUT = 120.0
RACE_TIMEOUT = 300.0


def gluster_mounts() -> tuple[Path, Path]:
    a, b = os.environ.get("LEDGERBC_TEST_GLUSTER_A"), os.environ.get("LEDGERBC_TEST_GLUSTER_B")
    if not (a and b):
        reason = ("LEDGERBC_TEST_GLUSTER_A and LEDGERBC_TEST_GLUSTER_B are not set (two mount points of one "
                  "GlusterFS volume; ci/cluster-up.sh sets them)")
        if os.environ.get("LEDGERBC_REQUIRE_INTEGRATION") == "1":
            pytest.fail(f"integration required but {reason}")
        pytest.skip(reason)
    for m in (a, b):
        if not os.path.ismount(m):
            pytest.fail(f"{m} (from LEDGERBC_TEST_GLUSTER_*) is not a mount point")
    return Path(a), Path(b)


def _claimer(ledger_path: str, worker_id: str, barrier, out_path: str) -> None:
    """One racing process: wait for the start, claim until nothing is pending."""
    try:
        ledger = db.Ledger(ledger_path)
        settings = ledger.read_settings()
        barrier.wait(START_TIMEOUT)
        claims = []
        while (c := claim.claim_batch(ledger, worker_id, settings)) is not None:
            claims.append([c.batch_id, [f.id for f in c.files]])
        Path(out_path).write_text(json.dumps({"ok": True, "claims": claims}))
    except BaseException:  # noqa: BLE001 - report to the parent, whatever happened
        Path(out_path).write_text(json.dumps({"ok": False, "error": traceback.format_exc()}))
        raise


@pytest.fixture(params=["local", "gluster"])
def ledger_paths(request, tmp_path):
    """(path through which process i reaches the ledger, for i in range(N_PROCS)), created with N_FILES rows."""
    if request.param == "local":
        folder = tmp_path / "shared"
        paths = [folder / "ledgerbc.db"] * N_PROCS
    else:
        a, b = gluster_mounts()
        sub = f"ledgerbc-race-{uuid.uuid4().hex[:12]}"
        folder = a / sub
        request.addfinalizer(lambda: shutil.rmtree(folder, ignore_errors=True))
        paths = [(a if i % 2 == 0 else b) / sub / "ledgerbc.db" for i in range(N_PROCS)]
    folder.mkdir(parents=True)
    settings = Settings(input_dir=str(tmp_path / "input"), output_dir=str(folder), batch_files=BATCH_FILES,
                        batch_bytes=None)
    db.create_ledger_file(paths[0], settings)
    ledger = db.Ledger(paths[0])
    rows = [dict(rel_path=f"run/f{i:05d}.pod5", size=1000 + i, mtime_ns=0, read_count=1, file_identifier=f"id{i}",
                 state=models.PENDING, attempts=0, added_at=0.0) for i in range(N_FILES)]
    ledger.transact(lambda conn: conn.execute(sa.insert(models.Pod5File), rows))
    deadline = time.monotonic() + 30
    while not all(p.exists() for p in paths):  # the second mount must see the ledger before the race
        if time.monotonic() > deadline:
            pytest.fail(f"{paths[1]} never appeared through the second mount")
        time.sleep(0.1)
    return paths


def test_every_file_is_claimed_exactly_once(ledger_paths, tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(N_PROCS + 1)
    outs = [tmp_path / f"claims-{i}.json" for i in range(N_PROCS)]
    workers = [f"w{i:02d}@{'a' if ledger_paths[i] == ledger_paths[0] else 'b'}" for i in range(N_PROCS)]
    procs = [ctx.Process(target=_claimer, args=(str(ledger_paths[i]), workers[i], barrier, str(outs[i])))
             for i in range(N_PROCS)]
    for p in procs:
        p.start()
    try:
        barrier.wait(START_TIMEOUT)  # every process is set up: go
        deadline = time.monotonic() + RACE_TIMEOUT
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        assert not [p.pid for p in procs if p.is_alive()], "claimers still running after the timeout"
    finally:
        for p in procs:  # only the processes this test started
            if p.is_alive():
                p.kill()
                p.join(10)

    results = [json.loads(out.read_text()) for out in outs]
    failed = [r["error"] for r in results if not r["ok"]]
    assert not failed, failed[0]
    assert [p.exitcode for p in procs] == [0] * N_PROCS

    owner_of_batch: dict[int, str] = {}
    claimed = Counter()
    file_batch = {}
    for worker, result in zip(workers, results):
        for batch_id, file_ids in result["claims"]:
            assert batch_id not in owner_of_batch, f"batch {batch_id} went to {owner_of_batch[batch_id]} and {worker}"
            owner_of_batch[batch_id] = worker
            assert 1 <= len(file_ids) <= BATCH_FILES
            claimed.update(file_ids)
            file_batch.update({f: batch_id for f in file_ids})
    assert set(claimed) == set(range(1, N_FILES + 1)), "some files were never claimed"
    assert max(claimed.values()) == 1, f"claimed twice: {[f for f, n in claimed.items() if n > 1][:10]}"
    assert sum(1 for r in results if r["claims"]) > 1, "no race: one process took everything"

    # The ledger agrees with what the processes were told.
    ledger = db.Ledger(ledger_paths[-1])
    batches = ledger.transact(lambda c: c.execute(sa.select(models.Batch.id, models.Batch.worker_id,
                                                            models.Batch.state, models.Batch.n_files)).all())
    assert {b.id: b.worker_id for b in batches} == owner_of_batch
    assert all(b.state == models.RUNNING for b in batches)
    files = ledger.transact(lambda c: c.execute(sa.select(models.Pod5File.id, models.Pod5File.state,
                                                          models.Pod5File.batch_id)).all())
    assert all(f.state == models.CLAIMED for f in files)
    assert {f.id: f.batch_id for f in files} == file_batch
    assert dict(Counter(file_batch.values())) == {b.id: b.n_files for b in batches}
    assert claim.claim_batch(ledger, "late", ledger.read_settings()) is None
    integrity = ledger.transact(lambda c: c.exec_driver_sql("PRAGMA integrity_check").scalar())
    assert integrity == "ok"
