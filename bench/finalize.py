"""`finalize` throughput against `cat` of the same files, side by side (target: within 80% of cat).

For each emit (fastq, fastq.gz, bam): a finished unbarcoded study of --files inputs whose pass/ and fail/
outputs hold ~--mb MB per input (4 template inputs written by ledgerbc's own writers, through
`ledgerbc.testkit.finished`, then copied under new names with their ledger and `outputs` rows), and their
summary/ files. Then, alternating for --rounds rounds on the same (warm) files:

- `cat` of every file finalize reads (pass outputs, fail outputs, summaries, in finalize's order) into
  one file in final/ (coreutils 9 `cat` copies with copy_file_range, as finalize does);
- `finalize.finalize(ledger)`: the products, sequencing_summary.txt and the report (built from the ledger
  in a thread while the products are copied; also timed alone, for scale).

Reported per emit: median and best time and MB/s of each, and finalize's throughput as a percentage of
cat's (bytes read / time), for the whole command and for its copies alone (`FinalizeResult.copy_seconds`:
products and summary, fsyncs included; the report is built meanwhile in a thread, and is a fixed cost
that a real study's hundreds of GB make small). On a busy machine the best of several rounds is the
fairer figure. On a network filesystem the copy is in the file server's hands for both.

    .venv/bin/python bench/finalize.py [--files 200] [--mb 4] [--rounds 3] [--emits fastq,fastq.gz,bam] [--dir D]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fill import machine  # noqa: E402

from ledgerbc import finalize, report  # noqa: E402
from ledgerbc.testkit.finished import FinishedStudy  # noqa: E402

TEMPLATES = 4
BYTES_PER_READ = {"fastq": 3300, "fastq.gz": 1700, "bam": 1400}  # roughly, at the fixture's 50-3000 bases


def build(root: Path, emit: str, files: int, mb: float) -> FinishedStudy:
    study = FinishedStudy.create(root, emit=emit, barcodes=None)
    reads = max(10, int(mb * 1e6 / BYTES_PER_READ[emit]))
    for k in range(TEMPLATES):
        study.add_input(f"template/t{k}.pod5", n_reads=reads, seed=k)
    con = sqlite3.connect(study.ledger.path)
    con.execute("PRAGMA synchronous=OFF")
    file_cols = [r[1] for r in con.execute("PRAGMA table_info(pod5_files)") if r[1] != "id"]
    out_cols = [r[1] for r in con.execute("PRAGMA table_info(outputs)") if r[1] not in ("id", "file_id")]
    templates = con.execute(f"SELECT id, {', '.join(file_cols)} FROM pod5_files ORDER BY id").fetchall()
    for i in range(files):
        src_id, *values = templates[i % TEMPLATES]
        row = dict(zip(file_cols, values))
        old_rel = row["rel_path"]
        row["rel_path"] = rel = f"run{i // 1000:02d}/pod5/PAS00000_pass_{i:06d}.pod5"
        row["file_identifier"] = f"bench-{i}"
        file_id = con.execute(f"INSERT INTO pod5_files ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                              list(row.values())).lastrowid
        for values in con.execute(f"SELECT {', '.join(out_cols)} FROM outputs WHERE file_id = ?", (src_id,)).fetchall():
            out = dict(zip(out_cols, values))
            new_path = out["path"].replace(old_rel[: -len(".pod5")], rel[: -len(".pod5")])
            (study.output / new_path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(study.output / out["path"], study.output / new_path)
            out.update(path=new_path, file_id=file_id)
            con.execute(f"INSERT INTO outputs ({', '.join(out)}) VALUES ({', '.join('?' * len(out))})", list(out.values()))
    # the templates themselves are not part of the study measured
    con.execute("DELETE FROM outputs WHERE file_id IN (SELECT id FROM pod5_files WHERE rel_path LIKE 'template/%')")
    con.execute("DELETE FROM pod5_files WHERE rel_path LIKE 'template/%'")
    con.commit()
    con.close()
    return study


def measure(study: FinishedStudy, rounds: int) -> dict:
    plan = finalize.plan(study.ledger)
    paths = [str(p.path) for p in plan.pieces if p.kind != "summary"] + [str(p.path) for p in plan.summaries]
    total = sum(Path(p).stat().st_size for p in paths)
    final = study.output / "final"
    final.mkdir(exist_ok=True)
    cat_out = final / "cat.out"
    subprocess.run(["cat", *paths], stdout=open(cat_out, "wb"), check=True)  # warm the cache for both
    cat_times, fin_times, copy_times, report_times = [], [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        with open(cat_out, "wb") as out:
            subprocess.run(["cat", *paths], stdout=out, check=True)
            out.flush()
            os.fsync(out.fileno())  # finalize fsyncs every product: so does this side
            # ... and lets the kernel drop its pages (finalize._drop_cached): otherwise 3 GB of cat's output
            # stay cached while finalize copies, and evict its inputs (a handicap cat never meets).
            os.posix_fadvise(out.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        cat_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = finalize.finalize(study.ledger)
        fin_times.append(time.perf_counter() - t0)
        copy_times.append(result.copy_seconds)
        t0 = time.perf_counter()
        report.render_report(study.ledger)
        report_times.append(time.perf_counter() - t0)
    cat_out.unlink()
    return dict(bytes=total, files=len(paths), cat=statistics.median(cat_times), fin=statistics.median(fin_times),
                cat_min=min(cat_times), fin_min=min(fin_times), copy=statistics.median(copy_times),
                copy_min=min(copy_times), report=statistics.median(report_times))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=200, help="inputs per emit")
    ap.add_argument("--mb", type=float, default=4.0, help="MB of pass+fail output per input, roughly")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--emits", default="fastq,fastq.gz,bam")
    ap.add_argument("--dir", default=None, help="where the studies go (default: the system temp folder)")
    args = ap.parse_args(argv)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="ledgerbc-finalize-", dir=args.dir) as tmp:
        for emit in args.emits.split(","):
            study = build(Path(tmp) / emit.replace(".", "_"), emit, args.files, args.mb)
            r = measure(study, args.rounds)
            mb = r["bytes"] / 1e6
            print(f"{emit:>8}: {r['files']} files, {mb:,.0f} MB | median of {args.rounds}: cat {r['cat']:.2f} s "
                  f"({mb / r['cat']:,.0f} MB/s), finalize {r['fin']:.2f} s ({mb / r['fin']:,.0f} MB/s), "
                  f"{100 * r['cat'] / r['fin']:.0f}% of cat | best: cat {r['cat_min']:.2f} s, finalize {r['fin_min']:.2f} s, "
                  f"{100 * r['cat_min'] / r['fin_min']:.0f}% of cat | its copies alone (products + summary): median "
                  f"{r['copy']:.2f} s, {100 * r['cat'] / r['copy']:.0f}% of cat; best {r['copy_min']:.2f} s, "
                  f"{100 * r['cat_min'] / r['copy_min']:.0f}% | the report alone: {r['report']:.2f} s")
            shutil.rmtree(study.output.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
