"""`ledgerbc demo`: the whole product on one machine, with no cluster and no GPU.

Builds a dataset (the real ONT test files when found, plus synthetic pod5 files with hostile names),
creates a ledger, runs N local worker processes (what Slurm array tasks would be), and prints the
status report. When no `dorado` is on PATH the basecaller is ledgerbc's stand-in, and everything says
so: the settings, the status report and a SIMULATED_BASECALLS.txt beside the outputs.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import progress, status
from .testkit import install_fake_dorado, synth
from .create import init_ledger
from .db import Ledger
from .errors import BadInput
from .settings import Settings

POLL = 1.0  # seconds between two looks at the ledger while the workers run
PROGRESS_LOG_EVERY = 30.0  # off a terminal (a log file): one progress line this often at most

SIMULATED_NOTE = (
    "SIMULATED BASECALLS: no `dorado` was found on PATH, so this run used ledgerbc's stand-in basecaller.\n"
    "Read ids, file bookkeeping and the ledger protocol are real; sequences and qualities are synthetic.\n"
)


def progress_line(data: dict, elapsed: float) -> str:
    """`files done/total, reads out, throughput` from a status report, for the demo's progress line."""
    files, reads = data["files"], data["reads"]
    total = files["total"] - files["duplicate"]
    rate = files["done"] / elapsed if elapsed > 0 else 0.0
    return (f"progress: {files['done']}/{total} files done, {files['failed']} failed, {reads['out']} reads out, "
            f"{rate:.1f} files/s, {elapsed:.0f}s")


def watch_workers(procs, ledger, started: float, ticker) -> list[int]:
    """Wait for the worker processes, showing progress meanwhile; their exit codes."""
    while any(p.poll() is None for p in procs):
        ticker.update(progress_line(status.report(ledger), time.monotonic() - started))
        time.sleep(POLL)
    ticker.close(progress_line(status.report(ledger), time.monotonic() - started))
    return [p.wait() for p in procs]


def default_testdata() -> Path | None:
    for candidate in (Path("../shared/testdata/real-pod5"), Path(__file__).parents[2] / "shared/testdata/real-pod5"):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def run_demo(folder: Path, workers: int = 4, files: int = 60, testdata: Path | None = None, echo=print) -> int:
    """Returns the number of files not done (0 on success)."""
    folder = Path(folder).resolve()
    if (folder / "output").exists():
        raise BadInput(f"{folder} already holds a demo run. Remove it or pass another --dir.")
    input_dir, output_dir, bin_dir = folder / "input", folder / "output", folder / "bin"
    input_dir.mkdir(parents=True, exist_ok=True)
    if testdata is not None:
        shutil.copytree(testdata, input_dir / "ont-testdata", dirs_exist_ok=True)
        for path in (input_dir / "ont-testdata").rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)  # the shared copy is read-only
        echo(f"dataset: real ONT pod5 files from {testdata}")
    synth.make_dataset(input_dir / "synthetic", files, seed=7, hostile_names=True)
    echo(f"dataset: {files} synthetic pod5 files (pod5.Writer), hostile file names included")

    real = shutil.which("dorado")
    simulated = real is None
    dorado = str(install_fake_dorado(bin_dir)) if simulated else real
    if simulated:
        echo("=" * 78)
        echo(SIMULATED_NOTE.rstrip())
        echo("=" * 78)
    settings = Settings(
        input_dir=str(input_dir), output_dir=str(output_dir), dorado=dorado, batch_files=6, batch_bytes=None,
        lease=60, heartbeat=5, clock_skew=5, min_qscore=10, simulated=simulated,
    )
    ledger_path, report, _warnings = init_ledger(settings)
    if simulated:
        (output_dir / "SIMULATED_BASECALLS.txt").write_text(SIMULATED_NOTE, encoding="utf-8")
    echo(f"ledger: {ledger_path}")
    echo(report.summary())
    echo(f"starting {workers} local workers (each one is what a Slurm array task runs)...")
    started = time.monotonic()
    env = dict(os.environ, LEDGERBC_LEDGER=str(ledger_path))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ledgerbc.cli", "run", "--worker-id", f"demo-{i}@local", "--log-level", "WARNING"],
            env=env, stdout=subprocess.DEVNULL, stderr=open(folder / f"worker-{i}.log", "wb"),
        )
        for i in range(workers)
    ]
    ledger = Ledger(ledger_path)
    codes = watch_workers(procs, ledger, started, progress.Ticker(sys.stdout, tty_every=0.0, log_every=PROGRESS_LOG_EVERY))
    echo(f"workers finished in {time.monotonic() - started:.1f}s with exit codes {codes}")
    data = status.report(ledger)
    echo(status.render(data))
    echo(f"outputs: {output_dir}/pass and {output_dir}/fail; ledger: export LEDGERBC_LEDGER={ledger_path}")
    refused = [f for f in data["failed"] if is_chemistry_refusal(f["error"])]
    if refused:
        echo("=" * 78)
        echo(f"{len(refused)} of the real ONT test files are of chemistries that dorado >= 1.0 has no model for "
             "(R9.4.1, 4 kHz R10.4.1, RNA002, or no known kit):")
        echo("they failed after one dorado call per chemistry, as they would on a real cluster. To basecall such")
        echo(f"files, use dorado {LAST_DORADO_FOR_OLD_CHEMISTRIES} ({OLD_DORADO_URL}) in a separate study.")
        echo("=" * 78)
    left = data["files"]["pending"] + data["files"]["claimed"] + data["files"]["failed"] - len(refused)
    return left


LAST_DORADO_FOR_OLD_CHEMISTRIES = "0.9.6"
OLD_DORADO_URL = "https://github.com/nanoporetech/dorado/releases/tag/v0.9.6"


def is_chemistry_refusal(error: str | None) -> bool:
    """A file failed because dorado has no model for its chemistry (not a fault of ledgerbc or the file)."""
    return bool(error) and ("refused the chemistry" in error)
