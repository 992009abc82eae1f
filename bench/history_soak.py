"""Soak the random-history test (tests/history.py): many seeds, a report per failing one, histories/minute.

    python bench/history_soak.py --histories 500 [--first-seed 1] [--subprocess-every 20] [--minimise]
                                 [--out DIR] [--without move,copy]

Every history is run in a fresh folder under --out (removed when it passes). A failing history's report (its
seed, steps, violations, the ledger's rows) goes to DIR/failed-<seed>.txt, with a minimised history beside it
when --minimise is given. At the end: how many passed, the wall time, histories per minute by mode, and the
coverage (what the steps met: e.g. `kill@publish`, `freeze@basecall`, `worker exit 11`).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import history  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--histories", type=int, default=500)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--subprocess-every", type=int, default=20,
                        help="every Nth history uses real worker processes (0: none)")
    parser.add_argument("--minimise", action="store_true", help="shrink each failing history (slow)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--without", default="", help="step kinds to leave out, comma-separated (e.g. move): to "
                        "look past a known bug")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="ledgerbc-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    history.library()
    started = time.monotonic()
    seconds, counts, failed, kinds = Counter(), Counter(), [], {}
    coverage = {"inprocess": Counter(), "subprocess": Counter()}
    for n in range(args.histories):
        seed = args.first_seed + n
        mode = "subprocess" if args.subprocess_every and n % args.subprocess_every == args.subprocess_every - 1 \
            else "inprocess"
        root = out / f"h{seed}"
        result = history.run_seed(seed, root, mode, without=tuple(filter(None, args.without.split(","))))
        seconds[mode] += result.seconds
        counts[mode] += 1
        coverage[mode] += result.did
        status = "ok" if result.ok else f"FAILED: {result.violations[0].splitlines()[0][:160]}"
        print(f"seed {seed} {mode} {len(result.plan.steps)} steps {result.seconds:.1f}s {status}", flush=True)
        if result.ok:
            shutil.rmtree(root, ignore_errors=True)
            continue
        failed.append(seed)
        for kind in {history.kind(v) for v in result.violations}:
            kinds.setdefault(kind, []).append(seed)
        (out / f"failed-{seed}.txt").write_text(result.report() + "\n")
        if args.minimise:
            small = history.minimise(result.plan, out / f"min-{seed}")
            (out / f"failed-{seed}.min.txt").write_text(small.describe() + "\n")
            print(f"  minimised to {len(small.steps)} steps: {out}/failed-{seed}.min.txt", flush=True)
    wall = time.monotonic() - started
    print(f"\n{args.histories - len(failed)}/{args.histories} histories without a violation in {wall / 60:.1f} min "
          f"(seeds {args.first_seed}..{args.first_seed + args.histories - 1})")
    for mode in sorted(counts):
        print(f"  {mode}: {counts[mode]} histories, {60 * counts[mode] / seconds[mode]:.1f} per minute "
              f"({seconds[mode] / counts[mode]:.1f} s each)")
    print(f"  failing seeds: {failed or 'none'} (reports in {out})")
    for kind, seeds in sorted(kinds.items(), key=lambda item: -len(item[1])):
        print(f"  {len(seeds):4d} x {kind}  (seeds {seeds[:8]})")
    for mode in sorted(counts):
        print(f"coverage ({mode}): " + ", ".join(f"{k} {v}" for k, v in sorted(coverage[mode].items())))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
