"""The status report: one read-only transaction, returned as a dict (`--json`) or a text table.

The JSON schema is documented in the README ("status --json") and versioned by its `schema` key.
"""

import os
import re
import stat
from pathlib import Path

import sqlalchemy as sa

from . import chemistry, follow, lease, modelplan, models
from .layout import UNCLASSIFIED, Layout
from .models import Batch, BarcodeYield, Pod5File, Worker
from .units import format_duration, format_size

SCHEMA = "ledgerbc.status/2"  # /2 added `barcoding`; every /1 field is kept
THROUGHPUT_WINDOW = 600.0  # seconds of recent publications the throughput is measured over
LIST_LIMIT = 50
# A running batch whose lease is alive but whose output (dorado's BAM in staging, its log) has not changed
# for this many heartbeat intervals is flagged `stalled`: a hung dorado, a stuck GPU, a dead filesystem
# mount. dorado writes records as it basecalls and logs as it goes, so 10 intervals (10 min at the default
# 60 s) without a byte is far past its start-up (~10-20 s) and a slow batch's pace.
STALL_HEARTBEATS = 10
SPEED_BATCHES = 5  # a worker's speed is measured over its last this many done batches (its current pace)


def _per_state(rows) -> list[tuple]:
    """The (state, chemistry) groups of `collect`'s pass summed per state: counts and sums add up, the
    min/max columns take the min/max (None-aware)."""
    merged: dict[str, list] = {}
    for r in rows:
        have = merged.get(r[0])
        if have is None:
            merged[r[0]] = list(r[:14])
            continue
        for i in (1, 2, 3, 4, 5, 6, 7, 10, 11, 12):
            have[i] += r[i]
        for i, pick in ((8, min), (9, max), (13, min)):
            values = [v for v in (have[i], r[i]) if v is not None]
            have[i] = pick(values) if values else None
    return [tuple(v) for v in merged.values()]


def chemistry_section(rows, settings) -> list[dict]:
    """Per chemistry key: files per state, bytes, reads, the chemistry dorado resolves it to, whether dorado
    >= 1.0 has models for it, and the model the study gives it (with the reason it refuses to, if so)."""
    groups: dict = {}
    for r in rows:
        state, n, size, reads_pass, reads_fail, key = r[0], r[1], r[2], r[3], r[4], r[14]
        g = groups.setdefault(key, {"files": {s: 0 for s in models.FILE_STATES}, "bytes": {"total": 0, "done": 0},
                                    "reads": {"total": 0, "out": 0}})
        g["files"][state] += n
        g["bytes"]["total"] += size
        if state == models.DONE:
            g["bytes"]["done"] += size
            g["reads"]["out"] += reads_pass + reads_fail
        if state != models.DUPLICATE:
            g["reads"]["total"] += r[7]
    out = []
    for key, g in groups.items():
        g["files"]["total"] = sum(g["files"].values())
        out.append({"key": key, **chemistry_of(key), "model": modelplan.model_for(settings, key),
                    "model_refusal": modelplan.refusal(settings, key) if key is not None else None, **g})
    return sorted(out, key=lambda c: (-c["bytes"]["total"], c["key"] or ""))


def chemistry_of(key: str | None) -> dict:
    """What `chemistry.resolve` says of a batch key: {chemistry, analyte, supported, unsupported_reason}.
    A file whose read groups resolve to several chemistries is `mixed` (dorado refuses it with a variant);
    a file whose run info is unknown (unreadable, not yet complete) has all of them null."""
    if key is None:
        return {"chemistry": None, "analyte": None, "supported": None, "unsupported_reason": None}
    found = [chemistry.resolve(part) for part in key.split(";")]
    names = {c.name for c in found}
    if len(names) > 1:
        return {"chemistry": "mixed", "analyte": None, "supported": False,
                "unsupported_reason": "Could not uniquely resolve chemistry from inhomogeneous data"}
    c = found[0]
    return {"chemistry": c.name, "analyte": c.analyte, "supported": c.supported,
            "unsupported_reason": c.unsupported_reason}


