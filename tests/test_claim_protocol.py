"""The claim protocol's guarantees this round: one chemistry per batch, publication by identity (not row id),
fencing by (id, nonce), nothing renamed unless every check passed, nothing left in place by a transaction
that does not commit, no commit or rename after the lock may have been lost, a full ledger is StorageFull."""
from __future__ import annotations

import math
import time
from collections import Counter

import pytest
import sqlalchemy as sa

from ledgerbc import claim, db, errors, models
from ledgerbc.claim import FileResult
from ledgerbc.errors import IllegalTransition, LockMaybeLost, NotOwner, StorageFull
from ledgerbc.models import Batch, Pod5File
from ledgerbc.prepared import Prepared
from ledgerbc.publish import Installer, Move

KEYS = ["FLO-PRO114M|SQK-LSK114|5000", "FLO-MIN114|SQK-NBD114-24|5000", "FLO-PRO004RA|SQK-RNA004|4000"]


def files(ledger):
    return {r.rel_path: r for r in ledger.transact(lambda c: c.execute(sa.select(Pod5File)).all())}


def set_chemistry(ledger, keys):
    """Give row i the chemistry keys[i % len(keys)] (interleaved, as a facility folder mixes them)."""
    def txn(conn):
        ids = conn.execute(sa.select(Pod5File.id).order_by(Pod5File.id)).scalars().all()
        for i, file_id in enumerate(ids):
            conn.execute(sa.update(Pod5File).where(Pod5File.id == file_id).values(chemistry=keys[i % len(keys)]))
    ledger.transact(txn)


def ok(c):
    return [FileResult(f.rel, True, reads_pass=1, bases=10) for f in c.files]


# -- one chemistry per batch ----------------------------------------------------------------------------
@pytest.mark.parametrize("target", [{"batch_files": 4}, {"batch_bytes": 4000}])
def test_no_batch_mixes_chemistries_and_every_file_is_claimed_once(make_ledger, target):
    ledger, settings = make_ledger(90, **target)
    set_chemistry(ledger, KEYS)
    chem = {r.id: r.chemistry for r in files(ledger).values()}
    seen, batches = Counter(), []
    while (c := claim.claim_batch(ledger, "w", settings)) is not None:
        keys = {chem[f.id] for f in c.files}
        assert keys == {c.chemistry}, f"batch {c.batch_id} mixes {keys}"
        seen.update(f.rel for f in c.files)
        batches.append(c)
    assert len(seen) == 90 and set(seen.values()) == {1}
    stored = {b.id: b.chemistry for b in ledger.transact(lambda conn: conn.execute(sa.select(Batch)).all())}
    assert all(stored[c.batch_id] == c.chemistry for c in batches)
    # Full batches while the queue is long: the claim fills a batch from its chemistry's own rows.
    assert all(len(c.files) == 4 for c in batches[:10])


def test_the_oldest_pending_file_decides_the_chemistry_of_the_next_batch(make_ledger):
    ledger, settings = make_ledger(3000, batch_files=3)  # longer than the lookahead: not the tail
    set_chemistry(ledger, KEYS)
    first = claim.claim_batch(ledger, "w", settings)
    assert first.chemistry == KEYS[0] and [f.id for f in first.files] == [1, 4, 7]
    second = claim.claim_batch(ledger, "w", settings)
    assert second.chemistry == KEYS[1] and [f.id for f in second.files] == [2, 5, 8]


def test_files_of_unknown_chemistry_are_batched_among_themselves(make_ledger):
    ledger, settings = make_ledger(3000, batch_files=3)  # no tail shrinking: the queue is long
    set_chemistry(ledger, [None, KEYS[0]])
    got = [claim.claim_batch(ledger, "w", settings) for _ in range(2)]
    assert [c.chemistry for c in got] == [None, KEYS[0]]
    assert [[f.id for f in c.files] for c in got] == [[1, 3, 5], [2, 4, 6]]


def test_an_isolated_file_is_claimed_alone_whatever_its_chemistry(make_ledger):
    ledger, settings = make_ledger(3000, batch_files=6)
    set_chemistry(ledger, [KEYS[0]])
    ledger.transact(lambda conn: conn.execute(sa.update(Pod5File).where(Pod5File.id == 3).values(isolate=True)))
    got = [[f.id for f in claim.claim_batch(ledger, "w", settings).files] for _ in range(3)]
    assert got == [[1, 2], [3], [4, 5, 6, 7, 8, 9]]


