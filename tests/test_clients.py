"""What the real QC clients accept (docs/qc-clients.md): a sequencing summary written by hand with
DESIGN §5's columns, from real dorado BAM records, read unchanged by pycoQC and `NanoPlot --summary`;
pycoQC's page renders in headless Chromium; the browser harness blocks every request.

The format facts (TRUE/FALSE, seconds, one header, at least two reads, no blanks in barcode names)
are pinned here so that a new pycoQC/NanoPlot pin that changes them fails loudly.
"""
from __future__ import annotations

import datetime
import http.server
import json
import re
import threading
from pathlib import Path

import pysam
import pytest

import clients

DORADO_BAM = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "dorado-bam"
# DESIGN §5: the columns of summary/<rel>.tsv and final/sequencing_summary.txt, in this order.
COLUMNS = ("filename read_id parent_read_id run_id channel mux start_time duration passes_filtering "
           "sequence_length_template mean_qscore_template num_samples barcode_arrangement").split()
MIN_QSCORE = 10
# (BAM, the input it stands for: a <rel>.pod5 with folders and a blank, as a study has them)
SOURCES = (("Kit14_hac.bam", "run1/SQK-LSK114.pod5"), ("HAC_5mC_5hmC.bam", "run 2/subset-subset.pod5"))
BARCODES = ("barcode01", "barcode02", "unclassified")
# Each test runs a real pycoQC, NanoPlot or Chromium (seconds to tens of seconds each, venvs built on first
# use): CI runs them; the quick developer run (`pytest -m "not slow"`) leaves them out.
pytestmark = pytest.mark.slow


