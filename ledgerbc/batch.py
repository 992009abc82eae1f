"""One batch, from its claim to its publication (what a worker does between two claims).

    prepare    work/ASSIGNED_<batch>_<worker>/: links to the batch's pod5 files and a manifest, made aside
               and renamed into place (a rebuild sees a complete folder or none)
    basecall   dorado on that folder, its BAM into staging, heartbeating (lease file; ledger every half lease)
    split      dorado's BAM -> one output per pod5 (and barcode) in staging, read accounting per file
    publish    under the lock: ownership and identity checks, then the renames, then the ledger (claim.publish)

`BatchRun.execute()` returns how the batch ended ('done', 'failed', 'fenced' or 'stopped'); it never raises
for a bad batch. It raises `StorageFull` (after giving the batch back) when OUTPUT_DIR or the ledger is
full, and the ledger errors that make a worker wait or give up (`LEDGER_UNAVAILABLE`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import claim, dorado, lease, modelplan, pod5check, split
from .chemistry import chemistry_error
from .durable import fsync_dir, fsync_path, nearly_full, probe_space, remove_tree
from .errors import FULL_ERRNOS, LedgerCorrupt, LedgerError, LedgerNotFound, LockTimeout, NotOwner, StorageFull
from .layout import MANIFEST, Layout, link_name
from .publish import Installer, Move

log = logging.getLogger("ledgerbc.batch")

TICK = 1.0  # how often the worker looks at dorado, the stop flag and the clock
SIGNAL_GRACE = 2.0  # after dorado died of a signal: how long to wait for ours before failing the batch
LEDGER_UNAVAILABLE = (LedgerNotFound, LedgerCorrupt, LockTimeout)


def default_batch_timeout(n_bytes: int) -> float:
    """Generous: 30 min of start-up and slack plus 1 s per 2 MB (a GPU does >10 MB/s)."""
    return 1800.0 + n_bytes / 2e6


@dataclass
class Crew:
    """What every batch of one worker shares: the ledger, the study's settings, where things go, and the
    worker's own identity, dorado and stop flag. Built once by `run.Worker`."""

    ledger: object
    settings: object
    layout: Layout
    worker_id: str
    executable: str
    device: str | None
    env: dict | None
    janitor: object
    stop: object  # run.StopFlag
    patiently: object  # run.Worker.patiently: call a ledger function, waiting out a missing/locked ledger

    @property
    def gpus(self) -> str | None:
        return (self.env if self.env is not None else os.environ).get("CUDA_VISIBLE_DEVICES")


