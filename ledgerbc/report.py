"""The run report: one self-contained HTML page (no script, no external resource: it works offline).

Figures are drawn with matplotlib as inline SVG (docs/report.md says why): yield over time, a per-worker
timeline of batches, read length and qscore distributions (pass/fail), per-sample yields; tables give the
per-sample yields, chemistry groups, failed files and batches with their errors, and the provenance.

Size and time stay bounded on big studies: everything from the ledger is aggregated in SQL or binned in
Python; the timeline merges a worker's consecutive batches of one state closer than a pixel; read
distributions come from a fixed, evenly spaced sample of the summary files (at most SAMPLE_FILES files
and SAMPLE_ROWS reads), never a point per read (bench/report.py: 100,000 files).

The page depends only on the ledger and the files (no clock, no random ids) unless batches are
running, so `finalize` reruns give byte-identical reports.
"""
from __future__ import annotations

import html
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from . import __version__, models
from .layout import summary_relpath
from .units import format_duration, format_size

SAMPLE_FILES = 200  # summary files read for the read length and qscore distributions, at most
SAMPLE_ROWS = 300_000  # reads read from them, at most
LIST_LIMIT = 500  # rows of the failed files/batches tables
TIMELINE_PIXELS = 1600  # horizontal resolution the timeline is merged to
STATE_COLOURS = {
    models.BATCH_DONE: "#4c9a2a", models.RUNNING: "#1f77b4", models.RELEASED: "#a0a0a0",
    models.RECLAIMED: "#ff7f0e", models.BATCH_FAILED: "#d62728",
}
_MATPLOTLIB_RC = {
    "svg.fonttype": "none",  # text as <text> in the page's own sans-serif font: small, no embedded glyphs
    "font.family": "sans-serif", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
    "figure.dpi": 100,
}


@dataclass
class ReportData:
    settings: dict
    now: float
    counts: dict
    sizes: dict
    done: list  # (done_at, reads, bases) of done files
    batches: list
    samples: list  # (sample, kind, files, reads, bases, bytes)
    chemistry: list  # (chemistry, state, files, bytes)
    failed: list
    failed_total: int
    summaries: list  # summary files of done files (relative to OUTPUT_DIR), in input path order
    workers: list


def collect(conn, now: float) -> ReportData:
    """Everything the report needs from the ledger, in one transaction."""
    f, b, o = models.Pod5File, models.Batch, models.Output
    settings = {k: json.loads(v) for k, v in conn.execute(sa.select(models.Setting.key, models.Setting.value))}
    rows = conn.execute(sa.select(f.state, sa.func.count(), sa.func.coalesce(sa.func.sum(f.size), 0))
                        .group_by(f.state)).all()
    done = conn.execute(
        sa.select(f.done_at, sa.func.coalesce(f.reads_pass, 0) + sa.func.coalesce(f.reads_fail, 0),
                  sa.func.coalesce(f.bases, 0))
        .where(f.state == models.DONE, f.done_at.is_not(None))).all()
    batches = conn.execute(sa.select(b.id, b.worker_id, b.state, b.claimed_at, b.finished_at, b.heartbeat_at,
                                     b.n_files, b.n_bytes, b.error, b.model, b.dorado_version, b.chemistry)
                           .order_by(b.id)).all()
    # Per-sample yields: one pass over `outputs` without a join (2.7M rows for 100,000 files x 13 barcodes x
    # pass/fail; a join with pod5_files doubled the time), minus the rows of files that are not done
    # (normally none: a file that goes back to pending loses its rows), found through the file_id index.
    per_sample = (sa.func.coalesce(o.barcode, "all"), o.kind)
    measures = (sa.func.count(), sa.func.sum(o.reads), sa.func.sum(o.bases), sa.func.sum(o.bytes))
    totals = {tuple(r[:2]): list(r[2:]) for r in conn.execute(
        sa.select(*per_sample, *measures).where(o.kind != models.SUMMARY).group_by(*per_sample))}
    not_done = sa.select(f.id).where(f.state != models.DONE)
    for r in conn.execute(sa.select(*per_sample, *measures)
                          .where(o.kind != models.SUMMARY, o.file_id.in_(not_done)).group_by(*per_sample)):
        totals[tuple(r[:2])] = [(a or 0) - (b or 0) for a, b in zip(totals[tuple(r[:2])], r[2:])]
    samples = [(*key, *values) for key, values in totals.items() if values[0] > 0]
    # Done files published before `outputs` rows were recorded: the unbarcoded layout, bases not split.
    unrecorded = conn.execute(
        sa.select(sa.func.count(), sa.func.sum(f.reads_pass), sa.func.sum(f.reads_fail), sa.func.sum(f.bases))
        .where(f.state == models.DONE, ~sa.exists().where(o.file_id == f.id))).one()
    if unrecorded[0]:
        samples += [("all", models.PASS, unrecorded[0], unrecorded[1] or 0, unrecorded[3] or 0, None),
                    ("all", models.FAIL, unrecorded[0], unrecorded[2] or 0, None, None)]
    chemistry = conn.execute(sa.select(sa.func.coalesce(f.chemistry, "unknown"), f.state, sa.func.count(),
                                       sa.func.sum(f.size)).group_by(sa.func.coalesce(f.chemistry, "unknown"), f.state)
                             ).all()
    failed = conn.execute(sa.select(f.rel_path, f.attempts, f.last_error).where(f.state == models.FAILED)
                          .order_by(f.rel_path).limit(LIST_LIMIT)).all()
    summaries = conn.execute(
        sa.select(o.path).join(f, f.id == o.file_id).where(f.state == models.DONE, o.kind == models.SUMMARY)
        .order_by(f.rel_path)).scalars().all()
    if not summaries:  # an older ledger: the summary/ layout (whether the files exist is seen after the lock)
        rels = conn.execute(sa.select(f.rel_path).where(f.state == models.DONE).order_by(f.rel_path)).scalars().all()
        summaries = [summary_relpath(r) for r in _spread(rels, SAMPLE_FILES)]
    workers = conn.execute(sa.select(models.Worker.worker_id, models.Worker.host, models.Worker.dorado_version,
                                     models.Worker.gpus)).all()
    return ReportData(
        settings=settings, now=now, counts={r[0]: r[1] for r in rows}, sizes={r[0]: r[2] for r in rows},
        done=done, batches=batches, samples=samples, chemistry=chemistry, failed=failed,
        failed_total=next((r[1] for r in rows if r[0] == models.FAILED), 0), summaries=summaries, workers=workers,
    )


