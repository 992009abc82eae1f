"""What a new user meets besides errors: help on every option, the environment names, one version, fast
start-up (light commands import no heavy library), progress in place on a terminal and quiet in a log,
`status --watch`, and what `init` says next."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import ledgerbc
from ledgerbc import progress
from ledgerbc.cli import NO_ENV, cli
from ledgerbc.testkit import install_fake_dorado
from ledgerbc.testkit.synth import write_pod5

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("sqlalchemy", "alembic", "pod5", "pysam", "numpy", "pyarrow")


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, prog_name="ledgerbc")


def every_option():
    for name, command in sorted(cli.commands.items()):
        for param in command.params:
            if isinstance(param, click.Option):
                yield name, param
    for param in cli.params:
        if isinstance(param, click.Option) and param.name not in ("help", "version"):
            yield "(ledgerbc)", param


# -- help, environment names, version -----------------------------------------------------------------------
def test_every_option_has_help_text():
    missing = [f"{command} {param.opts[0]}" for command, param in every_option()
               if param.name != "help" and not (param.help or "").strip()]
    assert missing == []


def test_every_option_reads_its_environment_name_except_the_risky_flags():
    for command, param in every_option():
        long = max(param.opts, key=len)
        if param.name == "help":
            continue
        if long in NO_ENV:
            assert param.envvar is None, f"{command} {long} must not be read from the environment"
        else:
            assert param.envvar == "LEDGERBC_" + long[2:].replace("-", "_").upper(), f"{command} {long}"
    assert NO_ENV == {"--force", "--rebuild", "--partial", "--all-failed", "--allow-dorado-upgrade", "--set-model"}


def test_the_readme_lists_the_flags_never_read_from_the_environment():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("never read from the environment"):][:800]
    for flag in NO_ENV:
        assert f"`{flag}`" in section


def test_a_risky_flag_in_the_environment_does_nothing(tmp_path):
    result = invoke("recover", "--ledger", tmp_path / "none.db", env={"LEDGERBC_REBUILD": "1", "LEDGERBC_FORCE": "1"})
    assert result.exit_code == 4  # a plain recover (rebuild would have asked for --input and --output: exit 3)
    result = invoke("retry", "--ledger", tmp_path / "none.db", env={"LEDGERBC_ALL_FAILED": "1"})
    assert result.exit_code == 4


def test_one_version_everywhere():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"ledgerbc, version {ledgerbc.__version__}\n"
    assert metadata.version("ledgerbc") == ledgerbc.__version__  # setup.py reads it from ledgerbc/__init__.py
    bench = subprocess.run([sys.executable, str(REPO / "bench" / "claim.py"), "--help"], capture_output=True,
                           text=True, timeout=120)
    assert bench.returncode == 0
    versions = set(re.findall(r"\b\d+\.\d+(?:\.\d+)?\b(?= |\)|$)", bench.stdout))
    assert versions <= {ledgerbc.__version__}, bench.stdout


# -- start-up: what a light command imports ------------------------------------------------------------------
def imported_by(*args, cwd=None) -> tuple[int, list[str]]:
    """Run `ledgerbc ARGS` in a fresh interpreter; (exit code, the heavy modules it imported)."""
    code = (
        "import sys\nfrom ledgerbc.cli import main\nsys.argv = ['ledgerbc', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    status = exc.code\n"
        f"print(status, *[m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=120)
    status, *modules = proc.stderr.splitlines()[-1].split()
    return int(status), modules


def test_help_and_error_paths_import_no_heavy_library(tmp_path):
    (tmp_path / "README.md").write_text("# not a ledger\n")
    assert imported_by("--help") == (0, [])
    assert imported_by("status", "--help") == (0, [])
    assert imported_by("status", cwd=tmp_path) == (4, [])
    assert imported_by("status", "--ledger", "README.md", cwd=tmp_path) == (5, [])
    assert imported_by("run", "--ledger", "README.md", cwd=tmp_path) == (5, [])
    assert imported_by("init", "in", "out", "--lease", "abc", cwd=tmp_path) == (3, [])


def test_status_imports_sqlalchemy_only(make_ledger):
    ledger, _ = make_ledger(n_files=2)
    assert imported_by("status", "--ledger", ledger.path) == (0, ["sqlalchemy"])


# -- progress: in place on a terminal, sparse in a log ------------------------------------------------------
class Terminal(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_ticker_redraws_in_place_on_a_terminal():
    out, clock = Terminal(), Clock()
    ticker = progress.Ticker(out, tty_every=0.2, log_every=30, clock=clock)
    for n in range(5):
        ticker.update(f"{n}/4 files")
        clock.now += 0.1
    ticker.close("4/4 files")
    assert out.getvalue() == "\r0/4 files\033[K\r2/4 files\033[K\r4/4 files\033[K\r4/4 files\033[K\n"


def test_ticker_prints_a_line_now_and_then_in_a_log():
    out, clock = io.StringIO(), Clock()
    ticker = progress.Ticker(out, log_every=30, clock=clock)
    for n in range(100):  # 100 s of updates, one a second
        ticker.update(f"{n} done")
        clock.now += 1
    ticker.close("100 done")
    assert out.getvalue().splitlines() == ["0 done", "30 done", "60 done", "90 done", "100 done"]


def test_a_counter_is_silent_off_a_terminal_and_in_place_on_one():
    quiet = io.StringIO()
    counter = progress.Counter("scanning", quiet)
    for n in range(1, 301):
        counter(n, 300)
    counter.close()
    assert quiet.getvalue() == ""
    shown, clock = Terminal(), Clock()
    counter = progress.Counter("scanning", shown, clock=clock)
    counter(1, 300)
    counter(300, 300)
    counter.close()
    assert shown.getvalue() == "\rscanning 1/300 (0%)\033[K\rscanning 300/300 (100%)\033[K\n"


def test_a_screen_redraws_in_place_on_a_terminal_and_separates_reports_in_a_log():
    term = Terminal()
    screen = progress.Screen(term)
    screen.show("a\nb")
    screen.show("c")
    assert term.getvalue() == "\033[2J\033[Ha\033[K\nb\033[K\n\033[J" + "\033[Hc\033[K\n\033[J"
    log = io.StringIO()
    screen = progress.Screen(log)
    screen.show("a\nb")
    screen.show("c")
    assert log.getvalue() == "a\nb\n\nc\n"


def test_status_watch_without_a_terminal_prints_reports_separated_by_a_blank_line(make_ledger, monkeypatch):
    ledger, _ = make_ledger(n_files=2)
    naps = []

    def sleep(seconds):
        naps.append(seconds)
        if len(naps) == 2:
            raise KeyboardInterrupt  # Ctrl-C: how a watch ends

    monkeypatch.setattr("time.sleep", sleep)
    result = invoke("status", "--ledger", ledger.path, "--watch", "5s", "--json")
    assert result.exit_code == 0 and result.stderr == ""
    first, second = result.stdout.split("\n\n")
    assert json.loads(first)["files"]["pending"] == json.loads(second)["files"]["pending"] == 2
    assert naps == [5.0, 5.0]


# -- init: dorado, and what next ----------------------------------------------------------------------------------
def test_init_warns_when_dorado_is_missing_and_says_what_to_run_next(tmp_path):
    write_pod5(tmp_path / "in" / "a.pod5", 2, seed=1)
    result = invoke("init", tmp_path / "in", tmp_path / "out", "--dorado", "no-such-dorado")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "dorado" in line]
    assert warnings == [
        "Warning: dorado ('no-such-dorado') is not found on PATH here; every worker needs it on its own. Provide it "
        "with `module load dorado` (in the job too), or init with `--dorado PATH`; `ledgerbc doctor` checks it."]
    lines = result.stdout.splitlines()
    assert lines[-2] == ("next: `ledgerbc doctor` (filesystem, locks, clock, dorado), then `ledgerbc submit --tasks N` "
                         "(N workers, one GPU each)")
    assert lines[-1].startswith("export LEDGERBC_LEDGER=")


def test_init_with_dorado_found_does_not_warn_about_it(tmp_path):
    write_pod5(tmp_path / "in" / "a.pod5", 2, seed=1)
    dorado = install_fake_dorado(tmp_path / "bin")
    result = invoke("init", tmp_path / "in", tmp_path / "out", "--dorado", dorado)
    assert result.exit_code == 0, result.output
    assert "dorado" not in result.stderr


# -- the demo on a terminal ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_demo_shows_progress_in_place_on_a_terminal(tmp_path):
    import pty

    (tmp_path / "no-real-files").mkdir()  # only the synthetic files: a short demo
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ledgerbc.cli", "demo", "--dir", str(tmp_path / "demo"), "--files", "4",
         "--workers", "2", "--testdata", str(tmp_path / "no-real-files")],
        stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary, cwd=tmp_path, env=dict(os.environ),
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:  # the terminal closed: the demo has exited
            break
        if not data:
            break
        chunks.append(data)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.wait(timeout=300) == 0, text[-3000:]
    drawn = re.findall(r"\rprogress: (\d+)/(\d+) files done", text)
    assert drawn and drawn[-1] == ("4", "4"), text[-2000:]
    assert "workers finished" in text
