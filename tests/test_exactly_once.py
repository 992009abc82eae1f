"""The scenarios of issue 11 that broke "every read exactly once", each through the CLI where a user meets
it (DESIGN §4: Identity, Publish, Rebuild, Copies): a rebuild renumbering rows under a live worker, a rebuild
re-electing the original of two copies, a rebuild given another INPUT_DIR, a publication failing midway,
an original moved before it was basecalled, a file linked from two ASSIGNED folders, `recover` racing a
claim, `recover --force` during a run, renames made durable in order, fencing tokens after a rebuild.
Every finished run ends with `verify --deep` (check_exactly_once does it).
"""
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from ledgerbc import claim, janitor, models
from ledgerbc.db import Ledger
from ledgerbc.models import Batch
from ledgerbc.testkit.synth import write_pod5
from helpers import assert_verified, check_exactly_once, basecallers_of, make_study, pod5_reads


pytestmark = pytest.mark.usefixtures("no_stray_processes")


def running(ledger_path) -> dict[int, list[str]]:
    """{running batch id: its claimed files}."""
    def txn(conn):
        out = {b: [] for b in conn.execute(sa.select(Batch.id).where(Batch.state == models.RUNNING)).scalars()}
        for rel, b in conn.execute(sa.select(models.Pod5File.rel_path, models.Pod5File.batch_id)
                                   .where(models.Pod5File.state == models.CLAIMED)):
            out.setdefault(b, []).append(rel)
        return out
    return Ledger(ledger_path).transact(txn)


def wait_mid_batch(study, worker, worker_id):
    deadline = time.monotonic() + 60
    while not (assigned := list((study.output / "work").glob(f"ASSIGNED_*_{worker_id}"))) or not basecallers_of(worker.pid):
        assert time.monotonic() < deadline and worker.poll() is None, study.worker_log(worker_id)
        time.sleep(0.1)
    return assigned[0]


# -- 1. a rebuild renumbers the rows under a live worker ------------------------------------------------------
@pytest.mark.slow
def test_a_worker_mid_batch_across_a_rebuild_that_renumbers_rows_publishes_exactly_its_own_files(tmp_path):
    """Files arrive after init in an order other than sorted order; the rebuild rescans in sorted order and
    gives every file another row id. The live worker must still mark exactly its own files done: not the
    files that took its old row ids (without outputs), and not a file dorado failed on."""
    def first(root):
        for i in (1, 2, 3):
            write_pod5(root / "b" / f"run_{i}.pod5", 4, seed=i)

    study = make_study(tmp_path, 0, 3, lease="30s", prepare=first, delay=4, fail_match="run_2")
    for i in (10, 2, 3):  # later, and sorted before b/: after the rebuild they hold the low row ids
        write_pod5(study.input / "a" / f"late_{i}.pod5", 4, seed=10 + i)
    assert study.cli("scan").returncode == 0
    worker = study.start_worker("alive")
    folder = wait_mid_batch(study, worker, "alive")
    batch_id = int(folder.name.split("_")[1])
    linked = sorted(Path(os.path.realpath(link)).relative_to(study.input.resolve()).as_posix()
                    for link in folder.iterdir() if link.is_symlink())
    assert linked == ["b/run_1.pod5", "b/run_2.pod5", "b/run_3.pod5"]

    study.ledger_path.unlink()  # lost mid-batch, rebuilt from the files on disk
    rebuilt = study.cli("recover", "--rebuild", "--input", study.input, "--output", study.output)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert f"batch {batch_id} of alive: 3 files assigned, running again" in rebuilt.stdout
    ids = {r.rel_path: r.id for r in study.ledger.transact(lambda c: c.execute(sa.select(models.Pod5File)).all())}
    assert ids["a/late_10.pod5"] < ids["b/run_1.pod5"], "the rebuild did not renumber: the test proves nothing"

    assert worker.wait(timeout=180) == 0, study.worker_log("alive")
    log = study.worker_log("alive")
    assert f"batch {batch_id}: done" in log and "Traceback" not in log, log
    state = study.files()
    assert state["b/run_2.pod5"][0] == models.FAILED, "the file dorado failed on was not failed"
    assert {rel: s for rel, (s, _b) in state.items() if rel != "b/run_2.pod5"} == {
        rel: models.DONE for rel in state if rel != "b/run_2.pod5"}
    assert state["b/run_1.pod5"][1] == state["b/run_3.pod5"][1] == batch_id
    assert all(state[f"a/late_{i}.pod5"][1] != batch_id for i in (10, 2, 3))
    expected = pod5_reads(study.input)
    del expected["b/run_2.pod5"]
    check_exactly_once(expected, study.output)