def collect(conn, now: float, settings) -> dict:
    t = Pod5File
    counts = {s: 0 for s in models.FILE_STATES}
    bytes_by_state = {s: 0 for s in models.FILE_STATES}
    # Every aggregate in ONE pass over the files table: on a shared filesystem each pass reads the whole
    # ledger file through the network (no page cache survives a fresh connection). Six passes took 14-17 s
    # on a 1M-file ledger on GlusterFS, one takes ~4 s; 0.7 -> 0.45 s on local disk (bench/scale.py).
    recent_ = t.done_at >= now - THROUGHPUT_WINDOW
    zero = zero_sum
    # Grouped by chemistry too (the per-chemistry view) and summed per state here: still one pass.
    per_chemistry = conn.execute(
        sa.select(
            t.state, sa.func.count(), zero(t.size),
            zero(t.reads_pass), zero(t.reads_fail), zero(t.reads_missing), zero(t.bases), zero(t.read_count),
            sa.func.min(t.added_at), sa.func.max(t.added_at),
            sa.func.count(sa.case((recent_, 1))), zero(sa.case((recent_, t.size))),
            zero(sa.case((recent_, t.read_count))), sa.func.min(sa.case((recent_, t.done_at))), t.chemistry,
        ).group_by(t.state, t.chemistry)
    ).all()
    rows = _per_state(per_chemistry)
    for r in rows:
        counts[r[0]], bytes_by_state[r[0]] = r[1], r[2]
    by_state = {r[0]: r for r in rows}
    d = by_state.get(models.DONE)
    done = tuple(d[3:8]) if d else (0, 0, 0, 0, 0)  # reads pass, fail, missing, bases, reads in
    reads_total = sum(r[7] for r in rows if r[0] != models.DUPLICATE)
    recent = tuple(d[10:14]) if d else (0, 0, 0, None)  # published in the window: files, bytes, reads, first
    newest = max((r[9] for r in rows if r[9] is not None), default=None)
    unfinished = (models.PENDING, models.CLAIMED, models.WAITING)
    oldest_unfinished = min((r[8] for r in rows if r[0] in unfinished and r[8] is not None), default=None)
    window = max(1.0, now - recent[3]) if recent[0] else None
    bytes_per_s = recent[1] / window if window else 0.0
    remaining_bytes = bytes_by_state[models.PENDING] + bytes_by_state[models.CLAIMED] + bytes_by_state[models.WAITING]
    eta = remaining_bytes / bytes_per_s if bytes_per_s > 0 else None

    workers = [
        {
            "worker_id": w.worker_id, "host": w.host, "device": w.device, "state": w.state,
            "heartbeat_age_s": round(now - w.last_seen, 1), "batches_done": 0,
            "dorado_version": w.dorado_version,
        }
        for w in conn.execute(sa.select(Worker).order_by(Worker.started_at)).all()
    ]
    running = [
        {
            "batch_id": b.id, "worker_id": b.worker_id, "files": b.n_files, "bytes": b.n_bytes,
            "heartbeat_age_s": round(now - b.heartbeat_at, 1), "running_s": round(now - b.claimed_at, 1),
            "chemistry": b.chemistry, "model": modelplan.model_for(settings, b.chemistry),
            "_lease_holder": lease.owner(b.worker_id, b.token),
            "_token": b.token,
        }
        for b in conn.execute(sa.select(Batch).where(Batch.state == models.RUNNING).order_by(Batch.id)).all()
    ]
    _worker_speeds(conn, workers, running)
    failed = [
        {"path": r.rel_path, "attempts": r.attempts, "error": r.last_error, "chemistry_key": r.chemistry,
         "chemistry": chemistry_of(r.chemistry)["chemistry"]}
        for r in conn.execute(
            sa.select(t.rel_path, t.attempts, t.last_error, t.chemistry).where(t.state == models.FAILED)
            .order_by(t.chemistry, t.id).limit(LIST_LIMIT)
        )
    ]
    duplicates = _with_twin(conn, models.DUPLICATE, "same_as")
    gone = _with_twin(conn, models.GONE, "replaced_by")  # the copy basecalled in its place, if any
    return {
        "schema": SCHEMA,
        "ledger_time": now,
        "input_dir": settings.input_dir,
        "output_dir": settings.output_dir,
        "simulated_basecalls": settings.simulated,
        "files": {**counts, "total": sum(counts.values())},
        "bytes": {"total": sum(bytes_by_state.values()), "done": bytes_by_state[models.DONE], "remaining": remaining_bytes},
        "reads": {
            "total": reads_total, "in_done_files": done[4], "pass": done[0], "fail": done[1],
            "out": done[0] + done[1], "missing": done[2],
        },
        "bases_done": done[3],
        "throughput": {
            "window_s": THROUGHPUT_WINDOW, "files_per_hour": round(recent[0] / window * 3600, 2) if window else 0.0,
            "bytes_per_s": round(bytes_per_s, 1), "reads_per_s": round(recent[2] / window, 3) if window else 0.0,
        },
        "eta_s": round(eta, 1) if eta is not None else None,
        "lag_s": round(now - oldest_unfinished, 1) if oldest_unfinished is not None else 0.0,
        "newest_file_added_at": newest,
        "workers": workers,
        "running_batches": running,
        "failed": failed,
        "duplicates": duplicates,
        "chemistries": chemistry_section(per_chemistry, settings),
        "dorado": dorado_section(conn, settings),
        "gone": gone,
        "follow": follow.status_section(conn, now, counts),
        "barcoding": barcoding_section(conn, settings),
    }


