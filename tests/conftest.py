"""Fixtures shared across test modules. Keep each one small; several test files add theirs here."""
from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

import clients
from ledgerbc import db, models
from ledgerbc.settings import Settings


class FakeClock:
    """An injectable clock (`Ledger(path, clock=...)`): lease expiry is tested by moving it, not by sleeping."""

    def __init__(self, start: float = 1_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


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
