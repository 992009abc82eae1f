"""Real clients of ledgerbc's outputs, for tests (DESIGN §9): pycoQC and NanoPlot read a sequencing
summary, samtools reads FASTQ and BAM, a headless Chromium renders an HTML page with no network.

    pycoqc(summary, out_html, *args)   -> CompletedProcess   the real pycoQC 2.5.2, its own venv
    nanoplot(summary, outdir, *args)   -> CompletedProcess   the real `NanoPlot --summary`, its own venv
    samtools(*args, check=True)        -> CompletedProcess   Debian's samtools
    Browser(artifacts).open(html)      -> PageLoad           Debian's chromium driven by playwright

Each raises `ClientFailed` (an AssertionError: the test fails with the tool's stderr) when the tool
exits non-zero. The fixtures in tests/conftest.py (`pycoqc`, `nanoplot`, `samtools`, `browser`) skip
with the reason when a client is missing, except in CI (`CI=true` or `LEDGERBC_REQUIRE_INTEGRATION=1`),
where a missing client fails the test.

pycoQC and NanoPlot are test-only and never product dependencies: each lives in its own venv under
`.venv-qc/` (or `LEDGERBC_QC_VENVS`), built from the pinned lists in `ci/qc/<tool>.txt` by
`python tests/clients.py install` (ci/test.sh does this) or lazily by the first test that needs it,
and reused while the pins are unchanged. docs/qc-clients.md says what the two tools accept.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PINS_DIR = REPO / "ci" / "qc"
# Read once at import: fixtures that scrub LEDGERBC_* from the environment run later.
VENVS = Path(os.environ.get("LEDGERBC_QC_VENVS") or REPO / ".venv-qc")
REQUIRED = os.environ.get("CI") == "true" or os.environ.get("LEDGERBC_REQUIRE_INTEGRATION") == "1"
ARTIFACTS = Path(os.environ.get("LEDGERBC_TEST_ARTIFACTS") or REPO / "test-artifacts")
CHROMIUM = os.environ.get("LEDGERBC_CHROMIUM") or "/usr/bin/chromium"

# The console script each tool installs, and how to ask it for its version (a smoke test of the venv).
QC_TOOLS = {"pycoqc": ("pycoQC", "--version"), "nanoplot": ("NanoPlot", "--version")}
TOOL_TIMEOUT = 600  # seconds; a report of a few thousand reads takes seconds


class ClientMissing(Exception):
    """A client is not installed here (and could not be built); the message says which and why."""


class ClientFailed(AssertionError):
    """A client ran and failed: the message carries its command line, exit status and stderr."""


def _run(argv, what: str, check: bool = True, timeout: float = TOOL_TIMEOUT, env=None, **kwargs):
    kwargs.setdefault("text", True)
    proc = subprocess.run([str(a) for a in argv], capture_output=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL, **kwargs)
    if check and proc.returncode != 0:
        err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode("utf-8", "replace")
        raise ClientFailed(f"{what} exited {proc.returncode}: {' '.join(str(a) for a in argv)}\n"
                           f"--- stderr (last 4000 chars) ---\n{err[-4000:]}")
    return proc


# -- pycoQC and NanoPlot, each in its own venv ---------------------------------------------------------------
def _pins(tool: str) -> str:
    return (PINS_DIR / f"{tool}.txt").read_text(encoding="utf-8")


def _stamp(tool: str) -> str:
    return hashlib.sha256(_pins(tool).encode()).hexdigest()


def venv_dir(tool: str) -> Path:
    return VENVS / tool


def _ready(tool: str) -> bool:
    stamp = venv_dir(tool) / ".ledgerbc-pins"
    return stamp.is_file() and stamp.read_text().strip() == _stamp(tool)


def install(tool: str, quiet: bool = True) -> float:
    """Build `tool`'s venv from ci/qc/<tool>.txt unless it is there with the same pins; return the
    seconds spent (0 when it was ready). Raises ClientMissing when pip cannot build it."""
    VENVS.mkdir(parents=True, exist_ok=True)
    with open(VENVS / f".{tool}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs in one checkout build it once
        if _ready(tool):
            return 0.0
        t0 = time.monotonic()
        target = venv_dir(tool)
        shutil.rmtree(target, ignore_errors=True)  # a venv cannot be moved into place: build where it lives
        steps = [
            ([sys.executable, "-m", "venv", target], "python -m venv"),
            ([target / "bin" / "python", "-m", "pip", "install", "--disable-pip-version-check",
              *(["-q"] if quiet else []), "-r", PINS_DIR / f"{tool}.txt"], f"pip install -r ci/qc/{tool}.txt"),
            ([target / "bin" / QC_TOOLS[tool][0], QC_TOOLS[tool][1]], f"{QC_TOOLS[tool][0]} {QC_TOOLS[tool][1]}"),
        ]
        for argv, what in steps:
            try:
                _run(argv, what, timeout=1800)
            except (ClientFailed, OSError, subprocess.TimeoutExpired) as exc:
                raise ClientMissing(f"could not build the {tool} venv in {target}: {str(exc)[:2000]}") from None
        (target / ".ledgerbc-pins").write_text(_stamp(tool) + "\n")
        return time.monotonic() - t0


def tool_path(tool: str) -> Path:
    """The tool's console script, building its venv first when needed."""
    if not _ready(tool):
        install(tool)
    return venv_dir(tool) / "bin" / QC_TOOLS[tool][0]