class BatchRun:
    """The life of one claimed batch in this worker."""

    def __init__(self, crew: Crew, batch: claim.Claim, more: bool):
        self.crew = crew
        self.batch = batch
        self.more = more  # claim the next batch in the publication's transaction
        self.next: claim.Claim | None = None  # that next batch, once claimed
        self.assigned = crew.layout.assigned(batch.batch_id, crew.worker_id)
        self.staging = crew.layout.staging(batch.batch_id, batch.token)
        self.beat = lease.Heartbeat(crew.ledger, crew.settings, batch)
        self.proc: dorado.DoradoProcess | None = None
        self.full_seen = False  # OUTPUT_DIR's filesystem was (nearly) full at some point while the batch ran

    # -- the whole batch ------------------------------------------------------------------------------
    def execute(self) -> str:
        b = self.batch
        try:
            outcome = self._outcome()
        except StorageFull as exc:
            raise self._storage_full(exc) from None
        except LEDGER_UNAVAILABLE:
            self._stop_dorado()  # dorado (own session) must not outlive the worker
            raise  # ASSIGNED stays: the batch expires (or a rebuild adopts it) and is redone
        self._stop_dorado()  # the batch ended on an error while dorado ran: it must not run on, orphaned
        if outcome == "stopped":
            self._release("worker stopped by signal")
        self.cleanup()
        if outcome == "fenced":  # one line, never a traceback: losing a batch is part of the protocol
            log.warning("batch %s was taken back from this worker (fenced): its output is discarded", b.batch_id)
        else:
            log.info("batch %s: %s", b.batch_id, outcome)
        return outcome

    def _outcome(self) -> str:
        """How the batch ended; raises StorageFull and LEDGER_UNAVAILABLE (execute handles them)."""
        try:
            try:
                return self._stages()
            except OSError as exc:
                if exc.errno in FULL_ERRNOS:
                    raise StorageFull(f"{exc.strerror}: {exc.filename}", folder=exc.filename) from None
                raise
        except (StorageFull, *LEDGER_UNAVAILABLE):
            raise
        except NotOwner:
            return "fenced"
        except LedgerError as exc:  # e.g. IllegalTransition: this batch is broken, the worker is not
            return self._fail(f"ledger refused this batch's update: {exc}")
        except Exception as exc:  # one bad batch must never kill the worker
            if not self._owned():
                return "fenced"  # e.g. its staging was cleaned after a reclaim: nothing to report
            probe_space(self.staging)  # a full disk makes odd errors (a truncated BAM): StorageFull, no attempt
            log.exception("batch %s failed", self.batch.batch_id)
            return self._fail(f"ledgerbc could not process the batch: {type(exc).__name__}: {exc}")

    def _stages(self) -> str:
        refused = modelplan.refusal(self.crew.settings, self.batch.chemistry)
        if refused is not None:
            # Admitted before the study's model could refuse it (scan refuses at admission): an explicit
            # model would basecall it silently with the wrong model. Fails the batch and the pending files
            # of its key at once, with no dorado call.
            return self._fail(refused, now_failed=True)
        links = self.prepare()
        self.beat.renew_lease()  # a sign of life from the start: `recover --force` leaves a batch that shows one
        ended = self.basecall()
        if ended != "exited":
            return ended
        failed = self._dorado_failure()
        if failed is not None:
            return self._fail(*failed)
        if not self._owned():
            return "fenced"  # reclaimed while dorado ran (e.g. the worker was frozen): do not even split
        split_result, results = self._heartbeating(lambda: self.split(links))
        return self.publish(links, split_result, results)

    # -- prepare -------------------------------------------------------------------------------------
    def prepare(self) -> dict[str, claim.ClaimedFile]:
        """The ASSIGNED folder: made under a hidden name, then renamed into place complete."""
        if self.assigned.is_dir():
            return self._links()
        tmp = self.crew.layout.half_made(self.batch.batch_id, self.crew.worker_id, self.batch.token)
        remove_tree(tmp)
        tmp.mkdir(parents=True)
        root = Path(self.crew.settings.input_dir)
        links = self._links()
        for name, f in links.items():
            # Relative, so the link resolves through whichever mount of the shared filesystem a reader
            # (dorado here, or a rebuild on another node) uses.
            os.symlink(os.path.relpath(root / f.rel, self.assigned), tmp / name)
        manifest = {
            "batch_id": self.batch.batch_id, "token": self.batch.token, "worker_id": self.crew.worker_id,
            "chemistry": self.batch.chemistry,
            "files": [{"link": name, "rel": f.rel, "file_identifier": f.file_identifier} for name, f in links.items()],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        fsync_path(tmp / MANIFEST)
        fsync_dir(tmp)
        os.replace(tmp, self.assigned)
        fsync_dir(self.assigned.parent)
        return links

    def _links(self) -> dict[str, claim.ClaimedFile]:
        return {link_name(i, f.rel): f for i, f in enumerate(self.batch.files)}

    # -- basecall ------------------------------------------------------------------------------------
    def basecall(self) -> str:
        """Run dorado, heartbeating; 'exited', 'stopped', 'fenced' or 'failed' (timeout)."""
        crew = self.crew
        settings = crew.settings
        argv = dorado.build_argv(settings, self.assigned, crew.device, crew.executable,
                                 modelplan.model_for(settings, self.batch.chemistry))
        self.proc = dorado.DoradoProcess(argv, self.staging / "calls.bam", crew.layout.log(self.batch.batch_id),
                                         env=crew.env)
        timeout = settings.batch_timeout or default_batch_timeout(self.batch.n_bytes)
        started = time.monotonic()
        next_beat = started + settings.heartbeat
        while True:
            ended = self.proc.poll(TICK) is not None
            self._watch_space()
            if ended:
                if self.proc.proc.returncode < 0 and not crew.stop.requested:
                    # dorado died of a signal: scancel and Slurm signal every process of the task, and
                    # dorado (no handler) may die before our own SIGTERM lands. Wait for it briefly.
                    crew.stop.nap(SIGNAL_GRACE)
                return "stopped" if crew.stop.requested else "exited"
            if crew.stop.requested:
                self._stop_dorado()
                return "stopped"
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + settings.heartbeat
                try:
                    self.beat.beat()
                except NotOwner:
                    self._stop_dorado()
                    return "fenced"
                except StorageFull:
                    raise  # the ledger cannot be written: give the batch back (or let it expire) and exit
                except LedgerError as exc:  # ledger briefly unreachable or being rebuilt: keep working
                    log.warning("heartbeat of batch %s failed: %s", self.batch.batch_id, exc)
                crew.patiently(crew.janitor.maybe_run)
            if now - started > timeout:
                self._stop_dorado()
                return self._fail(f"dorado timed out after {timeout:.0f}s (batch timeout)")

    def _dorado_failure(self) -> tuple[str, bool] | None:
        """(why dorado's run cannot be used, whether retrying cannot help), or None. dorado may exit 0 after
        skipping a file: that is found per file by the accounting, not here. A call dorado refused for the
        data's chemistry (no model for it, e.g. R9.4.1 since dorado 1.0) fails its files at once: every batch
        holds one chemistry, so another attempt would be refused the same way (DESIGN §4, §5)."""
        rc = self.proc.proc.returncode
        if rc == 0:
            return None
        errors = dorado.error_lines(self.proc.log_path)
        refused = chemistry_error(errors)
        if refused is not None:
            return (f"dorado refused the chemistry {self.batch.chemistry or 'unknown'}: {refused} "
                    f"(log {self.proc.log_path})"), True
        detail = f"; {errors[-1]}" if errors else ""
        return f"dorado exited with status {rc}{detail} (log {self.proc.log_path})", False

    # -- split -----------------------------------------------------------------------------------------
    def split(self, links) -> tuple[split.SplitResult, list[claim.FileResult]]:
        settings = self.crew.settings
        result = split.split_bam(
            self.proc.bam_path, {name: f.rel for name, f in links.items()}, self.staging,
            emit=settings.emit, min_qscore=settings.min_qscore, kit_name=settings.kit_name,
        )
        errors = dorado.error_lines(self.proc.log_path)
        results = [self._account(name, f, result.files[name], errors) for name, f in links.items()]
        if result.foreign or result.untagged:
            log.warning("batch %s: dorado returned %d reads of files not in the batch and %d without fn",
                        self.batch.batch_id, sum(result.foreign.values()), result.untagged)
        return result, results

    def _account(self, name, f: claim.ClaimedFile, out: split.FileOutput, errors: list[str]) -> claim.FileResult:
        """Reads in (pod5) against reads out (read id or pi parent) for one file."""
        try:
            ids_in = set(pod5check.read_ids(Path(self.crew.settings.input_dir) / f.rel))
        except Exception as exc:  # damaged or replaced since the scan: this file fails, not its batch-mates
            said = [e for e in errors if name in e]
            why = f"; {said[-1]}" if said else ""
            return claim.FileResult(f.rel, False, error=f"pod5 cannot be read any more ({type(exc).__name__}: {exc}){why}")
        extra = out.parent_ids - ids_in
        if extra:
            return claim.FileResult(f.rel, False, error=f"dorado returned {len(extra)} reads that are not in this pod5")
        if ids_in and not out.parent_ids:
            said = [e for e in errors if name in e]
            why = said[-1] if said else "no [error] line named it"
            return claim.FileResult(f.rel, False, error=f"dorado returned no reads for its {len(ids_in)} reads ({why})")
        return claim.FileResult(
            f.rel, True, reads_pass=out.reads_pass, reads_fail=out.reads_fail,
            reads_missing=len(ids_in - out.parent_ids), bases=out.bases, outputs=out.records(self.crew.layout.output),
        )

    def _heartbeating(self, fn):
        """Run `fn()` in a thread while heartbeating the batch; NotOwner if it was reclaimed meanwhile."""
        box = {}

        def target():
            try:
                box["result"] = fn()
            except BaseException as exc:  # handed to the caller's thread below
                box["error"] = exc

        thread = threading.Thread(target=target, name=f"split-{self.batch.batch_id}", daemon=True)
        thread.start()
        fenced = None
        next_beat = time.monotonic() + self.crew.settings.heartbeat
        while thread.is_alive():
            thread.join(TICK)
            self._watch_space()
            if thread.is_alive() and fenced is None and time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.crew.settings.heartbeat
                try:
                    self.beat.beat()
                except (NotOwner, StorageFull) as exc:
                    fenced = exc  # let the thread finish (it only writes to staging), then stop
                except LedgerError as exc:
                    log.warning("heartbeat of batch %s failed: %s", self.batch.batch_id, exc)
        if fenced is not None:
            raise fenced
        if "error" in box:
            raise box["error"]
        return box["result"]

    # -- publish --------------------------------------------------------------------------------------
    def publish(self, links, result: split.SplitResult, results: list[claim.FileResult]) -> str:
        crew = self.crew
        installer = installer_for(crew.layout, crew.settings.emit, result, {r.rel for r in results if r.ok}, links,
                                  crew.ledger.check_lock_trusted, barcoded=crew.settings.kit_name is not None)
        provenance = dict(model=",".join(result.models) or modelplan.model_for(crew.settings, self.batch.chemistry),
                          dorado_version=result.dorado_version, gpus=crew.gpus)
        self.next = crew.patiently(
            claim.publish, crew.ledger, self.batch, results, installer, crew.settings.max_attempts,
            crew.settings if self.more and not crew.stop.requested else None, provenance,
        )
        return "done"

    # -- endings --------------------------------------------------------------------------------------
    def _watch_space(self) -> None:
        """Remember a full disk while it lasts: once workers give their batches back and clean up, space
        comes back, and a probe made after dorado failed on the full disk would blame the files."""
        if not self.full_seen and nearly_full(self.staging):
            self.full_seen = True

    def _fail(self, error: str, now_failed: bool = False) -> str:
        # A full disk is not the files' fault: StorageFull instead (no attempt counted).
        if self.full_seen or (self.proc is not None and dorado.said_disk_full(self.proc.log_path)):
            raise StorageFull(f"the disk filled while batch {self.batch.batch_id} ran ({error})", folder=self.staging)
        probe_space(self.staging)
        try:
            self.crew.patiently(claim.fail_batch, self.crew.ledger, self.batch, error, self.crew.settings.max_attempts,
                                now_failed)
        except NotOwner:
            return "fenced"
        return "failed"

    def _release(self, reason: str) -> None:
        try:
            claim.release_batch(self.crew.ledger, self.batch, reason)
        except (NotOwner, LedgerError) as exc:
            log.warning("could not release batch %s: %s", self.batch.batch_id, exc)

    def _storage_full(self, exc: StorageFull) -> StorageFull:
        """OUTPUT_DIR or the ledger is full: stop dorado, give the batch back without counting an attempt (when
        the ledger itself cannot be written, its lease expires instead), clean up; the one-line error to exit
        with (code 11)."""
        self._stop_dorado()
        b = self.batch.batch_id
        given_back = not exc.ledger
        if given_back:
            try:
                claim.release_batch(self.crew.ledger, self.batch, "storage full")
            except StorageFull:
                given_back = False
            except LedgerError as err:  # fenced meanwhile, or the ledger unreachable: it expires
                log.debug("could not release batch %s: %s", b, err)
        self.cleanup()
        fate = (f"batch {b} given back" if given_back
                else f"batch {b} will be redone once its lease expires")
        if exc.ledger:
            return StorageFull(f"{exc} {fate[0].upper()}{fate[1:]}; nothing failed.", folder=exc.folder, ledger=True)
        folder = self._full_folder(exc.folder)
        return StorageFull(
            f"no space left on the filesystem of {folder} ({fate}; nothing failed). Free space (or raise the "
            "quota), then start the workers again.", folder=folder,
        )

    def _full_folder(self, where) -> Path:
        """The folder to name: OUTPUT_DIR when the full path is inside it (the user knows that one)."""
        output = self.crew.layout.output
        path = Path(where) if where else self.staging
        try:
            path.relative_to(output)
            return output
        except ValueError:
            return path if path.is_dir() else path.parent

    def _owned(self) -> bool:
        try:
            return claim.still_owned(self.crew.ledger, self.batch)
        except LedgerError:
            return True  # cannot tell: let the publication's own check decide

    def _stop_dorado(self) -> None:
        if self.proc is not None and self.proc.proc.poll() is None:
            self.proc.stop()

    def cleanup(self) -> None:
        lease.remove(self.crew.ledger.path, self.batch.batch_id)
        remove_tree(self.assigned)
        remove_tree(self.staging)


def installer_for(layout: Layout, emit: str, result: split.SplitResult, ok_rels: set[str], links,
                  check_lock=None, barcoded: bool | None = None) -> Installer:
    """The renames that publish the good files of a split: fail/ outputs, then pass/, then summaries; and
    the outputs an earlier, interrupted attempt left for those files that this one does not replace.

    Only a barcoded study (`barcoded`; by default: the split wrote per-barcode outputs) has `<barcode>`
    folders: unbarcoded, `pass/a/<rel>` is the output of the input `a/<rel>`, never a stale one of `<rel>`;
    and only an unbarcoded one has flat outputs: barcoded, `pass/a/<rel>` is barcode `a`'s output of `<rel>`,
    and `pass/<rel>` never one of this input."""
    steps = {kind: [] for kind in split.PUBLISH_ORDER}
    stale = []
    if barcoded is None:
        barcoded = any(w.barcode is not None for out in result.files.values() for w in out.written.values())
    barcodes = layout.barcode_dirs() if barcoded else ()
    for name, f in links.items():
        if f.rel not in ok_rels:
            continue
        out = result.files[name]
        for written in out.written.values():
            steps[written.kind].append(Move(written.staged, layout.output / written.path))
        mine = {layout.output / w.path for w in out.written.values()}
        stale += [p for p in layout.outputs_of(f.rel, emit, barcodes, flat=not barcoded) if p not in mine]
    return Installer([steps[kind] for kind in split.PUBLISH_ORDER], stale, check_lock)