def _spread(items: list, n: int) -> list:
    """At most `n` items, evenly spaced, first and last included: a fixed sample (same input, same pick)."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def render_report(ledger) -> str:
    """The report of `ledger` as one self-contained HTML page."""
    settings = ledger.read_settings()
    now = ledger.clock()
    data = ledger.transact(lambda conn: collect(conn, now))
    # Paths inside the ledger's folder are stored relative to it: show them as this process resolves them.
    data.settings["input_dir"], data.settings["output_dir"] = settings.input_dir, settings.output_dir
    output = Path(settings.output_dir)
    reads = read_summaries([output / p for p in data.summaries])  # after the transaction: never under the lock
    return _page(data, reads)


def save_report(ledger, path=None) -> Path:
    """Write the report to `path` (default OUTPUT_DIR/final/report.html) by rename from a temp name."""
    from .durable import fsync_dir
    from .finalize import REPORT_NAME, write_product
    from .layout import Layout

    page = render_report(ledger).encode("utf-8")
    path = Path(path) if path else Layout(Path(ledger.read_settings().output_dir)).final_dir / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_product(path, lambda copier: copier.write(page))
    fsync_dir(path.parent)
    return path


# -- the summaries' sample --------------------------------------------------------------------------------
@dataclass
class ReadSample:
    lengths: np.ndarray
    qscores: np.ndarray
    passed: np.ndarray
    files: int
    of_files: int


def read_summaries(paths: list[str]) -> ReadSample:
    """Length, qscore and pass flag of the reads of an evenly spaced sample of summary files."""
    import pyarrow as pa  # a dependency of pod5
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    wanted = ["sequence_length_template", "mean_qscore_template", "passes_filtering"]
    lengths, qscores, passed, used = [], [], [], 0
    total = 0
    for path in _spread(paths, SAMPLE_FILES):
        if total >= SAMPLE_ROWS:
            break
        try:
            table = pacsv.read_csv(
                path, read_options=pacsv.ReadOptions(use_threads=False, block_size=1 << 22),
                parse_options=pacsv.ParseOptions(delimiter="\t"),
                convert_options=pacsv.ConvertOptions(
                    include_columns=wanted, column_types={"sequence_length_template": "float64",
                                                          "mean_qscore_template": "float64",
                                                          "passes_filtering": "string"}))
        except Exception:  # missing (not published yet), unreadable or another layout: not in the sample
            continue
        used += 1
        total += table.num_rows
        lengths.append(table["sequence_length_template"].to_numpy(zero_copy_only=False))
        qscores.append(table["mean_qscore_template"].to_numpy(zero_copy_only=False))
        flags = pc.is_in(pc.utf8_lower(table["passes_filtering"]), value_set=pa.array(["true", "1", "yes"]))
        passed.append(flags.to_numpy(zero_copy_only=False).astype(bool))
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    return ReadSample(cat(lengths, float), cat(qscores, float), cat(passed, bool), used, len(paths))


# -- figures ---------------------------------------------------------------------------------------------
def _svg(fig, name: str) -> str:
    """A matplotlib figure as inline SVG: no XML prolog or DTD, no namespace URLs, ids unique to the figure."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({**_MATPLOTLIB_RC, "svg.hashsalt": f"ledgerbc-{name}"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", text, count=2)
    text = text.replace("xlink:href=", "href=")
    text = re.sub(r'<g id="[^"]*">', "<g>", text)
    text = re.sub(r"\n\s*", "\n", text)
    return f'<figure class="plot" id="fig-{name}">{text}</figure>'