# -- identity, not row ids ------------------------------------------------------------------------------
def renumber(ledger):
    """What a rebuild does under a live worker: the same files, new row ids (in another order)."""
    def txn(conn):
        rows = conn.execute(sa.select(Pod5File)).all()
        data = [dict(r._mapping) for r in rows]
        conn.execute(sa.delete(Pod5File))
        for i, d in enumerate(reversed(data)):
            d["id"] = 1000 + i
            conn.execute(sa.insert(Pod5File).values(**d))
    ledger.transact(txn)


def test_a_publication_after_the_rows_were_renumbered_marks_exactly_its_own_files(make_ledger):
    ledger, settings = make_ledger(3000, batch_files=3)
    c = claim.claim_batch(ledger, "w", settings)
    mine = {f.rel for f in c.files}
    assert len(mine) == 3
    renumber(ledger)
    results = ok(c)
    results[1] = FileResult(c.files[1].rel, False, error="dorado returned no reads")
    claim.publish(ledger, c, results, None, settings.max_attempts)
    rows = files(ledger)
    assert {rel for rel, r in rows.items() if r.state == models.DONE} == mine - {c.files[1].rel}
    assert rows[c.files[1].rel].state == models.PENDING and rows[c.files[1].rel].attempts == 1
    assert all(r.state == models.PENDING for rel, r in rows.items() if rel not in mine)


def test_a_file_replaced_by_another_pod5_under_the_same_path_is_not_published(make_ledger):
    ledger, settings = make_ledger(3000, batch_files=3)
    c = claim.claim_batch(ledger, "w", settings)
    victim = c.files[2].rel
    ledger.transact(lambda conn: conn.execute(
        sa.update(Pod5File).where(Pod5File.rel_path == victim).values(file_identifier="another-pod5")))
    installer = Installer([[]])
    ran = []
    installer.run = lambda: ran.append(1)  # noqa: E731
    with pytest.raises(IllegalTransition, match="another pod5 file"):
        claim.publish(ledger, c, ok(c), installer, settings.max_attempts)
    rows = files(ledger)
    assert ran == [] and all(rows[f.rel].state == models.CLAIMED for f in c.files)


def test_a_file_no_longer_in_the_batch_fences_the_publication_before_any_rename(make_ledger):
    ledger, settings = make_ledger(3000, batch_files=3)
    c = claim.claim_batch(ledger, "w", settings)
    ledger.transact(lambda conn: conn.execute(
        sa.update(Pod5File).where(Pod5File.rel_path == c.files[0].rel).values(state=models.PENDING, batch_id=None)))
    ran = []
    installer = Installer([[]])
    installer.run = lambda: ran.append(1)  # noqa: E731
    with pytest.raises(NotOwner):
        claim.publish(ledger, c, ok(c), installer, settings.max_attempts)
    assert ran == []


# -- a transaction that does not commit leaves no output in place -----------------------------------------
def staged_outputs(tmp_path, c):
    steps = []
    for kind in ("fail", "pass", "summary"):
        step = []
        for f in c.files:
            staged = tmp_path / "staging" / kind / (f.rel + ".out")
            staged.parent.mkdir(parents=True, exist_ok=True)
            staged.write_text(f"{kind} {f.rel}\n")
            step.append(Move(staged, tmp_path / "out" / kind / (f.rel + ".out")))
        steps.append(step)
    return steps


def test_a_failed_update_after_the_renames_moves_every_output_back(make_ledger, tmp_path):
    ledger, settings = make_ledger(3000, batch_files=3)
    c = claim.claim_batch(ledger, "w", settings)
    assert len(c.files) == 3
    steps = staged_outputs(tmp_path, c)
    # The ledger refuses the outputs rows (a trigger): the transaction fails after every rename was made.
    ledger.transact(lambda conn: conn.exec_driver_sql(
        "CREATE TRIGGER refuse BEFORE INSERT ON outputs BEGIN SELECT RAISE(ABORT, 'refused by test'); END"))
    results = [FileResult(f.rel, True, reads_pass=1, outputs=[claim.OutputRecord("pass", f"pass/{f.rel}.out", 1)])
               for f in c.files]
    with pytest.raises(errors.LedgerError, match="refused by test"):
        claim.publish(ledger, c, results, Installer(steps), settings.max_attempts)
    assert not list((tmp_path / "out").rglob("*.out")), "outputs stayed in place after a failed publication"
    assert all(m.staged.exists() for step in steps for m in step)
    assert all(files(ledger)[f.rel].state == models.CLAIMED for f in c.files)
    ledger.transact(lambda conn: conn.exec_driver_sql("DROP TRIGGER refuse"))
    claim.publish(ledger, c, results, Installer(steps), settings.max_attempts)  # the retry publishes all
    assert len(list((tmp_path / "out").rglob("*.out"))) == 9
    assert all(files(ledger)[f.rel].state == models.DONE for f in c.files)
    rows = ledger.transact(lambda conn: conn.execute(sa.select(models.Output)).all())
    assert sorted(r.path for r in rows) == sorted(f"pass/{f.rel}.out" for f in c.files)


