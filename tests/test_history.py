"""Random histories of a study must end exactly once (issue 11; the harness is tests/history.py).

- `test_history[<seed>]`: LEDGERBC_TEST_HISTORIES in-process histories (default 120): fixed seeds, so CI is
  repeatable, plus LEDGERBC_TEST_RANDOM_HISTORIES new ones per run (default 3, their seeds in the test ids and
  printed); all but the first QUICK (10) are marked slow.
- `test_history_with_processes[<seed>]`: LEDGERBC_TEST_SUBPROCESS_HISTORIES histories (default 2) with real
  `ledgerbc run` workers, real signals and real time.
- `test_seeded_history`: replays LEDGERBC_TEST_HISTORY_SEED (mode LEDGERBC_TEST_HISTORY_MODE, default inprocess; step
  kinds left out: LEDGERBC_TEST_HISTORY_WITHOUT, as the soak's --without); with LEDGERBC_TEST_HISTORY_MINIMISE=1 it also
  prints a shorter history failing the same way.
- The named tests below are histories found by the soak (bench/history_soak.py), written down step by step.

A failing history prints its seed, its steps, the violations and the ledger's rows.

Bounded for CI (which runs the slow ones too): here (2 cores, shared) `pytest -m "not slow" tests/test_history.py`
runs 10 histories and the named ones in ~8 s; `-m slow` the other 110 in-process histories and the 2 with processes
in ~3 minutes. The 500-history soak (bench/history_soak.py) took 27 minutes.
"""
from __future__ import annotations

import os
import random

import pytest

import history
from history import Plan, Step

N = int(os.environ.get("LEDGERBC_TEST_HISTORIES", "120"))
N_RANDOM = int(os.environ.get("LEDGERBC_TEST_RANDOM_HISTORIES", "3"))
N_PROCESSES = int(os.environ.get("LEDGERBC_TEST_SUBPROCESS_HISTORIES", "2"))
RANDOM_SEEDS = [random.SystemRandom().randrange(10**6, 10**9) for _ in range(N_RANDOM)]
if RANDOM_SEEDS:
    print(f"test_history: random seeds this run: {RANDOM_SEEDS}")


def _assert_ok(outcome: history.Outcome) -> None:
    if not outcome.ok:
        pytest.fail("\n" + outcome.report(), pytrace=False)


QUICK = 10  # histories in the quick run (`-m "not slow"`); the rest are marked slow, as CI runs them all


@pytest.mark.parametrize("seed", [pytest.param(seed, marks=[pytest.mark.slow] if n >= QUICK else [])
                                  for n, seed in enumerate(list(range(1, max(0, N - N_RANDOM) + 1)) + RANDOM_SEEDS)])
def test_history(seed, tmp_path):
    _assert_ok(history.run_seed(seed, tmp_path / "study"))


# Seeds past the first 500 that failed on code the 500-history soak passed: `recover` on a full disk, where a
# reclaim writes a missing summary (564: a traceback instead of the one-line storage-full error); a folder linked
# after a rebuild by a worker of the lost ledger, kept forever (510; minimised in the named test below); a worker
# frozen while its dorado ran on a full disk, where the in-process stand-in raised the write error into the
# harness instead of ending with status 1 as the executable does (2604: the harness crashed).
@pytest.mark.parametrize("seed", [510, 564, 2604])
def test_history_found_past_the_soak(seed, tmp_path):
    _assert_ok(history.run_seed(seed, tmp_path / "study"))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [10_001 + n for n in range(N_PROCESSES)])
def test_history_with_processes(seed, tmp_path):
    _assert_ok(history.run_seed(seed, tmp_path / "study", mode="subprocess"))


def test_seeded_history(tmp_path):
    """Replays LEDGERBC_TEST_HISTORY_SEED; without it seed 501 (past the soak's 1-500, none of the fixed
    ones above), so the replay path itself always runs."""
    outcome = history.run_seed(int(os.environ.get("LEDGERBC_TEST_HISTORY_SEED", "501")), tmp_path / "study",
                               os.environ.get("LEDGERBC_TEST_HISTORY_MODE", "inprocess"),
                               without=tuple(filter(None, os.environ.get("LEDGERBC_TEST_HISTORY_WITHOUT", "").split(","))))
    if not outcome.ok and os.environ.get("LEDGERBC_TEST_HISTORY_MINIMISE") == "1":
        print("minimised:\n" + history.minimise(outcome.plan, tmp_path / "minimise").describe())
    _assert_ok(outcome)


# -- histories found by the soak, step by step ------------------------------------------------------------------
def plan(steps, mode="inprocess", **config) -> Plan:
    base = dict(barcoded=False, emit="fastq", batch_files=1, min_qscore=0.0, max_attempts=3, tmpfs=False, at_init=0)
    return Plan(0, mode, {**base, **config}, [Step(op, tuple(args)) for op, *args in steps])


def publish(worker: str, stages: int = 8) -> list:
    """Steps that take a worker through one claim to its publication (a stage per step)."""
    return [("step", worker, "finish")] * stages


