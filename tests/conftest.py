"""Fixtures shared across test modules (the helpers they use are in helpers.py). Keep each one small."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

import clients
from helpers import HEARTBEAT, LEASE, SKEW, T0, FakeClock, Study, kill_leftovers
from ledgerbc import db, models
from ledgerbc.create import init_ledger
from ledgerbc.layout import Layout
from ledgerbc.settings import Settings
from ledgerbc.testkit.synth import make_dataset

# What the test harness itself reads (CI's switches, the cluster's addresses): kept. Every other LEDGERBC_*
# is an option or a knob of the product, which a developer's shell must not slip into a test.
HARNESS_PREFIXES = ("LEDGERBC_TEST_", "LEDGERBC_REQUIRE_", "LEDGERBC_CI_", "LEDGERBC_QC_", "LEDGERBC_CHROMIUM")


@pytest.fixture(autouse=True)
def _no_ledgerbc_env(monkeypatch):
    """Every test starts without the developer's LEDGERBC_* (LEDGERBC_LEDGER, ...); subprocesses inherit that."""
    for key in list(os.environ):
        if key.startswith("LEDGERBC_") and not key.startswith(HARNESS_PREFIXES):
            monkeypatch.delenv(key)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def no_stray_processes(tmp_path):
    """dorado runs in its own session: whatever a test leaves running under its folder is killed after it."""
    yield
    kill_leftovers(str(tmp_path))


@pytest.fixture
def study(tmp_path):
    """A Study (helpers.py): folders, the stand-in dorado; its worker processes are killed at the end."""
    s = Study(tmp_path)
    yield s
    s.close()


@pytest.fixture
def clocked_study(tmp_path):
    """Six small pod5 files, a ledger (batches of 3, at most 2 attempts) and a FakeClock; no subprocess."""
    input_dir, output_dir = tmp_path / "in", tmp_path / "out"
    reads = make_dataset(input_dir, 6, seed=11, hostile_names=False, size_spread=False)
    settings = Settings(
        input_dir=str(input_dir), output_dir=str(output_dir), batch_files=3, batch_bytes=None,
        lease=LEASE, heartbeat=HEARTBEAT, clock_skew=SKEW, max_attempts=2,
    )
    path, report, _ = init_ledger(settings)
    assert report.added == 6
    return SimpleNamespace(
        path=path, reads=reads, settings=db.Ledger(path).read_settings(), clock=FakeClock(T0),
        layout=Layout(output_dir), tmp=tmp_path, input=input_dir, output=output_dir,
    )


def add_pending_rows(ledger: db.Ledger, sizes, start: int = 0, now: float = 0.0) -> None:
    """Insert one pending pod5 row per size (what a scan records for complete files), in one transaction."""
    rows = [
        dict(rel_path=f"run/f{i:06d}.pod5", size=size, mtime_ns=0, read_count=1, file_identifier=f"fid-{i:06d}",
             state=models.PENDING, attempts=0, added_at=now)
        for i, size in enumerate(sizes, start)
    ]
    if rows:
        ledger.transact(lambda conn: conn.execute(sa.insert(models.Pod5File), rows))


@pytest.fixture
def make_ledger(tmp_path):
    """make_ledger(n_files=0, sizes=None, path=None, clock=None, **settings) -> (Ledger, Settings).

    A fresh ledger (real schema, real settings) with `n_files` pending rows of 1000 bytes, or one row
    per entry of `sizes`. Default settings: 1-file batches unless batch_files/batch_bytes are given.
    """

    def make(n_files: int = 0, sizes=None, path: Path | None = None, clock=None, **overrides):
        path = Path(path) if path else tmp_path / "ledger" / "ledgerbc.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        fields = dict(input_dir=str(tmp_path / "input"), output_dir=str(tmp_path / "output"), batch_files=1,
                      batch_bytes=None, lease=60.0, heartbeat=5.0, clock_skew=10.0, max_attempts=3)
        if "batch_bytes" in overrides and "batch_files" not in overrides:
            fields["batch_files"] = None
        fields.update(overrides)
        settings = Settings(**fields)
        db.create_ledger_file(path, settings)
        ledger = db.Ledger(path, clock=clock) if clock else db.Ledger(path)
        add_pending_rows(ledger, sizes if sizes is not None else [1000] * n_files)
        return ledger, settings

    return make


# -- real clients of the outputs (tests/clients.py) ----------------------------------------------------------
def need_client(tool: str) -> None:
    """Skip the test when `tool` is missing here, with the reason; in CI a missing client fails it."""
    try:
        clients.check_available(tool)
    except clients.ClientMissing as exc:
        if clients.REQUIRED:
            pytest.fail(f"real clients are required here (CI=true or LEDGERBC_REQUIRE_INTEGRATION=1) but {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def pycoqc():
    """`pycoqc(summary, out_html, *args)`: the real pycoQC (its venv is built on first use)."""
    need_client("pycoqc")
    return clients.pycoqc


@pytest.fixture(scope="session")
def nanoplot():
    """`nanoplot(summary, outdir, *args)`: the real `NanoPlot --summary` (its venv is built on first use)."""
    need_client("nanoplot")
    return clients.nanoplot


@pytest.fixture(scope="session")
def samtools():
    """`samtools(*args)`: Debian's samtools."""
    need_client("samtools")
    return clients.samtools


@pytest.fixture(scope="session")
def _chromium():
    need_client("chromium")
    browser = clients.Browser()
    yield browser
    browser.close()


class _TestBrowser:
    """The session's Chromium, with screenshots under test-artifacts/<test>/."""

    def __init__(self, browser: clients.Browser, folder):
        self._browser, self.artifacts = browser, folder

    def open(self, html_path, name: str = "page", serve=None, **kwargs) -> clients.PageLoad:
        self._browser.artifacts = self.artifacts
        return self._browser.open(html_path, name=name, serve=serve, **kwargs)


@pytest.fixture
def browser(_chromium, request):
    """`browser.open(html_path, name="page", serve=None)` -> PageLoad: the page in headless Chromium with
    ALL network blocked; `.console_errors`, `.left_page` (requests beyond the page), `.screenshot` (PNG
    under test-artifacts/<test>/), `.title`, `.text`."""
    return _TestBrowser(_chromium, clients.ARTIFACTS / clients.safe_name(request.node.nodeid.replace("::", "__")))