def test_a_publication_that_held_the_lock_too_long_renames_nothing_more_and_commits_nothing(make_ledger, tmp_path):
    """A process frozen past the filesystem's lock timeout (SIGSTOP, a stalled node) may have lost its lock:
    it must not rename or commit. Here the lock is trusted for 0.2 s and a rename step takes longer."""
    ledger, settings = make_ledger(3000, batch_files=2)
    c = claim.claim_batch(ledger, "w", settings)
    steps = staged_outputs(tmp_path, c)
    ledger.lock_trust = 0.2
    slow = Installer(steps, check_lock=ledger.check_lock_trusted)
    real_run = Installer.run

    def frozen_run(self):
        time.sleep(0.3)
        real_run(self)

    slow.run = frozen_run.__get__(slow)
    with pytest.raises(LockMaybeLost):
        claim.publish(ledger, c, ok(c), slow, settings.max_attempts)
    assert not list((tmp_path / "out").rglob("*.out"))
    assert all(files(ledger)[f.rel].state == models.CLAIMED for f in c.files)
    # Without the freeze, the same publication goes through.
    claim.publish(ledger, c, ok(c), Installer(steps, check_lock=ledger.check_lock_trusted), settings.max_attempts)
    assert all(files(ledger)[f.rel].state == models.DONE for f in c.files)
    assert len(list((tmp_path / "out").rglob("*.out"))) == 6


def test_a_write_that_held_the_lock_too_long_is_rolled_back(make_ledger):
    ledger, _settings = make_ledger(1)
    ledger.lock_trust = 0.1

    def slow_write(conn):
        conn.execute(sa.update(Pod5File).values(attempts=Pod5File.attempts + 1))
        time.sleep(0.2)

    with pytest.raises(LockMaybeLost):
        ledger.transact(slow_write)
    assert files(ledger)["run/f000000.pod5"].attempts == 0
    # A slow read is not refused: it changed nothing.
    assert ledger.transact(lambda conn: (time.sleep(0.2), 7)[1]) == 7


def test_a_full_ledger_is_storage_full_exit_11(make_ledger):
    ledger, settings = make_ledger(1)
    with db.make_engine(ledger.path).connect() as conn:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar()

    def fill(conn):
        conn.exec_driver_sql(f"PRAGMA max_page_count = {pages}")
        conn.execute(sa.insert(models.Event), [{"ts": 0.0, "kind": "x", "message": "y" * 4000}] * 50)

    with pytest.raises(StorageFull) as caught:
        ledger.transact(fill)
    assert caught.value.exit_code == 11 and str(ledger.path.parent) in str(caught.value)
    assert claim.claim_batch(ledger, "w", settings) is not None  # the ledger is intact


# -- the prepared statements agree with the schema --------------------------------------------------------
def test_every_hot_path_statement_runs_on_a_real_ledger(make_ledger):
    ledger, _settings = make_ledger(1)

    def explain(conn):
        for stmt in claim.HOT_PATH:
            assert isinstance(stmt, Prepared)
            args = tuple(None for _ in stmt.names)
            conn.exec_driver_sql("EXPLAIN " + stmt.sql, args)  # fails on any unknown table or column
        return len(claim.HOT_PATH)

    assert ledger.transact(explain) >= 10


