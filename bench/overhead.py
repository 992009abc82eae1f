"""Per-batch overhead outside dorado (claim, link, split, account, publish) and the splitter's throughput.

A realistic batch: 20 pod5 files (real, `synth.write_pod5`) of 1,000 reads each, and the BAM dorado
would return for them, synthesized with pysam: 20,000 unaligned records (one per read, ids from the
pod5 files), sequences of 5-10 kb (uniform), per-base qualities (Q7-Q25), dorado's tags (qs, du, ns,
ts, mx, ch, st, rn, fn = the link name, dx, RG, sm, sd, sv); qs spread so ~15% fall below
--min-qscore 10 (a fail/ output for most files). About 150 Mbases.

The worker's own code paths are timed, in the order `run.Worker.process` runs them:
  claim    claim.claim_batch on a local-disk ledger of 10,020 files (the batch's 20 first)
  link     Worker._link: 20 symlinks in work/ASSIGNED_<batch>_<worker>/
  beats    claim.heartbeat, once per minute of dorado (counted at the dorado time below)
  split    split.split_bam of the BAM into per-file pass/fail outputs in staging (fsynced)
  account  Worker._account: read ids of each pod5 (pod5 library) against the reads out
  publish  claim.publish with run.publish_outputs (renames into pass/ and fail/, one transaction)
  cleanup  removing the ASSIGNED folder and staging
Each is the median of 3 repetitions (the files are reset to pending between them).

dorado's time for the batch is estimated, not run (no GPU here): samples = bases x 12.5 (5 kHz
sampling, ~400 bases/s translocation), at 7.5 M samples/s (dorado hac, middle of 5-10 M samples/s),
plus 15 s of start-up. Also shown at 30 M samples/s (a fast GPU), where overhead weighs 4x more.
Target: overhead < 1% of dorado's time. Splitter throughput: MB/s of BAM input, per --emit mode.

    .venv/bin/python bench/overhead.py [--reads-per-file 1000] [--files 20] [--reps 3]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pysam
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fill import add_files, machine, new_ledger  # noqa: E402

from ledgerbc import claim, models, run, split
from ledgerbc.testkit import synth  # noqa: E402
from ledgerbc.db import Ledger  # noqa: E402
from ledgerbc.layout import Layout, link_name  # noqa: E402
from ledgerbc.scan import Scanner  # noqa: E402

SAMPLES_PER_BASE = 12.5
GPU_RATE = 7.5e6  # samples/s, dorado hac
FAST_GPU_RATE = 30e6
STARTUP = 15.0
MIN_QSCORE = 10.0


def make_pod5s(input_dir: Path, n_files: int, reads: int) -> dict[str, list[str]]:
    out = {}
    for i in range(n_files):
        rel = f"run01/pod5/PAS00000_pass_{i:05d}.pod5"
        out[rel] = synth.write_pod5(input_dir / rel, reads, (200, 400), seed=i)
    return out


def make_bam(path: Path, read_ids: dict[str, list[str]], seed: int = 0) -> int:
    """dorado-like unaligned BAM for the reads; returns the number of bases."""
    rng = np.random.default_rng(seed)
    header = pysam.AlignmentHeader.from_text(
        "@HD\tVN:1.6\tSO:unknown\n"
        "@PG\tID:basecaller\tPN:dorado\tVN:1.1.1\tCL:dorado basecaller hac ASSIGNED\n"
        "@RG\tID:run1_dna_r10.4.1_e8.2_400bps_hac@v5.0.0\tPU:PAS00000\tPM:1A\tDT:2024-01-01T00:00:00+00:00"
        "\tPL:ONT\tDS:runid=run1 basecall_model=dna_r10.4.1_e8.2_400bps_hac@v5.0.0\tLB:lib\tSM:sample\n"
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
                r.set_tags([
                    ("qs", qs, "f"), ("du", ns / 5000, "f"), ("ns", ns, "i"), ("ts", 0, "i"), ("mx", 1, "i"),
                    ("ch", int(rng.integers(1, 3001)), "i"), ("st", "2024-01-01T00:00:00.000+00:00", "Z"),
                    ("rn", n, "i"), ("fn", fn, "Z"), ("sm", 90.5, "f"), ("sd", 22.1, "f"), ("sv", "pa", "Z"),
                    ("dx", 0, "i"), ("RG", "run1_dna_r10.4.1_e8.2_400bps_hac@v5.0.0", "Z"),
                ])
                bam.write(r)
                bases += length
    return bases


def one_batch(ledger, settings, layout, bam: Path, worker_id: str) -> dict:
    """The worker's steps for one batch, each timed."""
    t = {}
    w = run.Worker(ledger, run.WorkerOptions(worker_id=worker_id))
    w.settings, w.layout = settings, layout

    t0 = time.perf_counter()
    batch = claim.claim_batch(ledger, worker_id, settings)
    t["claim"] = time.perf_counter() - t0
    assigned, staging = layout.assigned(batch.batch_id, worker_id), layout.staging(batch.batch_id)

    t0 = time.perf_counter()
    links = w._link(batch, assigned)
    t["link"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    claim.heartbeat(ledger, batch.batch_id, worker_id)
    t["beat"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = split.split_bam(bam, {name: f.rel for name, f in links.items()}, staging,
                             emit=settings.emit, min_qscore=settings.min_qscore)
    t["split"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    results = [w._account(name, f, result.files[name], []) for name, f in links.items()]
    t["account"] = time.perf_counter() - t0
    assert all(r.ok and r.reads_missing == 0 for r in results), [r.error for r in results if not r.ok]

    def install():
        run.publish_outputs(layout, settings.emit, result, {r.file_id for r in results if r.ok}, links)

    t0 = time.perf_counter()
    claim.publish(ledger, batch.batch_id, worker_id, results, install, settings.max_attempts)
    t["publish"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    run._remove(assigned)
    run._remove(staging)
    t["cleanup"] = time.perf_counter() - t0
    t["files"] = len(batch.files)
    return t


def reset(ledger, layout) -> None:
    """Setup between repetitions: the batch's files pending again, their outputs gone."""
    ledger.transact(lambda c: c.execute(
        sa.update(models.Pod5File).where(models.Pod5File.state == models.DONE)
        .values(state=models.PENDING, batch_id=None)))
    shutil.rmtree(layout.pass_dir, ignore_errors=True)
    shutil.rmtree(layout.fail_dir, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--reads-per-file", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="ledgerbc-overhead-") as tmp:
        root = Path(tmp)
        input_dir, output_dir = root / "input", root / "output"
        t0 = time.perf_counter()
        ids = make_pod5s(input_dir, args.files, args.reads_per_file)
        bam = root / "calls.bam"
        bases = make_bam(bam, ids)
        bam_mb = bam.stat().st_size / 1e6
        n_reads = sum(map(len, ids.values()))
        print(f"batch: {args.files} pod5 files, {n_reads:,} reads, {bases / 1e6:.0f} Mbases, BAM {bam_mb:.0f} MB "
              f"(made in {time.perf_counter() - t0:.0f} s)")

        dorado_s = STARTUP + bases * SAMPLES_PER_BASE / GPU_RATE
        fast_s = STARTUP + bases * SAMPLES_PER_BASE / FAST_GPU_RATE
        print(f"dorado (estimated): {bases * SAMPLES_PER_BASE / 1e9:.2f} G samples -> {dorado_s:.0f} s at "
              f"{GPU_RATE / 1e6:.1f} M samples/s (+{STARTUP:.0f} s start-up); {fast_s:.0f} s at "
              f"{FAST_GPU_RATE / 1e6:.0f} M samples/s")

        ledger_path = root / "ledgerbc.db"
        for emit in ("fastq", "fastq.gz", "bam"):
            settings = new_ledger(ledger_path, input_dir, output_dir, batch_files=args.files, batch_bytes=None,
                                  emit=emit, min_qscore=MIN_QSCORE)
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
                reps.append(one_batch(ledger, settings, layout, bam, f"bench_{rep}@node"))
            assert all(r["files"] == args.files for r in reps)
            med = {k: statistics.median(r[k] for r in reps) for k in reps[0] if k != "files"}
            beats = dorado_s / settings.heartbeat
            total = sum(v for k, v in med.items() if k != "beat") + beats * med["beat"]
            parts = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in med.items() if k != "beat")
            print(f"\n--emit {emit}: {parts}, heartbeats {beats:.1f} x {med['beat'] * 1e3:.1f} ms")
            print(f"  overhead {total:.2f} s per batch = {total / dorado_s:.2%} of dorado at "
                  f"{GPU_RATE / 1e6:.1f} M samples/s ({total / fast_s:.2%} at {FAST_GPU_RATE / 1e6:.0f} M samples/s)"
                  f" — target < 1%: {'MET' if total / dorado_s < 0.01 else 'MISSED'}")
            print(f"  splitter: {bam_mb / med['split']:.0f} MB/s of BAM, {n_reads / med['split']:,.0f} reads/s, "
                  f"{bases / med['split'] / 1e6:.0f} Mbases/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