def _worker_speeds(conn, workers: list[dict], running: list[dict]) -> None:
    """Per worker: how many batches it published, and per running worker its current batch and its speed
    over its last SPEED_BATCHES done batches (signal samples per second of basecalling; pod5 bytes per
    second too, the only one on ledgers whose files have no sample count). One pass over the done batches
    (the small batches table; a publication keeps no count on the worker row, claim.publish); their files by
    batch id: a join of the files table with batches instead added 0.3-0.4 s to a 1M-file status."""
    current = {b["worker_id"]: b for b in running}
    live = {w["worker_id"] for w in workers if w["state"] == models.WORKER_RUNNING}
    per_worker: dict[str, list] = {}  # worker -> [seconds, samples, files with samples, files, bytes]
    done_by: dict[str, int] = {}
    if workers:
        f, b = Pod5File, Batch
        recent = sa.select(b.id, b.worker_id, (b.finished_at - b.claimed_at).label("seconds"),
                           sa.func.row_number().over(partition_by=b.worker_id, order_by=b.finished_at.desc())
                           .label("nth"), sa.func.count().over(partition_by=b.worker_id).label("done"),
                           ).where(b.state == models.BATCH_DONE).subquery()
        owner = {}
        for batch_id, worker_id, seconds, done in conn.execute(
                sa.select(recent.c.id, recent.c.worker_id, recent.c.seconds, recent.c.done)
                .where(recent.c.nth <= SPEED_BATCHES)):
            done_by[worker_id] = done
            if worker_id not in live:
                continue
            owner[batch_id] = worker_id
            per_worker.setdefault(worker_id, [0.0, 0, 0, 0, 0])[0] += seconds or 0.0
        if owner:
            for batch_id, samples, with_samples, n_files, size in conn.execute(
                    sa.select(f.batch_id, sa.func.sum(f.samples), sa.func.count(f.samples), sa.func.count(),
                              sa.func.sum(f.size))
                    .where(f.state == models.DONE, f.batch_id.in_(list(owner))).group_by(f.batch_id)):
                acc = per_worker[owner[batch_id]]
                acc[1] += samples or 0
                acc[2] += with_samples
                acc[3] += n_files
                acc[4] += size or 0
    for w in workers:
        w["batches_done"] = done_by.get(w["worker_id"], 0)
        batch = current.get(w["worker_id"])
        w["current_batch"] = batch["batch_id"] if batch else None
        w["current_batch_s"] = batch["running_s"] if batch else None
        busy, samples, with_samples, n_files, size = per_worker.get(w["worker_id"], (0.0, 0, 0, 0, 0))
        w["samples_per_s"] = round(samples / busy, 1) if busy > 0 and n_files and with_samples == n_files else None
        w["bytes_per_s"] = round(size / busy, 1) if busy > 0 and size else None
        w["output_age_s"] = None
        w["stalled"] = False


