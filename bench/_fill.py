"""Shared helpers of the benchmarks in bench/ (makespan, scale, heartbeat_load, rebuild, overhead).

`new_ledger` creates a real ledger file; `add_files` inserts file metadata through the scan's own write
path (`scan.record`) with synthetic `Observation`s carrying a fake `Pod5Info`: no pod5 file is opened.
"""
from __future__ import annotations

import os
import platform
import statistics
import uuid
from pathlib import Path

from ledgerbc import __version__, db, scan
from ledgerbc.chemistry import FileRunInfo, RunInfoKey
from ledgerbc.pod5check import Pod5Info
from ledgerbc.settings import Settings


def machine() -> str:
    """One line naming the machine the figures come from."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"ledgerbc {__version__}; {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def new_ledger(path: Path, input_dir: Path, output_dir: Path, **settings) -> Settings:
    """A fresh ledger at `path` with `Settings(input_dir, output_dir, **settings)`; returns the settings."""
    s = Settings(input_dir=str(input_dir), output_dir=str(output_dir), **settings)
    path = Path(path)
    if path.exists():
        path.unlink()
    db.create_ledger_file(path, s)
    return s


def observations(sizes, prefix: str = "run", per_folder: int = 4000, keys=None):
    """One synthetic Observation per size: complete pod5 metadata, a distinct file_identifier each.
    `keys`: per file, the run info (flow cell product code, kit, sample rate) that decides its batch key
    (DESIGN §4: one chemistry per batch); default none (every file one key)."""
    for i, size in enumerate(sizes):
        rel = f"{prefix}{i // per_folder:04d}/pod5/PAS00000_pass_{i:07d}.pod5"
        reads = max(1, int(size) // 250_000)
        run_info = None
        if keys is not None:
            key = RunInfoKey(*keys[i])
            run_info = FileRunInfo((key,), int(size) // 2, reads, key.sample_rate)
        yield scan.Observation(
            rel=rel, size=int(size), mtime_ns=1_700_000_000_000_000_000 + i,
            info=Pod5Info(read_count=reads, file_identifier=str(uuid.uuid4()), run_info=run_info),
        )


def add_files(ledger, sizes, now: float = 1_700_000_000.0, **kw) -> scan.ScanReport:
    """Insert one pending file per size through `scan.record` (the scan's write path)."""
    report = scan.ScanReport()
    scan.record(ledger, list(observations(sizes, **kw)), False, 0.0, now, report, {})
    return report


CI_ENV = Path("/run/ledgerbc-ci/env")


def gluster_mounts() -> tuple[str, str] | None:
    """The two GlusterFS mounts of ci/cluster-up.sh (LEDGERBC_TEST_GLUSTER_A/B), when they are mounted."""
    env = dict(os.environ)
    if CI_ENV.exists():
        for line in CI_ENV.read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                key, value = line.split("=", 1)
                env.setdefault(key.strip(), value.strip())
    a, b = env.get("LEDGERBC_TEST_GLUSTER_A"), env.get("LEDGERBC_TEST_GLUSTER_B")
    if a and b and os.path.ismount(a) and os.path.ismount(b):
        return a, b
    return None


def pct(values, q: float) -> float:
    """The q-th percentile (0..100) by nearest rank."""
    data = sorted(values)
    if not data:
        return float("nan")
    k = max(0, min(len(data) - 1, round(q / 100 * (len(data) - 1))))
    return data[k]


def median(values) -> float:
    return statistics.median(values)