def pycoqc(summary_path, out_html, *args, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real pycoQC on a sequencing summary: `pycoQC -f SUMMARY -o OUT_HTML [args]`.

    pycoQC decides pass/fail from `mean_qscore_template >= --min_pass_qual` (default 7), not from
    `passes_filtering`: give `--min_pass_qual Q` to match ledgerbc's `--min-qscore`."""
    return _run([tool_path("pycoqc"), "-f", summary_path, "-o", out_html, *args], "pycoQC", check=check)


def nanoplot(summary_path, outdir, *args, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real `NanoPlot --summary SUMMARY -o OUTDIR --no_static [args]` (report: OUTDIR/NanoPlot-report.html).

    --no_static always: static PNGs go through kaleido, which looks for Chrome and, not finding one,
    tries to download it. BROWSER_PATH points kaleido at Debian's chromium in case a caller asks anyway."""
    env = dict(os.environ, BROWSER_PATH=CHROMIUM, MPLBACKEND="Agg")
    return _run([tool_path("nanoplot"), "--summary", summary_path, "-o", outdir, "--no_static", *args],
                "NanoPlot", check=check, env=env)


def samtools(*args, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run Debian's samtools: `samtools(*args)`; text output unless `text=False`."""
    exe = shutil.which("samtools")
    if not exe:
        raise ClientMissing("samtools is not on PATH (Debian package `samtools`)")
    return _run([exe, *args], "samtools", check=check, **kwargs)


def check_available(tool: str) -> None:
    """Raise ClientMissing unless `tool` (pycoqc, nanoplot, samtools, chromium) can run here."""
    if tool in QC_TOOLS:
        try:
            tool_path(tool)
        except OSError as exc:  # e.g. no room or no write access for the venv
            raise ClientMissing(f"could not build the {tool} venv under {VENVS}: {exc}") from None
    elif tool == "samtools":
        if not shutil.which("samtools"):
            raise ClientMissing("samtools is not on PATH (Debian package `samtools`)")
    elif tool == "chromium":
        if not os.access(CHROMIUM, os.X_OK):
            raise ClientMissing(f"no Chromium at {CHROMIUM} (Debian package `chromium`)")
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            raise ClientMissing("the playwright package is not installed (pip install -e '.[test]')") from None
    else:
        raise ValueError(tool)


# -- headless Chromium ------------------------------------------------------------------------------------
# Chromium flags: no sandbox as root (CI), and nothing the browser would fetch on its own account.
# The proxy (a closed loopback port) and the resolver rule are a second wall behind the request
# interception in Browser.open: even a request playwright does not see cannot leave the machine.
CHROMIUM_ARGS = [
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-gpu", "--disable-default-apps", "--disable-domain-reliability", "--no-pings",
    "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
]


@dataclass
class PageLoad:
    """What one page did in the browser."""

    url: str
    title: str
    console_errors: list[str] = field(default_factory=list)  # console.error lines and uncaught exceptions
    left_page: list[str] = field(default_factory=list)  # URLs of every request beyond the page itself
    screenshot: Path | None = None  # PNG of the full page
    text: str = ""  # the page's visible text


class Browser:
    """One headless Chromium (Debian's, through playwright) for a test session; `open` loads a local
    HTML file with ALL network blocked and reports console errors and requests that tried to leave."""

    def __init__(self, artifacts: Path = ARTIFACTS):
        check_available("chromium")
        from playwright.sync_api import sync_playwright

        self.artifacts = Path(artifacts)
        self._pw = sync_playwright().start()
        args = CHROMIUM_ARGS + (["--no-sandbox"] if os.geteuid() == 0 else [])
        try:
            self._browser = self._pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        except Exception:
            self._pw.stop()
            raise

    @property
    def version(self) -> str:
        return self._browser.version

    def open(self, html_path, name: str = "page", serve: dict | None = None, settle_ms: int = 500,
             viewport=(1280, 900)) -> PageLoad:
        """Load `html_path` (a local file); every other request is recorded in `left_page` and aborted,
        except those whose URL starts with a key of `serve`, answered from that value (a Path or bytes)
        instead — for a third-party page that loads its libraries from a CDN. The full-page screenshot
        goes to `<artifacts>/<name>.png`."""
        page_url = Path(html_path).resolve().as_uri()
        serve = dict(serve or {})
        left, errors = [], []

        def route(r):
            url = r.request.url
            if url == page_url or url.startswith(("data:", "blob:", "about:")):
                return r.continue_()
            left.append(url)
            for prefix, body in serve.items():
                if url.startswith(prefix):
                    data = Path(body).read_bytes() if isinstance(body, (str, os.PathLike)) else bytes(body)
                    return r.fulfill(status=200, body=data, content_type=_content_type(url))
            return r.abort("blockedbyclient")

        context = self._browser.new_context(viewport={"width": viewport[0], "height": viewport[1]},
                                            service_workers="block")
        try:
            context.route("**/*", route)
            page = context.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
            page.goto(page_url, wait_until="load")
            page.wait_for_load_state("networkidle")
            page.wait_for_timeout(settle_ms)  # let deferred scripts (plot rendering) report errors
            self.artifacts.mkdir(parents=True, exist_ok=True)
            shot = self.artifacts / f"{safe_name(name)}.png"
            page.screenshot(path=str(shot), full_page=True)
            return PageLoad(url=page_url, title=page.title(), console_errors=errors, left_page=left,
                            screenshot=shot, text=page.inner_text("body"))
        finally:
            context.close()

    def close(self) -> None:
        try:
            self._browser.close()
        finally:
            self._pw.stop()


def _content_type(url: str) -> str:
    path = url.split("?", 1)[0]
    for ext, kind in ((".js", "application/javascript"), (".css", "text/css"), (".svg", "image/svg+xml"),
                      (".png", "image/png"), (".woff2", "font/woff2"), (".json", "application/json")):
        if path.endswith(ext):
            return kind
    return "application/octet-stream"


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:150] or "page"


def main(argv: list[str]) -> int:
    """`python tests/clients.py install [pycoqc nanoplot]`: build the QC venvs (ci/test.sh), timed."""
    if not argv or argv[0] != "install":
        print("usage: python tests/clients.py install [pycoqc] [nanoplot]", file=sys.stderr)
        return 2
    for tool in argv[1:] or list(QC_TOOLS):
        try:
            spent = install(tool, quiet=True)
        except ClientMissing as exc:
            print(f"clients: {exc}", file=sys.stderr)
            return 1
        where = venv_dir(tool)
        print(f"clients: {tool} venv {where} " + (f"built in {spent:.1f}s" if spent else "ready (pins unchanged)"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
