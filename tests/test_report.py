"""The run report (`ledgerbc report`, `final/report.html`): one self-contained page with every section, and
the per-worker view of `ledgerbc status` (current batch, speed, stall flag)."""
from __future__ import annotations

import json
import os
import re
import time
import uuid

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from ledgerbc import models, report, status
from ledgerbc.cli import cli
from ledgerbc.db import Ledger
from ledgerbc.layout import Layout
from ledgerbc.testkit.finished import FinishedStudy

SECTIONS = ["overview", "yield", "timeline", "reads", "samples", "chemistry", "failures", "provenance"]
FIGURES = ["yield", "timeline", "length", "qscore", "samples"]
EVIL = "evil/<script>alert(1)</script> & \"quotes\".pod5"


def add_batch(s: FinishedStudy, **values) -> int:
    row = dict(worker_id="7_1@gpu1", state=models.RECLAIMED, claimed_at=1_700_000_100.0, heartbeat_at=1_700_000_130.0,
               finished_at=1_700_000_200.0, n_files=2, n_bytes=5000, token=uuid.uuid4().hex, error=None)
    row.update(values)
    return s.ledger.transact(lambda conn: conn.execute(sa.insert(models.Batch).values(**row)).inserted_primary_key[0])


@pytest.fixture
def finished(tmp_path) -> FinishedStudy:
    s = FinishedStudy.create(tmp_path, emit="bam")
    for i, rel in enumerate(["a/1.pod5", "a/2.pod5", "b/3.pod5", "b/4.pod5", "c/5.pod5"]):
        s.add_input(rel, n_reads=30 + i, worker=f"7_{i % 2}@gpu{i % 2}")
    s.add_input(EVIL, state=models.FAILED)
    add_batch(s, error="lease expired: heartbeat 950s old")
    add_batch(s, state=models.BATCH_FAILED, error="dorado exited with status 1: [error] CUDA out of memory")
    return s


def test_the_page_is_self_contained_and_has_every_section(finished):
    html = report.render_report(finished.ledger)
    # nothing that makes a browser reach out: no script at all, no stylesheet link, no URL in src/href/url()
    assert "<script" not in html.lower() and "<link" not in html.lower() and "@import" not in html
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//|ftp:)""", html, re.I)
    assert not re.search(r"url\(\s*['\"]?(?!#)", html)
    assert "http" not in html  # not even an XML namespace
    for section in SECTIONS:
        assert f'<h2 id="{section}">' in html
    for figure in FIGURES:
        assert html.count(f'<figure class="plot" id="fig-{figure}"><svg') == 1
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quotes&quot;.pod5" in html  # escaped, not run
    assert "dorado returned no reads for its 30 reads (simulated)" in html
    assert "dorado exited with status 1: [error] CUDA out of memory" in html
    assert "lease expired: heartbeat 950s old" in html
    assert "reclaimed (1 batches)" in html and "failed (1 batches)" in html  # marked in the timeline
    for value in ("1.1.1+e72f14925", "dna_r10.4.1_e8.2_400bps_hac@v5.0.0", "ledgerbc 0.1.0", "min_qscore"):
        assert value in html
    for sample in ("barcode01", "barcode02", "unclassified"):
        assert f"<td>{sample}</td>" in html
    assert "FLO-PRO114M|SQK-NBD114-24|5000" in html
    assert f"From {finished.summary_rows:,} reads of 5 of 5 summary files" in html


def test_distributions_come_from_a_fixed_sample_of_summaries(finished, monkeypatch):
    monkeypatch.setattr(report, "SAMPLE_FILES", 2)
    html = report.render_report(finished.ledger)
    assert "reads of 2 of 5 summary files" in html
    assert report.render_report(finished.ledger) == html  # the same sample every time
    assert report._spread(list(range(10)), 4) == [0, 3, 6, 9]


def test_report_command_writes_the_page(finished, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["report", "--ledger", str(finished.ledger.path)])
    default = finished.output / "final" / "report.html"
    assert result.exit_code == 0 and result.stdout == f"report written: {default}\n"
    result = runner.invoke(cli, ["report", "--ledger", str(finished.ledger.path), "-o", "-"])
    assert result.exit_code == 0 and result.stdout == default.read_text()
    other = tmp_path / "elsewhere" / "r.html"
    result = runner.invoke(cli, ["report", "--ledger", str(finished.ledger.path), "-o", str(other)])
    assert result.exit_code == 0 and other.read_text() == default.read_text()
    result = runner.invoke(cli, ["report", "--ledger", str(tmp_path / "nope.db")])
    assert result.exit_code == 4 and result.stderr.startswith("Error: no ledger at")