# -- 2. a rebuild re-elects the original of two copies --------------------------------------------------------
def test_a_rebuild_keeps_the_published_copy_the_original(tmp_path):
    study = make_study(tmp_path, 0, 2, prepare=lambda root: [write_pod5(root / "b" / f"x{i}.pod5", 5, seed=i) for i in (1, 2)])
    assert study.cli("run", "--worker-id", "first").returncode == 0
    (study.input / "a").mkdir()
    shutil.copy(study.input / "b" / "x1.pod5", study.input / "a" / "x1.pod5")  # a copy arrives, sorted first
    scan = study.cli("scan")
    assert "1 duplicates" in scan.stdout, scan.stdout
    published = study.outputs()

    study.ledger_path.unlink()
    rebuilt = study.cli("recover", "--rebuild", "--input", study.input, "--output", study.output)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "3 pod5 files found, 2 already published" in rebuilt.stdout
    state = study.files()
    assert (state["a/x1.pod5"][0], state["b/x1.pod5"][0]) == (models.DUPLICATE, models.DONE)
    assert study.status()["duplicates"] == [{"path": "a/x1.pod5", "same_as": "b/x1.pod5"}]
    assert study.cli("run", "--worker-id", "again").returncode == 0
    assert study.outputs() == published, "something was published again"
    expected = pod5_reads(study.input)
    del expected["a/x1.pod5"]  # its reads are published once, as b/x1.pod5's
    check_exactly_once(expected, study.output)


# -- 3. a rebuild given another INPUT_DIR ---------------------------------------------------------------------
def test_a_rebuild_refuses_an_input_other_than_the_recorded_one_unless_forced(tmp_path):
    """Given the run folder instead of its pod5/ subfolder, every relative path would change and everything
    would be basecalled again."""
    def nested(root):
        for i in (1, 2):
            write_pod5(root / "pod5" / f"r{i}.pod5", 3, seed=i)

    study = make_study(tmp_path, 0, 2, prepare=nested)
    # The study's INPUT_DIR is in/pod5 (what the facility's sequencer wrote); init it that way.
    shutil.rmtree(study.output)
    done = study.cli("init", study.input / "pod5", study.output, "--batch-files", 2)
    assert done.returncode == 0, done.stderr
    assert study.cli("run", "--worker-id", "w").returncode == 0
    before = study.ledger_path.read_bytes()

    refused = study.cli("recover", "--rebuild", "--input", study.input, "--output", study.output)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    lines = refused.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in refused.stderr, refused.stderr
    assert str(study.input.resolve()) in lines[0] and str((study.input / "pod5").resolve()) in lines[0]
    assert "--force" in lines[0]
    assert study.ledger_path.read_bytes() == before, "the refused rebuild touched the ledger"

    right = study.cli("recover", "--rebuild", "--input", study.input / "pod5", "--output", study.output)
    assert right.returncode == 0, right.stderr
    assert "2 pod5 files found, 2 already published" in right.stdout
    forced = study.cli("recover", "--rebuild", "--input", study.input, "--output", study.output, "--force")
    assert forced.returncode == 0, forced.stderr
    assert f"INPUT_DIR is now {study.input.resolve()} (--force" in forced.stdout


# -- 4. a publication that fails midway leaves no output in place ---------------------------------------------
FAILING_RENAME = """
import os
_real, _moves = os.replace, []


def _replace(src, dst, **kw):  # the second rename of a publication (staging -> OUTPUT_DIR) fails
    # (a call into a folder not made yet fails on its own and is tried again once the folder exists)
    if "staging" in str(src).split(os.sep) and "staging" not in str(dst).split(os.sep) and os.path.isdir(os.path.dirname(dst)):
        _moves.append(dst)
        if len(_moves) == 2:
            raise OSError(5, "Input/output error (test)", str(dst))
    return _real(src, dst, **kw)


os.replace = _replace
"""