def _output_moved(layout, batch: dict) -> float | None:
    """The newest mtime of a running batch's log and staging entries (dorado's BAM grows there), or None."""
    newest = None
    candidates = [layout.log(batch["batch_id"]), layout.staging(batch["batch_id"], batch.get("_token"))]
    for path in candidates:
        try:
            st = os.stat(path)
        except OSError:
            continue
        newest = max(newest or 0.0, st.st_mtime)
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(path) as entries:
                    for entry in entries:
                        try:
                            newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
                        except OSError:
                            pass
            except OSError:
                pass
    return newest


def dorado_section(conn, settings) -> dict:
    """The study's dorado version (pinned), whether newer ones may join, every version in use (by workers
    and published batches), and the models published batches ran with, per chemistry key and version."""
    versions: dict = {}

    def entry(version):
        return versions.setdefault(version, {"version": version, "workers_running": 0, "workers": 0, "batches": 0})

    for version, state, n in conn.execute(
            sa.select(Worker.dorado_version, Worker.state, sa.func.count()).group_by(Worker.dorado_version, Worker.state)):
        e = entry(version)
        e["workers"] += n
        if state == models.WORKER_RUNNING:
            e["workers_running"] += n
    ran = conn.execute(
        sa.select(Batch.model, Batch.dorado_version, Batch.chemistry, sa.func.count(), zero_sum(Batch.n_files))
        .where(Batch.state == models.BATCH_DONE).group_by(Batch.model, Batch.dorado_version, Batch.chemistry)
        .order_by(Batch.chemistry, Batch.model)).all()
    for _model, version, _key, n, _files in ran:
        entry(version)["batches"] += n
    return {
        "study_version": settings.dorado_version,
        "allow_upgrade": bool(settings.allow_dorado_upgrade),
        "versions": sorted((v for k, v in versions.items() if k is not None), key=lambda v: v["version"]),
        "models": [{"model": m, "dorado_version": v, "chemistry_key": k, "batches": n, "files": f}
                   for m, v, k, n, f in ran],
    }


def zero_sum(col):
    return sa.func.coalesce(sa.func.sum(col), 0)


def _with_twin(conn, state: str, key: str) -> list[dict]:
    """Files in `state` (duplicate, gone) with the path of the file they point at (`duplicate_of`)."""
    t, twin = Pod5File, sa.orm.aliased(Pod5File)
    return [
        {"path": r[0], key: r[1]}
        for r in conn.execute(
            sa.select(t.rel_path, twin.rel_path).outerjoin(twin, twin.id == t.duplicate_of)
            .where(t.state == state).order_by(t.id).limit(LIST_LIMIT)
        )
    ]


def barcoding_section(conn, settings) -> dict:
    """Yields per barcode folder of a barcoded study, from `barcode_yields` (kept by triggers on `outputs`:
    a table of a few rows, not a pass over every file's outputs). `kit_barcode` is filled in by `report`
    from the sample sheet (a file read: outside the transaction)."""
    rows = conn.execute(sa.select(BarcodeYield.barcode, BarcodeYield.kind, BarcodeYield.outputs, BarcodeYield.reads,
                                  BarcodeYield.bases)).all() if settings.barcoded else []
    per: dict[str, dict] = {}
    for barcode, kind, outputs, reads, bases in rows:
        entry = per.setdefault(barcode, {"barcode": barcode, "kit_barcode": None, "files": 0,
                                         "reads": {"pass": 0, "fail": 0, "total": 0},
                                         "bases": {"pass": 0, "fail": 0, "total": 0}})
        if kind == models.PASS:
            entry["files"] = outputs  # every barcode with a record in an input has its pass/ output there
        entry["reads"][kind] += reads
        entry["bases"][kind] += bases
    total = 0
    for entry in per.values():
        for key in ("reads", "bases"):
            entry[key]["total"] = entry[key]["pass"] + entry[key]["fail"]
        total += entry["reads"]["total"]
    barcodes = [entry for entry in sorted(per.values(), key=_barcode_order) if entry["files"] or entry["reads"]["total"]]
    unclassified = per.get(UNCLASSIFIED, {"reads": {"total": 0}})["reads"]["total"]
    return {
        "kit_name": settings.kit_name,
        "sample_sheet": str(settings.sample_sheet_path) if settings.sample_sheet else None,
        "barcodes": barcodes,
        "reads": total,
        "unclassified_reads": unclassified,
        "unclassified_fraction": round(unclassified / total, 4) if total else None,
    }