def _iso(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def summary_rows() -> list[dict]:
    """One row per record of the real dorado BAMs, computed from the tags as DESIGN §5 says:
    start_time = `st:Z` minus the read group's acquisition_start_time, in seconds; parent_read_id =
    `pi:Z` or the read's own id; passes_filtering from our own threshold; a made-up barcode per read."""
    rows = []
    for bam, rel in SOURCES:
        with pysam.AlignmentFile(str(DORADO_BAM / bam), check_sq=False) as fh:
            groups = {}
            for rg in fh.header.to_dict()["RG"]:
                ds = dict(kv.split("=", 1) for kv in rg["DS"].split())
                groups[rg["ID"]] = (ds["runid"], _iso(ds["acquisition_start_time"]))
            for n, rec in enumerate(fh):
                run_id, started = groups[rec.get_tag("RG")]
                qs = rec.get_tag("qs")
                rows.append(dict(
                    filename=rel, read_id=rec.query_name,
                    parent_read_id=rec.get_tag("pi") if rec.has_tag("pi") else rec.query_name,
                    run_id=run_id, channel=rec.get_tag("ch"), mux=rec.get_tag("mx"),
                    start_time=f"{(_iso(rec.get_tag('st')) - started).total_seconds():.3f}",
                    duration=f"{rec.get_tag('du'):.4f}", passes_filtering="TRUE" if qs >= MIN_QSCORE else "FALSE",
                    sequence_length_template=rec.query_length, mean_qscore_template=f"{qs:.3f}",
                    num_samples=rec.get_tag("ns"), barcode_arrangement=BARCODES[n % len(BARCODES)],
                ))
    return rows


def write_summary(path: Path, rows, columns=COLUMNS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write("\t".join(columns) + "\n")
        for row in rows:
            fh.write("\t".join(str(row[c]) for c in columns) + "\n")
    return path


@pytest.fixture(scope="module")
def rows():
    got = summary_rows()
    assert len(got) == 20 + 324 and any(r["parent_read_id"] != r["read_id"] for r in got)  # split reads too
    return got


def nanostats(outdir: Path, prefix: str = "") -> dict[str, str]:
    """NanoPlot's NanoStats.txt as {field: value} (`Number of reads:   344.0`)."""
    text = (outdir / f"{prefix}NanoStats.txt").read_text()
    return {k.strip(): v.strip() for k, v in re.findall(r"^([A-Za-z][^:\n]*):\s+(\S+)\s*$", text, re.M)}


# -- the summary as DESIGN §5 writes it, read unchanged ---------------------------------------------------
def test_pycoqc_reads_the_summary(pycoqc, rows, tmp_path):
    summary = write_summary(tmp_path / "sequencing_summary.txt", rows)
    pycoqc(summary, tmp_path / "pycoqc.html", "--min_pass_qual", MIN_QSCORE, "-j", tmp_path / "pycoqc.json")
    report = json.loads((tmp_path / "pycoqc.json").read_text())
    assert report["All Reads"]["basecall"]["reads_number"] == len(rows)
    assert report["All Reads"]["basecall"]["bases_number"] == sum(r["sequence_length_template"] for r in rows)
    # pycoQC ignores passes_filtering and applies --min_pass_qual itself: the same reads pass
    assert report["Pass Reads"]["basecall"]["reads_number"] == sum(r["passes_filtering"] == "TRUE" for r in rows)
    assert report["All Reads"]["run"]["runid_number"] == len({r["run_id"] for r in rows}) == 6
    assert report["All Reads"]["run"]["barcodes_number"] == 3  # barcode_arrangement is read as the barcode
    html = (tmp_path / "pycoqc.html").read_text()
    assert "Plotly.newPlot" in html and "PycoQC report" in html


def test_nanoplot_reads_the_summary(nanoplot, rows, tmp_path):
    summary = write_summary(tmp_path / "sequencing_summary.txt", rows)
    nanoplot(summary, tmp_path / "np")
    stats = nanostats(tmp_path / "np")
    assert float(stats["Number of reads"]) == len(rows)
    assert float(stats["Total bases"].replace(",", "")) == sum(r["sequence_length_template"] for r in rows)
    assert (tmp_path / "np" / "NanoPlot-report.html").stat().st_size > 0

    nanoplot(summary, tmp_path / "np-bc", "--barcoded")
    for barcode in BARCODES:
        assert (tmp_path / "np-bc" / f"{barcode}_NanoPlot-report.html").is_file(), barcode
    per_barcode = (tmp_path / "np-bc" / "NanoStats_barcoded.txt").read_text()
    assert all(b in per_barcode for b in BARCODES)


def test_pycoqc_page_renders_in_chromium_with_its_cdn_served_locally(pycoqc, browser, rows, tmp_path):
    """pycoQC's page loads plotly.js from cdn.plot.ly and spectre.css from unpkg.com (its template, not
    ours): with the network blocked it renders only when those are served from disk. Served: the
    plotly.js that pycoQC's plotly 4.1.0 ships, and an empty stylesheet (the page is unstyled)."""
    summary = write_summary(tmp_path / "sequencing_summary.txt", rows)
    pycoqc(summary, tmp_path / "pycoqc.html")
    plotly_js = next((clients.venv_dir("pycoqc") / "lib").glob("python3*/site-packages/plotly/package_data/plotly.min.js"))

    offline = browser.open(tmp_path / "pycoqc.html", name="pycoqc-blocked")
    assert "https://cdn.plot.ly/plotly-latest.min.js" in offline.left_page
    assert any("Plotly is not defined" in e for e in offline.console_errors), offline.console_errors

    page = browser.open(tmp_path / "pycoqc.html", name="pycoqc",
                        serve={"https://cdn.plot.ly/": plotly_js, "https://unpkg.com/spectre.css/": b""})
    assert page.console_errors == []
    assert {u.split("/")[2] for u in page.left_page} == {"cdn.plot.ly", "unpkg.com"}, page.left_page
    assert page.title == "PycoQC report" and "Basecalled reads length" in page.text
    assert page.screenshot.stat().st_size > 10_000


# -- the browser harness itself ---------------------------------------------------------------------------
def test_browser_blocks_every_request_and_reports_console_errors(browser, tmp_path):
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        local = f"http://127.0.0.1:{server.server_port}"
        page_file = tmp_path / "page.html"
        page_file.write_text(
            "<!doctype html><html><head><title>t</title>"
            f'<script src="{local}/lib.js"></script><link rel="stylesheet" href="https://example.org/x.css">'
            "</head><body><h1>hello</h1>"
            f'<img src="{local}/img.png"><img src="{tmp_path.as_uri()}/beside.png">'
            '<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=">'
            "<script>console.error('drawn badly'); undefined_function();</script></body></html>"
        )
        (tmp_path / "beside.png").write_bytes(b"not really a png")
        page = browser.open(page_file, name="harness")
    finally:
        server.shutdown()
    assert hits == [], "a request reached a server: the browser is not offline"
    assert set(page.left_page) == {f"{local}/lib.js", "https://example.org/x.css", f"{local}/img.png",
                                   f"{tmp_path.as_uri()}/beside.png"}
    assert "drawn badly" in page.console_errors
    assert any("undefined_function" in e for e in page.console_errors)
    assert page.text.strip() == "hello" and page.screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_samtools_reads_real_dorado_bam(samtools):
    bam = DORADO_BAM / "Kit14_hac.bam"
    # dorado's BAM is unaligned: plain quickcheck refuses it ("had no targets in header", exit 8); -u accepts
    assert samtools("quickcheck", bam, check=False).returncode == 8
    samtools("quickcheck", "-u", bam)
    assert samtools("view", "-c", bam).stdout.strip() == "20"
    fastq = samtools("fastq", "-T", "*", bam).stdout
    assert fastq.count("\n") == 80 and "\tfn:Z:SQK-LSK114.pod5" in fastq.splitlines()[0]
    with pytest.raises(clients.ClientFailed, match=r"samtools exited 2: (?s:.*)missing.bam could not be opened"):
        samtools("quickcheck", "-u", DORADO_BAM / "missing.bam")


# -- format facts -------------------------------------------------------------------------------------------
def _variant(rows, kind: str):
    """(columns, rows, extra text inserted halfway) of a summary that differs from DESIGN §5 in one way."""
    columns, extra = list(COLUMNS), None
    if kind == "True/False":
        rows = [dict(r, passes_filtering=r["passes_filtering"].title()) for r in rows]
    elif kind == "two reads":
        rows = rows[:2]
    elif kind == "one read":
        rows = rows[:1]
    elif kind == "header only":
        rows = []
    elif kind == "iso start_time":
        rows = [dict(r, start_time="2025-02-05T23:10:43.052000+00:00") for r in rows]
    elif kind == "header repeated":  # per-file summaries concatenated with `cat`
        extra = "\t".join(COLUMNS) + "\n"
    elif kind == "blank in barcode":
        rows = [dict(r, barcode_arrangement=r["barcode_arrangement"].replace("barcode01", "patient A")) for r in rows]
    else:
        raise ValueError(kind)
    return columns, rows, extra


# kind -> (pycoQC exit 0?, NanoPlot exit 0?, NanoPlot --barcoded exit 0?)
FORMAT_FACTS = {
    "True/False": (True, True, True),
    "two reads": (True, True, True),
    "one read": (False, False, True),
    "header only": (False, False, False),
    "iso start_time": (False, False, False),
    "header repeated": (False, False, False),
    "blank in barcode": (True, True, False),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(FORMAT_FACTS))
def test_format_facts(pycoqc, nanoplot, rows, tmp_path, kind):
    columns, variant, extra = _variant(rows, kind)
    path = write_summary(tmp_path / "s.txt", variant, columns)
    if extra:
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[: len(lines) // 2] + [extra] + lines[len(lines) // 2:]))
    got = (pycoqc(path, tmp_path / "p.html", check=False).returncode == 0,
           nanoplot(path, tmp_path / "n", check=False).returncode == 0,
           nanoplot(path, tmp_path / "nb", "--barcoded", check=False).returncode == 0)
    assert got == FORMAT_FACTS[kind]