def test_a_rename_failing_midway_leaves_no_output_of_the_failed_files(tmp_path):
    study = make_study(tmp_path, 3, 3, init_args=("--max-attempts", "1"))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAILING_RENAME)
    env = study.env(PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    first = study.cli("run", "--worker-id", "w", "--max-batches", "1", env=env)
    assert first.returncode == 0, first.stderr
    state = study.files()
    assert models.FAILED in {s for s, _b in state.values()} and models.DONE not in {s for s, _b in state.values()}, state
    left = [p for kind in ("pass", "fail", "summary") for p in (study.output / kind).rglob("*") if p.is_file()]
    assert not left, f"outputs stayed in place after the publication failed: {left}"
    assert_verified(study.ledger_path)
    assert study.cli("retry", "--all-failed").returncode == 0
    assert study.cli("run", "--worker-id", "again").returncode == 0
    check_exactly_once(pod5_reads(study.input), study.output)


# -- 5. an original moved before it is basecalled ---------------------------------------------------------------
def test_an_original_moved_before_it_is_basecalled_is_basecalled_under_its_new_path(tmp_path):
    def incoming(root):
        for name in ("x", "y", "z", "w"):
            write_pod5(root / "incoming" / f"{name}.pod5", 4, seed=ord(name))

    study = make_study(tmp_path, 0, 2, prepare=incoming)
    (study.input / "final").mkdir()
    os.rename(study.input / "incoming" / "x.pod5", study.input / "final" / "x.pod5")  # moved
    shutil.copy(study.input / "incoming" / "y.pod5", study.input / "final" / "y.pod5")  # copied...
    scan = study.cli("scan")
    assert "1 duplicates" in scan.stdout and "1 gone from INPUT_DIR before" in scan.stdout, scan.stdout
    os.unlink(study.input / "incoming" / "y.pod5")  # ...then the original removed
    shutil.move(study.input / "incoming" / "z.pod5", tmp_path / "z.pod5")  # gone, no copy in INPUT_DIR
    scan = study.cli("scan")
    assert scan.returncode == 0 and "2 gone from INPUT_DIR before they were basecalled (1 replaced by a copy)" in scan.stdout, scan.stdout

    report = study.status()
    assert report["files"]["gone"] == 3 and report["files"]["pending"] == 3
    assert sorted((g["path"], g["replaced_by"]) for g in report["gone"]) == [
        ("incoming/x.pod5", "final/x.pod5"), ("incoming/y.pod5", "final/y.pod5"), ("incoming/z.pod5", None)]
    text = study.cli("status").stdout
    assert "incoming/z.pod5  (no copy left: its reads will not be basecalled)" in text
    assert "incoming/x.pod5  -> basecalled as its copy final/x.pod5" in text

    run = study.cli("run", "--worker-id", "w")
    assert run.returncode == 0, run.stderr
    assert study.cli("retry", "--all-failed").returncode == 0  # nothing failed; retry still works
    state = study.files()
    assert {rel: s for rel, (s, _b) in state.items()} == {
        "incoming/x.pod5": models.GONE, "incoming/y.pod5": models.GONE, "incoming/z.pod5": models.GONE,
        "final/x.pod5": models.DONE, "final/y.pod5": models.DONE, "incoming/w.pod5": models.DONE}
    check_exactly_once(pod5_reads(study.input), study.output)

    # Published, then moved away: it stays done, the new path is its duplicate, and --deep reads it there.
    (study.input / "archive").mkdir()
    os.rename(study.input / "final" / "x.pod5", study.input / "archive" / "x.pod5")
    assert study.cli("scan").returncode == 0
    state = study.files()
    assert (state["final/x.pod5"][0], state["archive/x.pod5"][0]) == (models.DONE, models.DUPLICATE)
    assert_verified(study.ledger_path)
    # A gone path that comes back is admitted again.
    shutil.move(tmp_path / "z.pod5", study.input / "incoming" / "z.pod5")
    assert study.cli("scan").returncode == 0
    assert study.files()["incoming/z.pod5"][0] == models.PENDING
    assert study.cli("run", "--worker-id", "w2").returncode == 0
    assert study.files()["incoming/z.pod5"][0] == models.DONE


# -- 6. one file linked from two ASSIGNED folders ----------------------------------------------------------------
def assigned_folder(study, batch_id, worker_id, rels, token=None):
    """An ASSIGNED folder as a worker makes it: relative links and the manifest."""
    folder = study.output / "work" / f"ASSIGNED_{batch_id}_{worker_id}"
    folder.mkdir(parents=True)
    files = []
    for i, rel in enumerate(rels):
        name = f"{i:05d}_{Path(rel).name}"
        os.symlink(os.path.relpath(study.input / rel, folder), folder / name)
        fid = next(r.file_identifier for r in study.ledger.transact(
            lambda c: c.execute(sa.select(models.Pod5File).where(models.Pod5File.rel_path == rel)).all()))
        files.append({"link": name, "rel": rel, "file_identifier": fid})
    (folder / ".batch.json").write_text(json.dumps({"batch_id": batch_id, "token": token, "worker_id": worker_id,
                                                    "files": files}))
    return folder


def test_a_file_linked_from_two_assigned_folders_belongs_to_the_newest_claim_only(tmp_path):
    study = make_study(tmp_path, 3, 3, lease="3s")
    ledger = study.ledger
    settings = ledger.read_settings()
    zombie = claim.claim_batch(ledger, "zombie", settings)
    rels = [f.rel for f in zombie.files]
    old = assigned_folder(study, zombie.batch_id, "zombie", rels, getattr(zombie, "token", None))
    janitor.reclaim(ledger, settings, zombie.batch_id, janitor.JanitorReport(), reason="test")  # its folder stays
    live = claim.claim_batch(ledger, "live", settings)
    assert sorted(f.rel for f in live.files) == sorted(rels) and live.batch_id > zombie.batch_id
    assigned_folder(study, live.batch_id, "live", rels, getattr(live, "token", None))

    study.ledger_path.write_bytes(os.urandom(8192))
    rebuilt = study.cli("recover", "--rebuild", "--input", study.input, "--output", study.output)
    assert rebuilt.returncode == 0, rebuilt.stderr
    for rel in rels:
        assert f"ASSIGNED_{zombie.batch_id}_zombie: {rel} is also in batch {live.batch_id}, the newer claim: left to it" \
            in rebuilt.stdout, rebuilt.stdout
    assert {b: sorted(r) for b, r in running(study.ledger_path).items()} == {live.batch_id: sorted(rels)}
    assert not old.exists()
    assert_verified(study.ledger_path)
    # Nobody runs batch `live`: it expires, the watchman reclaims it, the work is done once.
    done = study.cli("run", "--worker-id", "rescuer")
    assert done.returncode == 0, done.stderr
    check_exactly_once(pod5_reads(study.input), study.output)


# -- found by reading: recover racing a claim --------------------------------------------------------------------
class ClaimingLedger(Ledger):
    """A ledger handle that lets a worker claim the next batch just before reconcile's write transaction."""

    def __init__(self, path, settings):
        super().__init__(path)
        self.settings = settings
        self.claimed = None

    def transact(self, fn, *args, **kwargs):
        if self.claimed is None and getattr(fn, "__qualname__", "").startswith("reconcile.") and fn.__name__ == "txn":
            self.claimed = claim.claim_batch(Ledger(self.path), "quick", self.settings)
        return super().transact(fn, *args, **kwargs)


def test_recover_never_marks_a_file_claimed_meanwhile_done(tmp_path):
    study = make_study(tmp_path, 2, 1)
    assert study.cli("run", "--worker-id", "w", "--max-batches", "1").returncode == 0
    (pending,) = [rel for rel, (s, _b) in study.files().items() if s == models.PENDING]
    (done,) = [rel for rel, (s, _b) in study.files().items() if s == models.DONE]
    # An output for the pending file turns up (restored from a backup of an earlier attempt).
    target = study.output / "pass" / (pending[: -len(".pod5")] + ".fastq")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(study.output / "pass" / (done[: -len(".pod5")] + ".fastq"), target)
    ledger = ClaimingLedger(study.ledger_path, study.ledger.read_settings())
    janitor.recover(ledger)
    assert ledger.claimed is not None and [f.rel for f in ledger.claimed.files] == [pending]
    assert study.files()[pending] == (models.CLAIMED, ledger.claimed.batch_id), "a just-claimed file was marked done"


# -- found by reading: recover --force during a run ---------------------------------------------------------------
@pytest.mark.slow
def test_recover_force_during_a_run_fails_no_good_file(tmp_path):
    study = make_study(tmp_path, 3, 3, lease="20s", delay=4, init_args=("--max-attempts", "1"))
    worker = study.start_worker("alive")
    folder = wait_mid_batch(study, worker, "alive")
    batch_id = int(folder.name.split("_")[1])
    forced = study.cli("recover", "--force")
    assert forced.returncode == 0, forced.stderr
    assert f"left batch {batch_id} of alive running: its lease was renewed" in forced.stdout, forced.stdout
    assert "reclaimed" not in forced.stdout
    assert worker.wait(timeout=120) == 0, study.worker_log("alive")
    log = study.worker_log("alive")
    assert "fenced" not in log and "Traceback" not in log, log
    state = study.files()
    assert {s for s, _b in state.values()} == {models.DONE}
    assert batch_id in {b for _s, b in state.values()}, "the batch left running was not the one that published"
    check_exactly_once(pod5_reads(study.input), study.output)


# -- found by reading: renames made durable in order ---------------------------------------------------------------
def test_a_rename_into_an_existing_folder_looks_at_nothing_else_and_a_rerun_is_idempotent(tmp_path, monkeypatch):
    """Under the lock, on a network filesystem every `stat` is a round trip: a publication renames into a
    folder that exists without looking at the staged file or the folder first; a new folder is still made
    (durably) before the rename into it; a second run of the same publication finds its moves done; a staged
    file that is gone with no output in place is an error."""
    from ledgerbc import publish

    out, staging = tmp_path / "out", tmp_path / "staging"
    (out / "pass" / "old").mkdir(parents=True)
    moves = []
    for rel in ("old/a", "old/b", "new/deeper/c"):
        staged = staging / rel.replace("/", "_")
        staged.parent.mkdir(parents=True, exist_ok=True)
        staged.write_text(rel)
        moves.append(publish.Move(staged, out / "pass" / rel))
    looked = []
    real_stat = Path.stat
    monkeypatch.setattr(Path, "stat", lambda self, **kw: (looked.append(self), real_stat(self, **kw))[1])
    publish.Installer([moves[:2]]).run()
    assert looked == [], f"looked at {looked} before renaming into an existing folder"
    publish.Installer([moves[2:]]).run()  # its folder does not exist yet: made, then the rename
    assert [p.read_text() for p in (m.final for m in moves)] == ["old/a", "old/b", "new/deeper/c"]
    again = publish.Installer([moves])
    again.run()  # every staged file is gone and every output in place: nothing to do, no error
    assert again._done == []
    monkeypatch.undo()
    missing = publish.Move(staging / "gone", out / "pass" / "old" / "gone")
    with pytest.raises(FileNotFoundError, match="staged output is missing"):
        publish.Installer([[missing]]).run()


def test_publication_steps_are_durable_in_order_and_new_folders_before_renames_into_them(tmp_path, monkeypatch):
    """After a power loss, a later step (pass/, the summary) must never be on disk without an earlier one
    (fail/), nor a file in a folder whose own entry was not made durable."""
    from ledgerbc import publish

    events = []
    real_replace, real_mkdir = os.replace, Path.mkdir
    monkeypatch.setattr(publish, "fsync_dir", lambda p: events.append(("fsync", Path(p))))
    monkeypatch.setattr(publish.os, "replace", lambda a, b: (real_replace(a, b), events.append(("rename", Path(b))))[0])
    monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: (real_mkdir(self, *a, **k), events.append(("mkdir", self)))[0])
    steps = []
    for kind in ("fail", "pass", "summary"):
        step = []
        for name in ("a/x", "b/c/y"):
            staged = tmp_path / "staging" / kind / name
            staged.parent.mkdir(parents=True, exist_ok=True)
            staged.write_text(kind)
            step.append(publish.Move(staged, tmp_path / "out" / kind / name))
        steps.append(step)
    events.clear()
    publish.Installer(steps).run()
    out = tmp_path / "out"

    def kind(path):
        return path.relative_to(out).parts[0] if path != out and out in path.parents else None

    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    for i in renames:
        folder = events[i][1].parent
        made = [j for j, e in enumerate(events) if e == ("mkdir", folder)]
        synced = [j for j, e in enumerate(events) if e == ("fsync", folder.parent)]
        assert made and synced and made[0] < synced[0] < i, f"{folder} not durable before the rename into it"
    for earlier, later in (("fail", "pass"), ("pass", "summary")):
        last = max(i for i in renames if kind(events[i][1]) == earlier)
        first_later = min(i for i in renames if kind(events[i][1]) == later)
        for i in renames:
            if kind(events[i][1]) == earlier:  # the folder of every earlier rename is synced before `later` starts
                folder = events[i][1].parent
                assert any(e == ("fsync", folder) and last < j < first_later for j, e in enumerate(events)), (
                    f"{later}/ renamed before {earlier}/ was durable ({folder})")