def _barcode_order(entry: dict):
    """barcode01 < barcode02 < ... < aliases (by name) < unclassified."""
    name = entry["barcode"]
    m = re.fullmatch(r"barcode(\d+)", name)
    return (2, "", 0) if name == UNCLASSIFIED else (0, "", int(m.group(1))) if m else (1, name, 0)


def _name_kit_barcodes(section: dict, settings) -> None:
    """`kit_barcode` of each entry: the kit's barcodeNN a folder stands for (an alias: from the sample sheet)."""
    aliases = {}
    if settings.sample_sheet:
        from .samplesheet import parse

        aliases = {alias: barcode for barcode, alias in parse(settings.sample_sheet_path).aliases().items() if alias}
    for entry in section["barcodes"]:
        name = entry["barcode"]
        entry["kit_barcode"] = name if re.fullmatch(r"barcode\d+", name) else aliases.get(name)


def report(ledger) -> dict:
    settings = ledger.read_settings()
    now = ledger.clock()
    data = ledger.transact(lambda conn: collect(conn, now, settings))
    # A working batch beats in its lease file between ledger heartbeats (lease.py): show the fresher,
    # read after the transaction so the lock is not held for file reads.
    freshest = {}
    for b in data["running_batches"]:
        beat = lease.read(ledger.path, b["batch_id"], b.pop("_lease_holder"))
        if beat is not None:
            b["heartbeat_age_s"] = min(b["heartbeat_age_s"], round(now - beat, 1))
            freshest[b["worker_id"]] = min(freshest.get(b["worker_id"], b["heartbeat_age_s"]), b["heartbeat_age_s"])
    for w in data["workers"]:
        if w["worker_id"] in freshest:
            w["heartbeat_age_s"] = min(w["heartbeat_age_s"], freshest[w["worker_id"]])
    # Output that has not moved while the lease is alive: also file reads, after the transaction.
    layout = Layout(Path(settings.output_dir))
    by_worker = {w["worker_id"]: w for w in data["workers"]}
    for b in data["running_batches"]:
        moved = _output_moved(layout, b)
        w = by_worker.get(b["worker_id"])
        if w is None:
            continue
        age = now - max(moved or 0.0, now - b["running_s"])  # not before its claim
        w["output_age_s"] = round(age, 1)
        alive = b["heartbeat_age_s"] <= settings.lease
        w["stalled"] = bool(alive and age > STALL_HEARTBEATS * settings.heartbeat)
    for b in data["running_batches"]:
        b.pop("_token", None)
    _name_kit_barcodes(data["barcoding"], settings)
    return data


