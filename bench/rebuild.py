"""`recover --rebuild` of a large study: 100,000 pod5 files, 2,000 ASSIGNED folders. Target < 60 s.

The study on disk (under --dir, default the system temporary folder; ~2 GB, removed afterwards):
- INPUT_DIR: 100,000 real, distinct pod5 files (100 run folders of 1,000). Writing them one by one with
  `synth.write_pod5` costs ~5 ms each (measured below on 200 of them), so they are made from ONE small
  real pod5 (1 read of 100 samples, `synth.write_pod5`) by rewriting its file_identifier (a UUID string
  that appears, always whole, in the footer and in each Arrow table's metadata) to a fresh one per copy.
  Every copy is a complete pod5 that the real `pod5` library opens, with its own file_identifier (so no
  duplicates); only their read ids coincide, which a rebuild never reads.
- OUTPUT_DIR: `ledgerbc.settings.json`; `pass/<rel>.fastq` (one record each) and its `summary/<rel>.tsv`
  for 88,000 published files (`--no-summaries`: a tree from before summaries, which the rebuild writes
  from the outputs); 2,000 `work/ASSIGNED_<batch>_<worker>/` folders with 5 links each (10,000 files,
  unpublished) named as the worker names them; 2,000 files neither published nor assigned (pending); no
  ledger (lost).

Measured: `rebuild.rebuild_ledger(INPUT_DIR, OUTPUT_DIR)` wall time, with a check of the result (states,
batches), then `verify.verify` (what `ledgerbc verify` runs: every output checksummed) and, with
`--deep`, `verify --deep` on the rebuilt study. `--profile` runs the rebuild under cProfile.

    .venv/bin/python bench/rebuild.py [--files 100000] [--assigned 2000] [--no-summaries] [--deep] [--profile] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fill import machine  # noqa: E402

from ledgerbc import models, rebuild, verify
from ledgerbc.testkit import synth  # noqa: E402
from ledgerbc.db import Ledger  # noqa: E402
from ledgerbc.layout import Layout, link_name, output_relpath  # noqa: E402
from ledgerbc.settings import Settings  # noqa: E402

LINKS_PER_FOLDER = 5


def rel_of(i: int) -> str:
    return f"run{i // 1000:03d}/pod5/PAS00000_pass_{i:07d}.pod5"


def make_inputs(input_dir: Path, n: int) -> tuple[float, float, str]:
    """n distinct pod5 files; returns (seconds to make them, seconds per file by synth.write_pod5, the read id
    they all hold)."""
    probe = input_dir.parent / "probe"
    t0 = time.perf_counter()
    for i in range(200):
        synth.write_pod5(probe / f"{i}.pod5", 1, 100, seed=i)
    per_synth = (time.perf_counter() - t0) / 200
    template = (probe / "0.pod5").read_bytes()
    import pod5

    with pod5.Reader(probe / "0.pod5") as reader:
        identifier = str(reader.file_identifier).encode()
        read_id = str(next(iter(reader.read_ids)))
    shutil.rmtree(probe)
    assert template.count(identifier) > 0
    t0 = time.perf_counter()
    for i in range(n):
        path = input_dir / rel_of(i)
        if i % 1000 == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, template.replace(identifier, str(uuid.uuid4()).encode()))
        finally:
            os.close(fd)
    return time.perf_counter() - t0, per_synth, read_id


SUMMARY = ("filename\tread_id\tparent_read_id\trun_id\tchannel\tmux\tstart_time\tduration\tpasses_filtering\t"
           "sequence_length_template\tmean_qscore_template\tnum_samples\tbarcode_arrangement\n"
           "{rel}\t{id}\t{id}\trun\t1\t1\t0.000000\t0.025000\tTRUE\t10\t12.500000\t100\tunclassified\n")


def make_outputs(input_dir: Path, output_dir: Path, n: int, assigned: int, read_id: str, summaries: bool = True) -> dict:
    layout = Layout(output_dir)
    for folder in (layout.pass_dir, layout.fail_dir, layout.work, layout.staging_root, layout.logs):
        folder.mkdir(parents=True, exist_ok=True)
    Settings(input_dir=str(input_dir), output_dir=str(output_dir)).write_json()
    n_assigned = assigned * LINKS_PER_FOLDER
    n_pending = min(2000, n - n_assigned)
    n_done = n - n_assigned - n_pending
    record = "@{}\tqs:f:12.5\nACGTACGTAC\n+\n++++++++++\n"
    for i in range(n_done):
        path = layout.pass_dir / output_relpath(rel_of(i), "fastq")
        summary = layout.summary_path(rel_of(i))
        if i % 1000 == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            summary.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(record.format(read_id))
        if summaries:
            summary.write_text(SUMMARY.format(rel=rel_of(i), id=read_id))
    for b in range(assigned):
        folder = layout.assigned(10_000 + b, f"{77}_{b % 64}@gpu{b % 64:03d}")
        folder.mkdir(parents=True)
        for k in range(LINKS_PER_FOLDER):
            i = n_done + b * LINKS_PER_FOLDER + k
            os.symlink(input_dir / rel_of(i), folder / link_name(k, rel_of(i)))
    return {"done": n_done, "claimed": n_assigned, "pending": n_pending}


def time_phases() -> dict[str, float]:
    """Wrap the rebuild's phases with timers: the scan of INPUT_DIR (walk, pod5 inspection in a process
    pool, recording), counting the reads of published outputs, and the adoption under the lock."""
    phases = {}

    def timed(owner, name, label):
        original = getattr(owner, name)

        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, name, wrapper)

    timed(rebuild.Scanner, "scan", "scan (inspect pod5 + record)")
    timed(rebuild.Survey, "read_published", "reading published outputs (counts, crc32)")
    timed(rebuild, "_adopt", "adoption under the lock")
    return phases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--assigned", type=int, default=2000)
    ap.add_argument("--profile", action="store_true", help="run the rebuild under cProfile and print the top")
    ap.add_argument("--no-summaries", action="store_true", help="a tree from before summaries (the rebuild writes them)")
    ap.add_argument("--deep", action="store_true", help="also time `verify --deep` (reads every pod5 and output)")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args(argv)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="ledgerbc-rebuild-", dir=args.dir) as tmp:
        input_dir, output_dir = Path(tmp) / "input", Path(tmp) / "output"
        input_dir.mkdir()
        made, per_synth, read_id = make_inputs(input_dir, args.files)
        print(f"inputs: {args.files:,} distinct pod5 files in {made:.0f} s (synth.write_pod5 alone: "
              f"{per_synth * 1e3:.1f} ms per file, {per_synth * args.files / 60:.0f} min for all)")
        t0 = time.perf_counter()
        expected = make_outputs(input_dir, output_dir, args.files, args.assigned, read_id,
                                summaries=not args.no_summaries)
        du = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file() and not f.is_symlink())
        print(f"outputs: {expected['done']:,} published, {args.assigned:,} ASSIGNED folders of "
              f"{LINKS_PER_FOLDER} links ({expected['claimed']:,} files), {expected['pending']:,} neither; "
              f"made in {time.perf_counter() - t0:.0f} s; {du / 1e9:.2f} GB of files")
        os.sync()

        phases = time_phases()
        profiler = cProfile.Profile() if args.profile else None
        t0 = time.perf_counter()
        if profiler:
            profiler.enable()
        path, lines = rebuild.rebuild_ledger(input_dir, output_dir)
        if profiler:
            profiler.disable()
        elapsed = time.perf_counter() - t0

        counts = dict(Ledger(path).transact(lambda c: c.execute(
            sa.select(models.Pod5File.state, sa.func.count()).group_by(models.Pod5File.state)).all()))
        running = Ledger(path).transact(lambda c: c.execute(
            sa.select(sa.func.count()).select_from(models.Batch).where(models.Batch.state == models.RUNNING)).scalar_one())
        ok = (counts.get("done"), counts.get("claimed"), counts.get("pending"), running) == (
            expected["done"], expected["claimed"], expected["pending"], args.assigned)
        print(f"rebuild_ledger: {elapsed:.1f} s for {args.files:,} files and {args.assigned:,} ASSIGNED folders "
              f"({args.files / elapsed:,.0f} files/s){' under cProfile' if profiler else ''} — target < 60 s: "
              f"{'MET' if elapsed < 60 else 'MISSED'}")
        print("phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
              + f", the rest {elapsed - sum(v for k, v in phases.items() if not k.startswith('of which')):.1f} s")
        print(f"result: {counts}, {running} running batches — {'as expected' if ok else 'UNEXPECTED: ' + str(expected)}")
        print("rebuild said: " + " | ".join(lines[:2] + lines[-1:]))
        for deep in (False, True) if args.deep else (False,):
            t0 = time.perf_counter()
            report = verify.verify(Ledger(path), deep=deep)
            took = time.perf_counter() - t0
            print(f"verify{' --deep' if deep else ''}: {took:.1f} s for {report.files:,} files, {report.outputs:,} "
                  f"outputs ({report.files / took:,.0f} files/s): {report.summary()}")
            ok = ok and report.ok
        if profiler:
            stats = pstats.Stats(profiler)
            stats.sort_stats("cumulative").print_stats(30)
            stats.sort_stats("tottime").print_stats(15)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