# -- found by reading: fencing tokens after a rebuild that saw no trace of a claim -----------------------------------
def test_a_claim_the_rebuild_never_saw_is_fenced_even_when_its_batch_id_is_handed_out_again(tmp_path):
    """The old ledger is unreadable and a claim left no trace on disk yet (its worker froze before making its
    folder): the rebuilt ledger may hand its batch id out again. The fencing token is the id and a random
    nonce, so the zombie can neither heartbeat nor publish over the new claim, even with the same worker id."""
    study = make_study(tmp_path, 2, 1)
    ledger = study.ledger
    settings = ledger.read_settings()
    zombie = claim.claim_batch(ledger, "job_7@node", settings)
    study.ledger_path.write_bytes(os.urandom(8192))
    rebuilt = study.cli("recover", "--rebuild", "--input", study.input, "--output", study.output)
    assert rebuilt.returncode == 0, rebuilt.stderr
    ledger = study.ledger
    fresh = claim.claim_batch(ledger, "job_7@node", settings)  # a requeued task: same worker id
    assert fresh.batch_id == zombie.batch_id and fresh.token != zombie.token
    with pytest.raises(claim.NotOwner):
        claim.heartbeat(ledger, zombie)
    with pytest.raises(claim.NotOwner):
        claim.publish(ledger, zombie, [claim.FileResult(f.rel, True, reads_pass=1) for f in zombie.files], None, 3)
    claim.heartbeat(ledger, fresh)
    assert {s for s, _b in study.files().values()} <= {models.CLAIMED, models.PENDING}


