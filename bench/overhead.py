"""Per-batch overhead outside dorado (claim, link, split, account, publish) and the splitter's throughput,
with barcodes and the per-read summary, against the splitter of branch `main` (no summary, no barcodes),
measured side by side in one run.

A realistic batch: 20 pod5 files (real, `synth.write_pod5`) of 1,000 reads each, and the BAM dorado
would return for them with `--kit-name SQK-NBD114-24`, synthesized with pysam: 20,000 unaligned records
(one per read, ids from the pod5 files), sequences of 5-10 kb (uniform), per-base qualities (Q7-Q25),
dorado's tags (BC first on ~90% of records, spread over 12 barcodes; qs, du, ns, ts, mx, ch, st (a start
time within 48 h of the run's), rn, fn = the link name, dx, RG with the barcode suffix, sm, sd, sv); qs
spread so ~15% fall below --min-qscore 10 (a fail/ output for most files). About 150 Mbases.

1. Splitter, side by side: `split_bam` of branch `main` (loaded from `git archive main`: before summaries
   and barcodes) and of this checkout, unbarcoded (summary) and barcoded (summary + per-barcode outputs),
   on the same BAM, interleaved (order rotated every repetition), median of --reps. MB/s of BAM in.
2. Per-batch overhead of a barcoded batch, the worker's own code paths in the order `batch.BatchRun` runs them:
  claim    claim.claim_batch on a local-disk ledger of 10,020 files (the batch's 20 first)
  link     BatchRun.prepare: 20 symlinks and the manifest in work/ASSIGNED_<batch>_<worker>/
  beats    claim.heartbeat (a ledger beat: the dearer kind), once per minute of dorado
  split    split.split_bam with --kit-name: per-file x barcode pass/fail outputs and summaries in staging
  account  BatchRun._account: read ids of each pod5 (pod5 library) against the reads out
  publish  BatchRun.publish: claim.publish with the renames (fail/, pass/, summary/) and `outputs` rows
  cleanup  removing the ASSIGNED folder and staging
Each is the median of --reps repetitions (the files are reset to pending between them).

dorado's time for the batch is estimated, not run (no GPU here): samples = bases x 12.5 (5 kHz
sampling, ~400 bases/s translocation), at 7.5 M samples/s (dorado hac, middle of 5-10 M samples/s),
plus 15 s of start-up. Also shown at 30 M samples/s (a fast GPU), where overhead weighs 4x more.
Targets: overhead < 1% of dorado's time; splitter MB/s (barcoded, with summary) within 15% of main's.

    .venv/bin/python bench/overhead.py [--reads-per-file 1000] [--files 20] [--reps 3] [--main-ref main]
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pysam
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fill import add_files, machine, new_ledger  # noqa: E402

from ledgerbc import claim, models, run, split  # noqa: E402
from ledgerbc.batch import BatchRun  # noqa: E402
from ledgerbc.db import Ledger  # noqa: E402
from ledgerbc.layout import Layout, link_name  # noqa: E402
from ledgerbc.scan import Scanner  # noqa: E402
from ledgerbc.testkit import synth  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLES_PER_BASE = 12.5
GPU_RATE = 7.5e6  # samples/s, dorado hac
FAST_GPU_RATE = 30e6
STARTUP = 15.0
MIN_QSCORE = 10.0
KIT = "SQK-NBD114-24"
BARCODES = 12  # barcodes in use (of the kit's 24); ~10% of the records are unclassified
MODEL = "dna_r10.4.1_e8.2_400bps_hac@v5.0.0"
ACQUISITION_START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)


def load_split_of(ref: str, into: Path):
    """The `split` module of git ref `ref` of this repository, imported as package `ledgerbc_<ref>`."""
    package = "ledgerbc_" + "".join(c if c.isalnum() else "_" for c in ref)
    data = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref, "ledgerbc"],
                          check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    (into / "ledgerbc").rename(into / package)
    sys.path.insert(0, str(into))
    return importlib.import_module(f"{package}.split")


def make_pod5s(input_dir: Path, n_files: int, reads: int) -> dict[str, list[str]]:
    out = {}
    for i in range(n_files):
        rel = f"run01/pod5/PAS00000_pass_{i:05d}.pod5"
        out[rel] = synth.write_pod5(input_dir / rel, reads, (200, 400), seed=i)
    return out


def make_bam(path: Path, read_ids: dict[str, list[str]], seed: int = 0) -> int:
    """dorado-like unaligned BAM of a barcoded call for the reads; returns the number of bases."""
    rng = np.random.default_rng(seed)
    rg = f"run1_{MODEL}"
    fields = (f"PU:PAS00000\tPM:1A\tDT:{ACQUISITION_START.isoformat(timespec='milliseconds')}\tPL:ONT"
              f"\tDS:basecall_model={MODEL} runid=run1\tLB:lib")
    barcodes = [f"barcode{n:02d}" for n in range(1, BARCODES + 1)]
    header = pysam.AlignmentHeader.from_text(
        "@HD\tVN:1.6\tSO:unknown\n"
        f"@PG\tID:basecaller\tPN:dorado\tVN:1.1.1\tCL:dorado basecaller hac ASSIGNED --kit-name {KIT}\n"
        f"@RG\tID:{rg}\t{fields}\n"
        + "".join(f"@RG\tID:{rg}_{KIT}_{b}\t{fields}\tSM:{b}\tal:{b}\n" for b in barcodes)
    )
    acgt = np.frombuffer(b"ACGT", dtype=np.uint8)
    bases = 0
    with pysam.AlignmentFile(str(path), "wb", header=header) as bam:
        for k, (rel, ids) in enumerate(read_ids.items()):
            fn = link_name(k, rel)
            for n, read_id in enumerate(ids):
                length = int(rng.integers(5000, 10001))
                qs = float(rng.normal(14, 3))
                r = pysam.AlignedSegment(header)
                r.query_name = read_id
                r.flag = 4
                r.reference_id = r.next_reference_id = -1
                r.reference_start = r.next_reference_start = -1
                r.query_sequence = acgt[rng.integers(0, 4, length)].tobytes().decode()
                r.query_qualities = np.clip(rng.normal(qs, 4, length), 1, 50).astype(np.uint8)
                ns = int(length * SAMPLES_PER_BASE)
                started = ACQUISITION_START + datetime.timedelta(seconds=float(rng.uniform(0, 48 * 3600)))
                bc = f"{KIT}_{barcodes[int(rng.integers(0, BARCODES))]}" if rng.random() >= 0.1 else None
                r.set_tags(([("BC", bc, "Z")] if bc else []) + [
                    ("qs", qs, "f"), ("du", ns / 5000, "f"), ("ns", ns, "i"), ("ts", 0, "i"), ("mx", 1, "i"),
                    ("ch", int(rng.integers(1, 3001)), "i"),
                    ("st", started.isoformat(timespec="milliseconds"), "Z"),
                    ("rn", n, "i"), ("fn", fn, "Z"), ("sm", 90.5, "f"), ("sd", 22.1, "f"), ("sv", "pa", "Z"),
                    ("dx", 0, "i"), ("RG", f"{rg}_{bc}" if bc else rg, "Z"),
                ])
                bam.write(r)
                bases += length
    return bases


def time_split(split_bam, bam: Path, links: dict[str, str], staging: Path, emit: str, **kw) -> tuple:
    """(seconds, CPU seconds of the process: user + system, all threads, CPU seconds of the calling thread) of
    one split of the BAM (its outputs removed afterwards). CPU times say more than wall time on a loaded
    machine; the calling thread runs the Python loop over the records: where cores are free, its CPU time
    is what bounds the split."""
    c0, t0, own0 = os.times(), time.perf_counter(), time.thread_time()
    split_bam(bam, links, staging, emit=emit, min_qscore=MIN_QSCORE, **kw)
    elapsed, c1, own = time.perf_counter() - t0, os.times(), time.thread_time() - own0
    shutil.rmtree(staging)
    return elapsed, (c1.user - c0.user) + (c1.system - c0.system), own


def splitters_side_by_side(main_split, bam: Path, links: dict[str, str], root: Path, emit: str, reps: int) -> dict:
    """{variant: [(seconds, CPU seconds, calling thread's CPU seconds)]}: main's splitter and ours (unbarcoded, barcoded), interleaved, the
    order rotated (and reversed every other round) so that none always runs first or last."""
    variants = {
        "main": lambda staging: time_split(main_split.split_bam, bam, links, staging, emit),
        "ours": lambda staging: time_split(split.split_bam, bam, links, staging, emit),
        "ours --kit-name": lambda staging: time_split(split.split_bam, bam, links, staging, emit, kit_name=KIT),
    }
    names = list(variants)
    times = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        if rep % 2:
            order.reverse()
        for name in order:
            times[name].append(variants[name](root / f"staging-{emit}-{rep}-{names.index(name)}"))
    return times


def one_batch(ledger, settings, worker_id: str, bam: Path) -> dict:
    """The worker's steps for one batch (batch.BatchRun, dorado's BAM given), each timed."""
    t = {}
    worker = run.Worker(ledger, settings, run.WorkerOptions(worker_id=worker_id), "dorado")

    t0 = time.perf_counter()
    batch = claim.claim_batch(ledger, worker_id, settings)
    t["claim"] = time.perf_counter() - t0
    b = BatchRun(worker.crew, batch, more=False)

    t0 = time.perf_counter()
    links = b.prepare()
    t["link"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    claim.heartbeat(ledger, batch)
    t["beat"] = time.perf_counter() - t0

    b.staging.mkdir(parents=True)
    t0 = time.perf_counter()
    result = split.split_bam(bam, {name: f.rel for name, f in links.items()}, b.staging, emit=settings.emit,
                             min_qscore=settings.min_qscore, kit_name=settings.kit_name)
    t["split"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    results = [b._account(name, f, result.files[name], []) for name, f in links.items()]
    t["account"] = time.perf_counter() - t0
    assert all(r.ok and r.reads_missing == 0 for r in results), [r.error for r in results if not r.ok]

    t0 = time.perf_counter()
    assert b.publish(links, result, results) == "done"
    t["publish"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    b.cleanup()
    t["cleanup"] = time.perf_counter() - t0
    t["files"] = len(batch.files)
    return t


def reset(ledger, layout) -> None:
    """Setup between repetitions: the batch's files pending again, their outputs gone."""
    def txn(c):
        c.execute(sa.delete(models.Output))
        c.execute(sa.update(models.Pod5File).where(models.Pod5File.state == models.DONE)
                  .values(state=models.PENDING, batch_id=None))
    ledger.transact(txn)
    for folder in (layout.pass_dir, layout.fail_dir, layout.summary_dir):
        shutil.rmtree(folder, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--reads-per-file", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the temporary study goes (default: the system's)")
    ap.add_argument("--main-ref", default="main", help="the git ref whose splitter is 'today's' (default: main)")
    ap.add_argument("--emit", action="append", choices=split.EMITS, help="repeatable; default: all three")
    args = ap.parse_args(argv)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="ledgerbc-overhead-", dir=args.dir) as tmp:
        root = Path(tmp)
        main_split = load_split_of(args.main_ref, root / "src")
        input_dir, output_dir = root / "input", root / "output"
        t0 = time.perf_counter()
        ids = make_pod5s(input_dir, args.files, args.reads_per_file)
        bam = root / "calls.bam"
        bases = make_bam(bam, ids)
        bam_mb = bam.stat().st_size / 1e6
        n_reads = sum(map(len, ids.values()))
        links = {link_name(k, rel): rel for k, rel in enumerate(ids)}
        print(f"batch: {args.files} pod5 files, {n_reads:,} reads, {bases / 1e6:.0f} Mbases, BAM {bam_mb:.0f} MB, "
              f"{KIT} with {BARCODES} barcodes + unclassified (made in {time.perf_counter() - t0:.0f} s)")

        dorado_s = STARTUP + bases * SAMPLES_PER_BASE / GPU_RATE
        fast_s = STARTUP + bases * SAMPLES_PER_BASE / FAST_GPU_RATE
        print(f"dorado (estimated): {bases * SAMPLES_PER_BASE / 1e9:.2f} G samples -> {dorado_s:.0f} s at "
              f"{GPU_RATE / 1e6:.1f} M samples/s (+{STARTUP:.0f} s start-up); {fast_s:.0f} s at "
              f"{FAST_GPU_RATE / 1e6:.0f} M samples/s")

        ledger_path = root / "ledgerbc.db"
        for emit in args.emit or split.EMITS:
            times = splitters_side_by_side(main_split, bam, links, root, emit, args.reps)
            med = {name: statistics.median(t[0] for t in v) for name, v in times.items()}
            cpu = {name: statistics.median(t[1] for t in v) for name, v in times.items()}
            own = {name: statistics.median(t[2] for t in v) for name, v in times.items()}
            print(f"\n--emit {emit}: splitter, side by side ({args.reps} interleaved runs each, median; "
                  f"load {os.getloadavg()[0]:.1f})")
            for name, seconds in med.items():
                ratio = "" if name == "main" else f"  {med['main'] / seconds:.1%} of main's speed"
                print(f"  {name:<16} {seconds:.2f} s  {bam_mb / seconds:5.0f} MB/s  {n_reads / seconds:8,.0f} reads/s"
                      f"  CPU {cpu[name]:.2f} s (calling thread {own[name]:.2f} s){ratio}")
            speed = med["main"] / med["ours --kit-name"]
            print(f"  barcoded + summary: {speed:.1%} of main's MB/s (CPU {cpu['ours --kit-name'] / cpu['main'] - 1:+.0%}, "
                  f"calling thread {own['ours --kit-name'] / own['main'] - 1:+.0%}) — target within 15% (>= 85%): "
                  f"{'MET' if speed >= 0.85 else 'MISSED'}")

            settings = new_ledger(ledger_path, input_dir, output_dir, batch_files=args.files, batch_bytes=None,
                                  emit=emit, min_qscore=MIN_QSCORE, kit_name=KIT)
            ledger = Ledger(ledger_path)
            layout = Layout(output_dir)
            shutil.rmtree(output_dir, ignore_errors=True)
            for folder in (layout.pass_dir, layout.fail_dir, layout.work, layout.staging_root, layout.logs):
                folder.mkdir(parents=True, exist_ok=True)
            Scanner(ledger, ledger.read_settings()).scan()  # the 20 real files: ids 1..20, claimed first
            add_files(ledger, [10**9] * 10_000, prefix="other")
            settings = ledger.read_settings()
            reps = []
            for rep in range(args.reps):
                if rep:
                    reset(ledger, layout)
                reps.append(one_batch(ledger, settings, f"bench_{rep}@node", bam))
            assert all(r["files"] == args.files for r in reps)
            outputs = ledger.transact(lambda c: c.execute(sa.select(sa.func.count()).select_from(models.Output)).scalar())
            med = {k: statistics.median(r[k] for r in reps) for k in reps[0] if k != "files"}
            beats = dorado_s / settings.heartbeat
            total = sum(v for k, v in med.items() if k != "beat") + beats * med["beat"]
            parts = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in med.items() if k != "beat")
            print(f"  batch with --kit-name ({outputs} outputs published): {parts}, "
                  f"heartbeats {beats:.1f} x {med['beat'] * 1e3:.1f} ms")
            print(f"  overhead {total:.2f} s per batch = {total / dorado_s:.2%} of dorado at "
                  f"{GPU_RATE / 1e6:.1f} M samples/s ({total / fast_s:.2%} at {FAST_GPU_RATE / 1e6:.0f} M samples/s)"
                  f" — target < 1%: {'MET' if total / dorado_s < 0.01 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
