"""Start-up: how long a `ledgerbc` command takes from exec to exit, and what it imports.

Times whole processes (`python -m ledgerbc.cli ARGS`, wall clock and the child's user+system CPU from
`getrusage`) for `--help`, `status` on a small real ledger and `status --ledger README.md` (the error
path). With `--vs PATH` the same commands also run with `PYTHONPATH=PATH` (another checkout's copy of
the package, e.g. the code before a change), alternating A B A B run by run so that drift in the
machine's load hits both alike; the A/B ratio is taken pair by pair. Prints medians (min-max).
`--importtime` also prints the ten slowest imports of each command (`python -X importtime`).

    .venv/bin/python bench/startup.py [--runs 10] [--vs /tmp/before] [--importtime]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fill import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def one_run(argv: list[str], env: dict, cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one whole process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def make_ledger(folder: Path) -> Path:
    from ledgerbc.create import init_ledger
    from ledgerbc.settings import Settings
    from ledgerbc.testkit.synth import make_dataset

    make_dataset(folder / "in", 3, seed=1)
    path, _report, _warnings = init_ledger(Settings(input_dir=str(folder / "in"), output_dir=str(folder / "out")))
    return path


def slowest_imports(args: list[str], cwd: Path, n: int = 10) -> list[str]:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "ledgerbc.cli", *args], cwd=cwd,
                          capture_output=True, text=True, check=False)
    rows = [line.split("|") for line in proc.stderr.splitlines() if line.startswith("import time:") and "|" in line]
    rows = [(int(r[1]), r[2].rstrip()) for r in rows if r[1].strip().isdigit()]
    return [f"{us / 1000:8.1f} ms  {name}" for us, name in sorted(rows, reverse=True)[:n]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="runs per command (after one warm-up)")
    ap.add_argument("--vs", type=Path, default=None, help="PYTHONPATH of a baseline copy of the package (B)")
    ap.add_argument("--importtime", action="store_true", help="also list each command's slowest imports")
    args = ap.parse_args(argv)

    print(f"machine: {machine()}; load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="ledgerbc-startup-") as tmp:
        folder = Path(tmp)
        ledger = make_ledger(folder)
        (folder / "README.md").write_text("# not a ledger\n")
        commands = {"--help": ["--help"], "status": ["status", "--ledger", str(ledger)],
                    "status README.md": ["status", "--ledger", "README.md"]}
        sides = {"A": str(REPO)} | ({"B": str(args.vs)} if args.vs else {})
        print(f"A: PYTHONPATH={sides['A']}" + (f"   B: PYTHONPATH={sides['B']}" if args.vs else ""))
        for name, cmd in commands.items():
            figures = {side: ([], []) for side in sides}
            for n in range(args.runs + 1):
                for side, path in sides.items():
                    for leftover in folder.glob("README.md.*"):  # what an old version left beside README.md
                        leftover.unlink()
                    wall, cpu = one_run([sys.executable, "-m", "ledgerbc.cli", *cmd], dict(os.environ, PYTHONPATH=path),
                                        folder)
                    if n:  # the first round warms the page cache
                        figures[side][0].append(wall)
                        figures[side][1].append(cpu)
            line = f"{name:<18}" + "".join(f"  {side} wall {spread(w)} s, cpu {spread(c)} s" for side, (w, c) in figures.items())
            if args.vs:
                ratio = [a / b for a, b in zip(figures["A"][1], figures["B"][1])]
                line += f"  A/B cpu {statistics.median(ratio):.2f}"
            print(line)
            if args.importtime:
                print("\n".join("    " + row for row in slowest_imports(cmd, folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