def test_a_pod5_moved_after_its_publication_is_not_basecalled_again_after_a_rebuild(tmp_path):
    """`mv run1/x.pod5 run2/x.pod5` after x was published, then the ledger is lost: the rebuild finds x's
    outputs under run1/ but no run1/x.pod5, and run2/x.pod5 (the same pod5) as new: its reads are published twice."""
    steps = [("add", "a01", "run1/pod5/x_1.pod5"), ("init",), ("start", "w1"), *publish("w1"),
             ("move", 0, "run2/pod5/x_1.pod5"), ("lose-ledger", "delete")]
    _assert_ok(history.run_plan(plan(steps), tmp_path / "study"))


def test_a_pod5_moved_twice_before_it_is_basecalled_is_published_once_and_verifies(tmp_path):
    """`mv a/x b/x`, scan, `mv b/x c/x`, scan: c/x is the original; a/x and b/x are gone (a/x still names b/x,
    gone itself). Its reads must be published once, and verify must accept the chain of moves."""
    steps = [("add", "a00", "run1/x_1.pod5"), ("init",), ("move", 0, "run2/x_1.pod5"), ("scan",),
             ("move", 0, "run3/x_1.pod5"), ("scan",)]
    _assert_ok(history.run_plan(plan(steps), tmp_path / "study"))


@pytest.mark.skipif(not history.tmpfs_possible(), reason="needs root to mount a small tmpfs as OUTPUT_DIR")
def test_a_full_disk_met_while_linking_a_batch_leaves_no_half_made_folder(tmp_path):
    """The disk fills between a claim and its ASSIGNED folder: the worker exits 11 (its ledger write fails too,
    so the batch expires) and the hidden `.ASSIGNED_<batch>_<worker>.tmp-*` folder must not stay forever."""
    steps = [("add", "a01", "run1/x_1.pod5"), ("init",), ("start", "w1"), ("step", "w1", "go"), ("step", "w1", "go"),
             ("fill-disk", 0), ("step", "w1", "go")]
    _assert_ok(history.run_plan(plan(steps, tmpfs=True), tmp_path / "study"))


def test_a_file_retried_half_written_then_moved_does_not_wait_forever(tmp_path):
    """Copied in place and caught half-written by init's scan (failed at admission), `retry` makes it waiting; then
    it is moved away (and completed there, where it is basecalled). Its old path must not stay waiting forever:
    `finalize` refuses while any file waits."""
    steps = [("add-partial", "a01", "run1/x_1.pod5"), ("init",), ("retry",), ("move", 0, "run2/x_1.pod5"),
             ("complete", 0)]
    _assert_ok(history.run_plan(plan(steps), tmp_path / "study"))


def test_a_copy_moved_away_after_its_claimed_original_vanished_names_the_new_original(tmp_path):
    """x moved while claimed (its batch fails it; the new path is recorded as its duplicate), then moved again
    before the next scan: the old original is gone with no copy on disk, so its duplicate is gone too, and
    both must name the newest path, the original now (verify: never a duplicate or gone of a gone path)."""
    steps = [("add", "a14", "run2/pod5/x_4.pod5"), ("add", "a16", "run2/pod5/x_24.pod5"), ("init",),
             ("move", 1, "run2/pod5/MOVE_43.pod5"), ("start", "w1", 20), *publish("w1", 2), ("scan",),
             ("move", 1, "élan/with space/MOVE_18.pod5")]
    _assert_ok(history.run_plan(plan(steps), tmp_path / "study"))


def test_outputs_of_a_publication_cut_short_do_not_outlive_a_rebuild_when_the_pod5_moved(tmp_path):
    """A worker killed between the renames of a barcoded publication (some barcode outputs of x in place, not
    its summary, the done marker), then x is moved and the ledger lost: the rebuild must remove x's half
    publication, as a reclaim would, or x's reads are out twice once its new path is published."""
    steps = [("add", "s1", "run1/pod5/more/x_9.pod5"), ("add", "a11", "run1/pod5/x_11.pod5"), ("init",),
             ("start", "w1", 20), ("step", "w1", "lease-beat"), ("step", "w1", "ledger-beat"),
             ("kill-in-publish", "w1", 3), ("move", 1, "élan/with space/MOVE_33.pod5"), ("lose-ledger", "delete")]
    _assert_ok(history.run_plan(plan(steps, barcoded=True, batch_files=2), tmp_path / "study"))


def test_a_folder_linked_after_a_rebuild_by_a_worker_of_the_lost_ledger_is_cleaned(tmp_path):
    """w4 claims batch 1, the ledger is lost and rebuilt before w4 links its folder (nothing to adopt), then w4
    links ASSIGNED_1_w4 and runs dorado, and dies. Batch 1 is unknown to the new ledger, whose ids already
    passed 1: nobody can publish it, so the janitor must remove its folder and its staging (dorado's BAM,
    gigabytes on a real run), not keep them forever as a folder a rebuild might adopt (soak seed 510)."""
    steps = [("add", "a09", "run1/pod5/more/x_19.pod5"), ("init",), ("add", "a13", "run1/pod5/x_6.pod5"), ("scan",),
             ("start", "w1", 90), ("start", "w4"), ("step", "w4", "finish"), ("step", "w4", "finish"),
             *publish("w1", 3), ("lose-ledger", "delete"), ("step", "w4", "finish"), ("kill", "w4")]
    _assert_ok(history.run_plan(plan(steps, batch_files=3, at_init=1), tmp_path / "study"))