def _figure(width: float, height: float):
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_MATPLOTLIB_RC):
        fig = Figure(figsize=(width, height), layout="constrained")  # laid out in the one draw savefig makes
        ax = fig.add_subplot()
    return fig, ax


def _time_axis(ax, t0: float, span: float) -> tuple[float, str]:
    """Scale for x: hours when the run is long, else minutes; returns (seconds per unit, label)."""
    import datetime

    unit, label = (3600.0, "hours") if span > 3 * 3600 else (60.0, "minutes")
    start = datetime.datetime.fromtimestamp(t0, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ax.set_xlabel(f"{label} since {start}")
    return unit, label


def yield_figure(data: ReportData) -> str | None:
    import matplotlib

    if not data.done:
        return None
    with matplotlib.rc_context(_MATPLOTLIB_RC):
        t = np.array([r[0] for r in data.done], dtype=float)
        reads = np.array([r[1] for r in data.done], dtype=float)
        bases = np.array([r[2] for r in data.done], dtype=float)
        t0 = min([t.min()] + [b.claimed_at for b in data.batches])
        span = max(t.max() - t0, 1.0)
        fig, ax = _figure(9, 3)
        unit, label = _time_axis(ax, t0, span)
        nbins = 60
        edges = np.linspace(0, span, nbins + 1)
        per_bin, _ = np.histogram(t - t0, bins=edges, weights=bases)
        width = edges[1] / unit
        scale, bu = (1e9, "Gb") if bases.sum() >= 5e9 else (1e6, "Mb")
        ax.bar(edges[:-1] / unit, per_bin / scale / (edges[1] / 3600), width=width, align="edge", color="#9ecae1",
               label=f"bases per hour ({bu}/h)")
        ax.set_ylabel(f"{bu} per hour")
        ax2 = ax.twinx()  # cumulative yield at the bin edges: a point per bin, never one per file
        ax2.plot(edges / unit, np.concatenate([[0], np.cumsum(per_bin)]) / scale, color="#08519c",
                 label=f"cumulative bases ({bu})")
        ax2.set_ylabel(f"cumulative {bu}")
        ax2.spines["right"].set_visible(True)
        ax.set_xlim(0, span / unit)
        ax.set_title(f"Yield over time: {int(reads.sum()):,} reads, {bases.sum() / scale:,.1f} {bu} in {len(t):,} files")
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], loc="lower center", bbox_to_anchor=(0.5, 1.08),
                  ncols=2, frameon=False)
        return _svg(fig, "yield")


def _merged_intervals(batches, now: float, resolution: float):
    """{state: [(row, start, end)]}: each worker's batches, consecutive ones of one state merged when the gap
    between them is under `resolution` seconds (less than a pixel): bounded drawing on any ledger."""
    rows: dict[str, int] = {}
    spans: dict[tuple[str, str], list] = {}
    for b in sorted(batches, key=lambda b: (b.worker_id, b.claimed_at)):
        row = rows.setdefault(b.worker_id, len(rows))
        end = b.finished_at if b.finished_at is not None else (now if b.state == models.RUNNING else b.heartbeat_at)
        end = max(end, b.claimed_at)
        key = (b.worker_id, b.state)
        seq = spans.setdefault(key, [])
        if seq and b.claimed_at - seq[-1][2] < resolution:
            seq[-1][2] = max(seq[-1][2], end)
        else:
            seq.append([row, b.claimed_at, end])
    by_state: dict[str, list] = {}
    for (_worker, state), seq in spans.items():
        by_state.setdefault(state, []).extend(seq)
    return rows, by_state