def render(data: dict) -> str:
    """A terminal table of `report()`."""
    f, r = data["files"], data["reads"]
    lines = ["SIMULATED BASECALLS (stand-in dorado): sequences are synthetic"] if data.get("simulated_basecalls") else []
    lines += [
        f"ledger: {data['output_dir']}  (input {data['input_dir']})",
        "files:   " + "  ".join(f"{s} {f[s]}" for s in ("pending", "claimed", "done", "failed", "waiting", "duplicate"))
        + f"  | total {f['total']}",
        f"data:    {format_size(data['bytes']['done'])} of {format_size(data['bytes']['total'])} basecalled",
        f"reads:   {r['out']} out ({r['pass']} pass, {r['fail']} fail) from {r['in_done_files']} in done files"
        + (f", {r['missing']} not returned by dorado" if r["missing"] else "")
        + f"; {r['total']} reads in all files; {data['bases_done']} bases",
    ]
    tp = data["throughput"]
    eta = format_duration(data["eta_s"]) if data["eta_s"] is not None else "-"
    lines.append(
        f"speed:   {format_size(tp['bytes_per_s'])}/s, {tp['files_per_hour']:.1f} files/h (last {tp['window_s'] / 60:.0f} min)"
        f"  ETA {eta}  behind by {format_duration(data['lag_s'])}"
    )
    following = follow.render_status(data["follow"]) if "follow" in data else None
    if following:
        lines.append(following)
    live = [w for w in data["workers"] if w["state"] == "running"]
    lines.append(f"workers: {len(live)} running, {len(data['workers']) - len(live)} exited")
    if live:
        lines.append(f"  {'worker':<36} {'device':<10} {'heartbeat':>10} {'batches':>8}  {'batch':>8} {'for':>8}  speed")
        for w in live:
            batch = w.get("current_batch")
            since = format_duration(w["current_batch_s"]) if batch is not None else "-"
            if w.get("samples_per_s") is not None:
                rate = w["samples_per_s"]
                speed = f"{rate / 1e6:.1f} M samples/s" if rate >= 1e6 else f"{rate / 1e3:.1f} k samples/s"
            elif w.get("bytes_per_s") is not None:
                speed = f"{format_size(w['bytes_per_s'])}/s"
            else:
                speed = "-"
            flag = (f"  STALLED: no output for {format_duration(w['output_age_s'])}" if w.get("stalled") else "")
            lines.append(f"  {w['worker_id']:<36} {str(w['device'] or '-'):<10} {w['heartbeat_age_s']:>9.0f}s "
                         f"{w['batches_done']:>8}  {str(batch if batch is not None else '-'):>8} {since:>8}  {speed}{flag}")
    if data["running_batches"]:
        lines.append(f"running batches: {len(data['running_batches'])}")
        for b in data["running_batches"][:20]:
            lines.append(
                f"  batch {b['batch_id']:<8} {b['worker_id']:<36} {b['files']} files  heartbeat {b['heartbeat_age_s']:.0f}s ago"
            )
    lines += render_barcodes(data.get("barcoding"))
    lines += render_dorado(data.get("dorado"))
    lines += render_chemistries(data.get("chemistries") or [])
    if data["failed"]:
        lines += render_failed(data["failed"], f["failed"])
    if data["duplicates"]:
        lines.append(f"duplicates ({f['duplicate']}), basecalled once under their first path:")
        for x in data["duplicates"]:
            lines.append(f"  {x['path']}  = {x['same_as']}")
    if data.get("gone"):
        lines.append(f"gone from INPUT_DIR before they were basecalled ({f['gone']}):")
        for x in data["gone"]:
            lines.append(f"  {x['path']}  " + (f"-> basecalled as its copy {x['replaced_by']}" if x["replaced_by"]
                                                else "(no copy left: its reads will not be basecalled)"))
    return "\n".join(lines)


def render_dorado(d: dict | None) -> list[str]:
    """The study's dorado, the versions in use and the models batches ran with (summed over run info keys)."""
    if not d:
        return []
    allowed = "newer versions may join" if d["allow_upgrade"] else "others refuse to claim"
    in_use = ", ".join(f"{v['version']} ({v['workers_running']} workers running, {v['batches']} batches)"
                       for v in d["versions"]) or "-"
    lines = [f"dorado:  study {d['study_version'] or '(not pinned yet: the first worker pins it)'} ({allowed}); "
             f"in use: {in_use}"]
    ran: dict = {}
    for m in d["models"]:
        r = ran.setdefault((m["model"] or "?", m["dorado_version"] or "?"), [0, 0, set()])
        r[0], r[1] = r[0] + m["batches"], r[1] + m["files"]
        r[2].add(m["chemistry_key"])
    for (model, version), (batches, files, keys) in ran.items():
        lines.append(f"  model {model} (dorado {version}): {batches} batches, {files} files, {len(keys)} run info keys")
    return lines