def test_a_rebuild_removes_half_made_claims_and_adopts_an_older_versions_folder_by_its_links(tmp_path):
    """A hidden `.ASSIGNED_*.tmp-*` folder is a claim whose folder was never completed: removed, its files
    pending. A folder without a manifest (made by an older ledgerbc) is adopted by its links, with no
    fencing nonce: only a worker of that older version (which has none either) can still publish it."""
    study = make_study(tmp_path, 4, 2)
    rels = sorted(study.files())
    half = study.output / "work" / ".ASSIGNED_7_w1.tmp-0123abcd"
    half.mkdir(parents=True)
    os.symlink(os.path.relpath(study.input / rels[0], half), half / f"00000_{Path(rels[0]).name}")
    old = study.output / "work" / "ASSIGNED_5_w0"
    old.mkdir()
    for i, rel in enumerate(rels[2:]):
        os.symlink(os.path.relpath(study.input / rel, old), old / f"{i:05d}_{Path(rel).name}")
    study.ledger_path.unlink()
    rebuilt = study.cli("recover", "--rebuild", "--input", study.input, "--output", study.output)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert ".ASSIGNED_7_w1.tmp-0123abcd: a claim whose folder was never completed, removed" in rebuilt.stdout
    assert ("batch 5 of w0: 2 files assigned, running again (no manifest: an older version's folder, adopted by "
            "its links without a fencing nonce)") in rebuilt.stdout
    assert "new batch ids start above 7" in rebuilt.stdout
    assert not half.exists()
    assert {b: sorted(r) for b, r in running(study.ledger_path).items()} == {5: rels[2:]}
    assert study.ledger.transact(lambda c: c.execute(sa.select(Batch.token).where(Batch.id == 5)).scalar()) is None
    assert {rel: s for rel, (s, _b) in study.files().items() if rel in rels[:2]} == {r: models.PENDING for r in rels[:2]}


def test_publishing_one_input_never_removes_the_output_of_another_in_a_nested_folder_of_the_same_name(tmp_path):
    """Unbarcoded, `pass/a/a/x.fastq` is the output of input `a/a/x.pod5`, not an old per-barcode output of
    `a/x.pod5` (folder `a` under pass/ is no barcode): publishing `a/x.pod5` must leave it alone."""
    study = make_study(tmp_path, 0, 1, prepare=lambda root: write_pod5(root / "a" / "a" / "x.pod5", 4, seed=1))
    study.cli("run", "--worker-id", "first", check=True)
    write_pod5(study.input / "a" / "x.pod5", 4, seed=2)
    study.cli("scan", check=True)
    study.cli("run", "--worker-id", "second", check=True)
    assert (study.output / "pass" / "a" / "a" / "x.fastq").is_file(), "the other input's published output was removed"
    check_exactly_once(pod5_reads(study.input), study.output)