@pytest.mark.slow
def test_report_renders_in_headless_chromium(finished, browser):
    """Real Chromium with all network blocked (tests/clients.py): no console error, no request leaving the
    page; the screenshot is kept under test-artifacts/ and was looked at."""
    page = browser.open(report.save_report(finished.ledger), name="report")
    assert page.console_errors == []
    assert page.left_page == []
    assert os.path.getsize(page.screenshot) > 10_000
    for heading in ("Yield over time", "Workers and batches", "Read length and qscore", "Per sample",
                    "Chemistry groups", "Failed files", "Provenance"):
        assert heading in page.text


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["pycoqc", "nanoplot"])
def test_the_merged_summary_is_read_by_pycoqc_and_nanoplot(finished, request, tmp_path, tool):
    run = request.getfixturevalue(tool)  # the real tool (tests/clients.py), in its own venv
    from ledgerbc.finalize import finalize

    finalize(finished.ledger)
    summary = finished.output / "final" / "sequencing_summary.txt"
    out = tmp_path / tool
    out.mkdir()
    proc = run(summary, out / "qc.html") if tool == "pycoqc" else run(summary, out)
    assert proc.returncode == 0
    assert any(out.iterdir())


# -- status: the per-worker view -----------------------------------------------------------------------------
def test_status_shows_each_workers_batch_speed_and_a_stall(tmp_path, monkeypatch):
    now = time.time()
    s = FinishedStudy.create(tmp_path, emit="fastq")
    s.add_input("a/old.pod5", n_reads=50, worker="7_0@gpu0", at=now - 7 * 3600)  # not among its last 3
    for i in range(5):  # one batch per input, 50 s each
        s.add_input(f"a/{i}.pod5", n_reads=30 + i, worker=f"7_{i % 2}@gpu{i % 2}", at=now - 3600 + 300 * i)
    layout = Layout(s.output)

    def running(worker, age_of_output):
        batch = add_batch(s, worker_id=worker, state=models.RUNNING, claimed_at=now - 3000, heartbeat_at=now - 5,
                          finished_at=None)
        log = layout.log(batch)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("[info] Running\n")
        os.utime(log, (now - age_of_output, now - age_of_output))
        return batch

    monkeypatch.setattr(status, "SPEED_BATCHES", 3)
    stuck = running("7_0@gpu0", 2000)  # heartbeat fresh, no output for 2000 s > 10 heartbeats of 60 s
    moving = running("7_1@gpu1", 5)
    s.ledger.transact(lambda conn: conn.execute(
        sa.update(models.Worker).values(state=models.WORKER_RUNNING, last_seen=now - 5)))
    ledger = Ledger(s.ledger.path, clock=lambda: now)  # status's clock, fixed: no wall-clock in the assertions
    data = status.report(ledger)
    workers = {w["worker_id"]: w for w in data["workers"]}
    w0, w1 = workers["7_0@gpu0"], workers["7_1@gpu1"]
    assert (w0["current_batch"], w1["current_batch"]) == (stuck, moving)
    assert w0["current_batch_s"] == 3000
    assert w0["stalled"] is True and w1["stalled"] is False
    assert w0["output_age_s"] == 2000 and w1["output_age_s"] == 5
    # samples/s over its last 3 done batches: inputs 0, 2, 4 (30, 32, 34 reads x 4000 samples), 50 s each
    assert w0["samples_per_s"] == pytest.approx((30 + 32 + 34) * 4000 / 150, rel=1e-3)
    assert w0["bytes_per_s"] == pytest.approx((4000 + 4200 + 4400) / 150, rel=1e-3)
    text = status.render(data)
    line = next(x for x in text.splitlines() if x.strip().startswith("7_0@gpu0"))
    assert f" {stuck} " in line and "50m00s" in line and "k samples/s" in line and "STALLED: no output for 33m20s" in line
    assert "STALLED" not in next(x for x in text.splitlines() if x.strip().startswith("7_1@gpu1"))
    json.dumps(data)

    # a ledger whose files have no sample count (scanned by an older ledgerbc): bytes/s instead
    s.ledger.transact(lambda conn: conn.execute(sa.update(models.Pod5File).values(samples=None)))
    data = status.report(ledger)
    w0 = next(w for w in data["workers"] if w["worker_id"] == "7_0@gpu0")
    assert w0["samples_per_s"] is None and w0["bytes_per_s"] > 0
    assert "B/s" in next(x for x in status.render(data).splitlines() if x.strip().startswith("7_0@gpu0"))