def render_chemistries(chemistries: list[dict]) -> list[str]:
    """One row per chemistry (its run info keys summed; `status --json` has them one by one)."""
    if not chemistries:
        return []
    rows: dict = {}
    for c in chemistries:
        label = "(run info unread)" if c["chemistry"] is None else c["chemistry"] + (
            "" if c["supported"] else " (no dorado >= 1.0 model)")
        r = rows.setdefault(label, {"keys": 0, "done": 0, "pending": 0, "failed": 0, "total": 0, "bytes": 0,
                                    "refusals": set()})
        n = c["files"]
        r["keys"] += 1
        r["done"] += n["done"]
        r["pending"] += n["pending"] + n["claimed"] + n["waiting"]
        r["failed"] += n["failed"]
        r["total"] += n["total"]
        r["bytes"] += c["bytes"]["total"]
        if c.get("model_refusal"):
            r["refusals"].add(c["model"])
    lines = [f"chemistries: {len(rows)} ({len(chemistries)} run info keys)",
             f"  {'chemistry':<54} {'keys':>4} {'done':>6} {'pending':>7} {'failed':>6} {'total':>6} {'data':>10}"]
    for label, r in rows.items():
        lines.append(f"  {label:<54} {r['keys']:>4} {r['done']:>6} {r['pending']:>7} {r['failed']:>6} {r['total']:>6} "
                     f"{format_size(r['bytes']):>10}")
        for model in sorted(r["refusals"]):
            lines.append(f"    never sent to model {model}: it cannot basecall this chemistry")
    return lines


def _error_gist(error: str | None, key: str | None) -> str:
    """A failure's error without what varies between files of one cause: the 'not sent' prefix, the run
    info key, the batch log's path."""
    text = (error or "").removeprefix("not sent to dorado: ")
    if key:
        text = text.replace(f"dorado refused the chemistry {key}: ", "dorado refused it: ")
        text = text.replace(f", run info {key}:", ":")
    if text.endswith(")") and " (log " in text:
        text = text[: text.rindex(" (log ")]
    return text


def render_failed(failed: list[dict], total: int) -> list[str]:
    """Failed files grouped by chemistry and cause: one error line per group, then its files."""
    groups: dict = {}
    for x in failed:
        gist = _error_gist(x["error"], x.get("chemistry_key"))
        groups.setdefault((x.get("chemistry"), gist), []).append(x)
    shown = f" {len(failed)} shown," if len(failed) < total else ""
    lines = [f"failed files ({total}):{shown} by chemistry and cause"]
    for (name, gist), files in sorted(groups.items(), key=lambda item: (item[0][0] or "", item[0][1])):
        lines.append(f"  {name or '(run info unread)'}: {len(files)} files: {gist}")
        for x in files:
            lines.append(f"    {x['path']}  [{x.get('chemistry_key') or '-'}, attempts {x['attempts']}]")
    return lines


def render_barcodes(section: dict | None) -> list[str]:
    """The per-barcode table of a barcoded study (nothing for an unbarcoded one)."""
    if not section or not section["kit_name"]:
        return []
    fraction = section["unclassified_fraction"]
    unclassified = f"unclassified {fraction:.1%} of {section['reads']} reads" if fraction is not None else "no reads yet"
    sheet = ", with a sample sheet" if section["sample_sheet"] else ""
    lines = [f"barcodes: kit {section['kit_name']}{sheet}; {len(section['barcodes'])} barcode folders, {unclassified}"]
    if section["barcodes"]:
        lines.append(f"  {'barcode':<24} {'kit barcode':<12} {'files':>7} {'reads pass':>11} {'reads fail':>11} "
                     f"{'bases':>14} {'reads':>7}")
        for e in section["barcodes"]:
            share = e["reads"]["total"] / section["reads"] if section["reads"] else 0.0
            lines.append(f"  {e['barcode']:<24} {e['kit_barcode'] or '-':<12} {e['files']:>7} {e['reads']['pass']:>11} "
                         f"{e['reads']['fail']:>11} {e['bases']['total']:>14} {share:>7.1%}")
    return lines