def test_the_claim_reads_lean_rows_named_after_the_models_from_the_queue_index_alone(make_ledger):
    """The claim's reads of up to LOOKAHEAD pending rows never look up the table (migration 0006): SQLite's
    own plan for every read and the count names the queue index as covering, on a ledger made as `init` makes one."""
    ledger, _settings = make_ledger(3)
    rows = ledger.transact(lambda conn: claim._PENDING.rows(conn, n=10))
    assert [r.id for r in rows] == [1, 2, 3]
    assert set(rows[0]._fields) == {"id", "size", "isolate", "chemistry"}
    assert all(c in Pod5File.__table__.columns for c in rows[0]._fields)

    def plans(conn):
        return [" ".join(str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + stmt.sql, args).fetchall())
                for stmt, args in ((claim._PENDING, claim._PENDING.args(dict(n=10))),
                                   (claim._PENDING_AFTER, claim._PENDING_AFTER.args(dict(after=1, n=10))),
                                   (claim._PENDING_OF_KEY, claim._PENDING_OF_KEY.args(dict(chemistry="k", n=10))),
                                   (claim._QUEUED, claim._QUEUED.args(dict(n=10))))]

    for plan in ledger.transact(plans):
        assert "USING COVERING INDEX ix_pod5_files_queue" in plan and "TEMP B-TREE" not in plan, plan


def _whole_horizon_batch(conn, settings, live):
    """The batch as claims chose it before FIRST_ROWS (issue 16): every row of the horizon read, then
    this chemistry's own rows when other chemistries were among them."""
    lookahead = claim.horizon(settings, live)
    pending = claim._PENDING.rows(conn, n=lookahead)
    if not pending:
        return None
    exhausted = len(pending) < lookahead
    chosen = claim.choose_batch(pending, settings.batch_files, settings.batch_bytes, live, exhausted)
    if not exhausted and not chosen[0].isolate and any(r.chemistry != chosen[0].chemistry for r in pending):
        same = claim._PENDING_OF_KEY.rows(conn, chemistry=chosen[0].chemistry, n=lookahead)
        chosen = claim.choose_batch(same, settings.batch_files, settings.batch_bytes, live, exhausted=False)
    return [r.id for r in chosen]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target", [dict(batch_bytes=20 * 1024**3), dict(batch_files=40)])
def test_a_claim_reading_its_first_rows_takes_the_batch_the_whole_horizon_gives(make_ledger, seed, target):
    """A queue longer than the horizon, random: three chemistries in runs (even seeds) or interleaved (odd),
    sizes from 5 MB to 8 GB (seeds 0 and 1 begin with small files, so 20 GiB batches need hundreds of them,
    more than FIRST_ROWS), isolated files.
    Claimed until nothing is pending (through the tail), every claim takes exactly the files, in order, that
    reading the whole horizon gave."""
    import random

    rng = random.Random(seed)
    n = claim.LOOKAHEAD + 700
    small = seed < 2  # the first half of the queue small files: a 20 GiB batch needs hundreds of them
    sizes = [int(rng.uniform(5e6, 60e6) if small and i < n // 2 else math.exp(rng.uniform(math.log(5e6), math.log(8e9))))
             for i in range(n)]
    ledger, settings = make_ledger(sizes=sizes, **target)
    keys, key = [], rng.choice(KEYS)
    for _ in range(n):
        if rng.random() < (0.3 if seed % 2 else 0.02):  # interleaved, or in runs as sequencing writes them
            key = rng.choice(KEYS)
        keys.append(key)
    isolate = {i + 1 for i in range(n) if rng.random() < 0.02}

    set_chemistry(ledger, keys)  # row i gets keys[i]
    ledger.transact(lambda conn: conn.execute(sa.update(Pod5File).where(Pod5File.id.in_(sorted(isolate))).values(isolate=True)))
    claim.register_worker(ledger, "w@h", "h", 1, None)
    claims = 0
    while True:
        expected = ledger.transact(lambda conn: _whole_horizon_batch(conn, settings, live=1))
        c = claim.claim_batch(ledger, "w@h", settings)
        if expected is None:
            assert c is None
            break
        assert [f.id for f in c.files] == expected, f"claim {claims}"
        claims += 1
    assert sum(1 for f in files(ledger).values() if f.state == models.CLAIMED) == n
    assert claims > 40


def test_tail_batches_shrink_over_all_chemistries_not_per_chemistry():
    from ledgerbc.claim import choose_batch
    from collections import namedtuple

    Row = namedtuple("Row", "id size attempts isolate chemistry")
    pending = [Row(i, 1000, 0, False, KEYS[i % 2]) for i in range(1, 101)]
    chosen = choose_batch(pending, 40, None, live_workers=4, exhausted=True)
    assert len(chosen) == math.ceil(100 / 8) and {r.chemistry for r in chosen} == {KEYS[1]}