def timeline_figure(data: ReportData) -> str | None:
    import matplotlib
    from matplotlib.patches import PathPatch
    from matplotlib.path import Path as MPath

    if not data.batches:
        return None
    with matplotlib.rc_context(_MATPLOTLIB_RC):
        t0 = min(b.claimed_at for b in data.batches)
        t1 = max([data.now if b.state == models.RUNNING else (b.finished_at or b.heartbeat_at) for b in data.batches])
        span = max(t1 - t0, 1.0)
        rows, by_state = _merged_intervals(data.batches, data.now, span / TIMELINE_PIXELS)
        n = len(rows)
        fig, ax = _figure(9, min(12.0, 1.2 + 0.22 * n))
        unit, _label = _time_axis(ax, t0, span)
        for state in (models.BATCH_DONE, models.RELEASED, models.RUNNING, models.RECLAIMED, models.BATCH_FAILED):
            spans = by_state.get(state)
            if not spans:
                continue
            # One compound path per state (an SVG <path> of rectangles), not one element per batch.
            min_w = span / TIMELINE_PIXELS / unit
            verts, codes = [], []
            for row, start, end in spans:
                x0, x1 = (start - t0) / unit, max((end - t0) / unit, (start - t0) / unit + min_w)
                verts += [(x0, row - 0.38), (x1, row - 0.38), (x1, row + 0.38), (x0, row + 0.38), (x0, row - 0.38)]
                codes += [MPath.MOVETO, MPath.LINETO, MPath.LINETO, MPath.LINETO, MPath.CLOSEPOLY]
            count = sum(1 for b in data.batches if b.state == state)
            ax.add_patch(PathPatch(MPath(verts, codes), facecolor=STATE_COLOURS[state], edgecolor="none",
                                   label=f"{state} ({count:,} batches)"))
            if state in (models.RECLAIMED, models.BATCH_FAILED):  # mark them: they may be too short to see
                ends = sorted({(row, round((end - t0) / unit / min_w)) for row, _s, end in spans})
                ax.scatter([e * min_w for _r, e in ends], [r - 0.45 for r, _e in ends], marker="v", s=14,
                           color=STATE_COLOURS[state], zorder=3)
        ax.set_xlim(0, span / unit)
        ax.set_ylim(n - 0.5, -0.7)
        labels = list(rows)
        if n <= 60:
            ax.set_yticks(range(n), labels)
        else:
            step = math.ceil(n / 40)
            ax.set_yticks(range(0, n, step), labels[::step])
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(f"Batches per worker ({n:,} workers, {len(data.batches):,} batches)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)  # beside: never on bars
        return _svg(fig, "timeline")


def _pass_fail_histogram(name: str, values: np.ndarray, passed: np.ndarray, edges: np.ndarray, title: str,
                         xlabel: str, log: bool = False) -> str:
    """One figure: the histogram of `values` for pass and for fail reads, as outlines."""
    fig, ax = _figure(4.5, 3)
    for flag, label, colour in ((True, "pass", "#2c7fb8"), (False, "fail", "#d95f0e")):
        chosen = values[passed == flag]
        if len(chosen):
            counts, _ = np.histogram(chosen, bins=edges)
            ax.stairs(counts, edges, label=f"{label} ({len(chosen):,})", color=colour, linewidth=1.2)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("reads")
    ax.set_title(title)
    ax.legend(frameon=False)
    return _svg(fig, name)


def distribution_figures(sample: ReadSample) -> list[str]:
    import matplotlib

    if not len(sample.lengths):
        return []
    with matplotlib.rc_context(_MATPLOTLIB_RC):
        top = max(10.0, float(np.nanmax(sample.lengths)))
        bottom = math.floor(math.log10(max(1.0, float(np.nanmin(sample.lengths)))))
        length_edges = np.logspace(bottom, math.log10(top) + 0.05, 60)
        q = sample.qscores[np.isfinite(sample.qscores)]
        q_edges = np.arange(0, max(20.0, float(q.max()) if len(q) else 20.0) + 0.5, 0.5)
        return [
            _pass_fail_histogram("length", sample.lengths, sample.passed, length_edges, "Read length",
                                 "read length (bases)", log=True),
            _pass_fail_histogram("qscore", sample.qscores, sample.passed, q_edges, "Read qscore", "mean qscore"),
        ]


def sample_figure(samples: dict) -> str | None:
    import matplotlib

    if not samples:
        return None
    names = list(samples)
    with matplotlib.rc_context(_MATPLOTLIB_RC):
        fig, ax = _figure(9, min(14.0, 1.0 + 0.18 * len(names)))
        y = np.arange(len(names))
        passed = np.array([samples[n]["pass_bases"] or 0 for n in names], dtype=float) / 1e6
        failed = np.array([samples[n]["fail_bases"] or 0 for n in names], dtype=float) / 1e6
        ax.barh(y, passed, color="#2c7fb8", label="pass")
        ax.barh(y, failed, left=passed, color="#d95f0e", label="fail")
        ax.set_yticks(y, names)
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("Mb")
        ax.set_title("Yield per sample")
        ax.legend(frameon=False)
        return _svg(fig, "samples")


# -- the page --------------------------------------------------------------------------------------------
_CSS = """
body{font-family:sans-serif;margin:1.5em auto;max-width:1100px;color:#222;line-height:1.35}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.2em .5em;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.banner{background:#fff3cd;border:1px solid #e0c060;padding:.5em;margin:.5em 0}
.note{color:#666;font-size:.85em}figure.plot{margin:.5em 0}figure.plot svg{max-width:100%;height:auto}
.row{display:flex;flex-wrap:wrap;gap:1em}code{font-size:.9em}
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
                         for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _n50(lengths: np.ndarray) -> int | None:
    if not len(lengths):
        return None
    ordered = np.sort(lengths)[::-1]
    cumulative = np.cumsum(ordered)
    return int(ordered[np.searchsorted(cumulative, cumulative[-1] / 2)])


def _page(data: ReportData, reads: ReadSample) -> str:
    s = data.settings
    counts = data.counts
    unfinished = sum(counts.get(k, 0) for k in (models.PENDING, models.CLAIMED, models.WAITING))
    samples: dict[str, dict] = {}
    for name, kind, files, n_reads, bases, size in sorted(data.samples, key=lambda r: (str(r[0]), r[1])):
        entry = samples.setdefault(name, {"files": 0, "pass_reads": 0, "fail_reads": 0, "pass_bases": 0,
                                          "fail_bases": 0, "bytes": 0})
        entry["files"] = max(entry["files"], files)
        entry[f"{kind}_reads"] += n_reads or 0
        entry[f"{kind}_bases"] += bases or 0
        entry["bytes"] += size or 0
    total_reads = sum(v["pass_reads"] + v["fail_reads"] for v in samples.values())
    total_bases = sum(r[2] for r in data.done)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>ledgerbc report: {_e(s.get('output_dir'))}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>ledgerbc run report</h1>",
        f'<p class="note">{_e(s.get("input_dir"))} &rarr; {_e(s.get("output_dir"))}</p>',
    ]
    if s.get("simulated"):
        parts.append('<p class="banner"><b>SIMULATED BASECALLS</b>: the stand-in basecaller made these '
                     "reads; the sequences are synthetic.</p>")
    if unfinished:
        parts.append(f'<p class="banner"><b>Unfinished</b>: {unfinished:,} files are not basecalled yet '
                     "(pending, claimed or waiting); these figures cover the done files only.</p>")
    n50 = _n50(reads.lengths)
    overview = [
        ["files", " · ".join(f"{counts[k]:,} {k}" for k in models.FILE_STATES if counts.get(k))],
        ["pod5 basecalled", f"{format_size(data.sizes.get(models.DONE, 0))} of "
                            f"{format_size(sum(v for k, v in data.sizes.items() if k != models.DUPLICATE))}"],
        ["reads written", f"{total_reads:,} ({sum(v['pass_reads'] for v in samples.values()):,} pass, "
                          f"{sum(v['fail_reads'] for v in samples.values()):,} fail)"],
        ["bases written", f"{total_bases:,}"],
        ["read N50 (sample)", f"{n50:,}" if n50 is not None else "-"],
        ["workers, batches", f"{len(data.workers):,} workers, {len(data.batches):,} batches"],
    ]
    if data.done:
        first = min(b.claimed_at for b in data.batches) if data.batches else min(r[0] for r in data.done)
        overview.append(["basecalling time", format_duration(max(r[0] for r in data.done) - first)])
    parts += ['<h2 id="overview">Overview</h2>', _table(["", ""], overview)]

    parts.append('<h2 id="yield">Yield over time</h2>')
    parts.append(yield_figure(data) or '<p class="note">No file is done yet.</p>')

    parts.append('<h2 id="timeline">Workers and batches</h2>')
    parts.append(timeline_figure(data) or '<p class="note">No batch has run yet.</p>')
    parts.append('<p class="note">One row per worker; a bar per batch (batches closer than a pixel merged). '
                 "done green, running blue, released grey (SIGTERM, no attempt counted), reclaimed orange "
                 "(lease expired: redone), failed red; ▼ marks where reclaimed and failed batches ended.</p>")

    parts.append('<h2 id="reads">Read length and qscore</h2>')
    figures = distribution_figures(reads)
    if figures:
        parts.append('<div class="row">' + "".join(figures) + "</div>")
        parts.append(f'<p class="note">From {len(reads.lengths):,} reads of {reads.files:,} of {reads.of_files:,} '
                     "summary files (an evenly spaced sample of the inputs, in path order).</p>")
    else:
        parts.append('<p class="note">No summary/ file to read yet.</p>')

    parts.append('<h2 id="samples">Per sample</h2>')
    parts.append(sample_figure(samples) or '<p class="note">No output yet.</p>')
    parts.append(_table(
        ["sample", "input files", "pass reads", "fail reads", "pass bases", "fail bases", "output bytes"],
        [[name, f"{v['files']:,}", f"{v['pass_reads']:,}", f"{v['fail_reads']:,}", f"{v['pass_bases']:,}",
          f"{v['fail_bases']:,}", format_size(v["bytes"])] for name, v in samples.items()],
        numeric={1, 2, 3, 4, 5, 6}))

    parts.append('<h2 id="chemistry">Chemistry groups</h2>')
    groups: dict[str, dict] = {}
    for chem, state, files, size in data.chemistry:
        g = groups.setdefault(chem, {"files": 0, "bytes": 0, "done": 0})
        g["files"] += files
        g["bytes"] += size or 0
        g["done"] += files if state == models.DONE else 0
    parts.append('<p class="note">flow cell product code | sequencing kit | sample rate: a batch never mixes '
                 "two groups.</p>")
    parts.append(_table(["chemistry", "files", "done", "pod5 size"],
                        [[c, f"{g['files']:,}", f"{g['done']:,}", format_size(g["bytes"])]
                         for c, g in sorted(groups.items())], numeric={1, 2, 3}))

    parts.append('<h2 id="failures">Failed files</h2>')
    if data.failed:
        more = f" (the first {len(data.failed):,} of {data.failed_total:,})" if data.failed_total > len(data.failed) else ""
        parts.append(f"<p>{data.failed_total:,} {'file' if data.failed_total == 1 else 'files'} failed{more}; "
                     "<code>ledgerbc retry --all-failed</code> queues them again.</p>")
        parts.append(_table(["file", "attempts", "last error"], [list(r) for r in data.failed], numeric={1}))
    else:
        parts.append("<p>No file failed.</p>")
    bad = [b for b in data.batches if b.state in (models.BATCH_FAILED, models.RECLAIMED)]
    if bad:
        parts.append(f"<p>{len(bad):,} batches failed or were reclaimed (their files were retried):</p>")
        parts.append(_table(["batch", "worker", "state", "files", "error"],
                            [[b.id, b.worker_id, b.state, b.n_files, b.error] for b in bad[:LIST_LIMIT]],
                            numeric={0, 3}))

    parts.append('<h2 id="provenance">Provenance</h2>')
    made = {}
    for b in data.batches:
        if b.state == models.BATCH_DONE:
            key = (b.dorado_version or "-", b.model or s.get("model") or "-")
            made[key] = made.get(key, 0) + 1
    parts.append(_table(["dorado version", "model", "done batches"],
                        [[v, m, f"{n:,}"] for (v, m), n in sorted(made.items())], numeric={2}))
    parts.append(f"<p>ledgerbc {_e(__version__)}. Settings given to <code>ledgerbc init</code>:</p>")
    parts.append(_table(["setting", "value"], [[k, json.dumps(v)] for k, v in sorted(s.items())]))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
