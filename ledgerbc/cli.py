"""The `ledgerbc` command: parse, call one library function, print. No SQL here.

Every option can also be given as `LEDGERBC_<OPTION>` in the environment (e.g. LEDGERBC_LEDGER), except
the flags in NO_ENV. Exit codes are those of `ledgerbc.errors` (documented in the README); every error,
a bad option value included, is one `Error: ...` line. Only click and light modules are imported here:
each command imports what it uses, so `--help` and the error paths answer at once.
"""

import contextlib
import json
import time
import traceback
from pathlib import Path

import click

from . import __version__, errors, progress
from .units import parse_duration, parse_size

# Flags never read from the environment: a `LEDGERBC_FORCE=1` left in a shell (or inherited by a Slurm job)
# must not turn a routine command into a destructive or wider one. Documented in the README.
NO_ENV = frozenset({"--force", "--rebuild", "--partial", "--all-failed", "--allow-dorado-upgrade", "--set-model"})
USAGE = 2  # click's own code for a command line it cannot parse (unknown option, missing argument)


def opt(*names, **kwargs):
    """A click option that can also come from LEDGERBC_<NAME> (unless it is in NO_ENV)."""
    long = next(n for n in names if n.startswith("--")).split("/")[0]  # "--on/--off": named after --on
    if long in NO_ENV:
        kwargs["help"] = f"{kwargs.get('help', '')} Command line only (never read from LEDGERBC_*).".strip()
    else:
        kwargs.setdefault("envvar", "LEDGERBC_" + long[2:].replace("-", "_").upper())
        kwargs.setdefault("show_envvar", True)
    return click.option(*names, **kwargs)


class Parsed(click.ParamType):
    """A value written as users write it (units.py: `15m`, `20G`); its BadInput message becomes the error."""

    def __init__(self, name: str, parse):
        self.name, self.parse = name, parse

    def convert(self, value, param, ctx):
        try:
            return self.parse(value)
        except errors.BadInput as exc:
            self.fail(str(exc), param, ctx)


class Whole(click.ParamType):
    """A whole number of at least `minimum`."""

    name = "N"

    def __init__(self, minimum: int):
        self.minimum = minimum

    def convert(self, value, param, ctx):
        try:
            number = int(value)
        except (TypeError, ValueError):
            self.fail(f"'{value}' is not a whole number. Give one of at least {self.minimum}, like {self.minimum + 1}.",
                      param, ctx)
        if number < self.minimum:
            self.fail(f"{number} is too small. Give {self.minimum} or more.", param, ctx)
        return number


DURATION, SIZE = Parsed("DURATION", parse_duration), Parsed("SIZE", parse_size)

ledger_option = opt("--ledger", "ledger_path", type=click.Path(dir_okay=True, path_type=Path),
                    help="The ledger file (default: $LEDGERBC_LEDGER).")


def one_line(exc: click.UsageError) -> click.ClickException:
    """Click's usage errors as one `Error: ...` line (never the usage block): a bad option value exits 3
    (bad input, as when the library refuses a value), a command line click cannot parse exits 2."""
    ctx = exc.ctx
    where = ctx.command_path if ctx is not None else "ledgerbc"
    if isinstance(exc, click.BadParameter) and not isinstance(exc, click.MissingParameter) and exc.param is not None:
        param = exc.param
        name = param.human_readable_name if param.param_type_name == "argument" else max(param.opts, key=len)
        if ctx is not None and ctx.get_parameter_source(param.name) == click.core.ParameterSource.ENVIRONMENT:
            name = f"{name} (from {param.envvar})"
        error = click.ClickException(f"invalid value for {name}: {exc.message}")
        error.exit_code = errors.BadInput.exit_code
        return error
    message = exc.format_message().strip()
    message = message[:1].lower() + message[1:] + ("" if message.endswith((".", "?")) else ".")
    error = click.ClickException(f"{message} See `{where} --help`.")
    error.exit_code = USAGE
    return error


class LedgerGroup(click.Group):
    """Turns every LedgerError into one `Error: ...` line and its exit code; tracebacks only with --debug.
    Click's usage errors become one line too (`one_line`)."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            raise one_line(exc) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except errors.LedgerError as exc:
            if ctx.meta.get("ledgerbc.debug"):
                traceback.print_exc()
            for line in str(exc).splitlines() or [""]:
                click.echo(f"Error: {line}", err=True)
            ctx.exit(exc.exit_code)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            raise one_line(exc) from None
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("Error: interrupted.", err=True)
            ctx.exit(130)
        except Exception as exc:  # a bug, not bad input: say so in one line, never lose the trace with --debug
            if ctx.meta.get("ledgerbc.debug"):
                raise
            click.echo(
                f"Error: internal error {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}. Re-run with --debug "
                "and report it.", err=True
            )
            ctx.exit(1)


@click.group(cls=LedgerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ledgerbc")
@opt("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def cli(ctx, debug):
    """Basecall every pod5 file of a study exactly once, across Slurm array tasks, with one SQLite ledger."""
    ctx.meta["ledgerbc.debug"] = debug


def ledger_path_given(ledger_path) -> Path:
    """The --ledger path, or the one-line error (exit 4) when neither --ledger nor LEDGERBC_LEDGER is set."""
    if ledger_path is None:
        raise errors.LedgerNotFound(
            "no ledger given. Pass --ledger PATH or set LEDGERBC_LEDGER (`ledgerbc init` prints the line)."
        )
    return Path(ledger_path)


def open_ledger(ledger_path):
    """The ledger at --ledger, refused before anything is imported or created beside it when it is not one."""
    from . import ledgerfile

    path = ledgerfile.check(ledger_path_given(ledger_path))
    from .db import Ledger

    return Ledger(path)


# -- init / scan / status ----------------------------------------------------------------------------
@cli.command()
@click.argument("input_dir", type=click.Path(path_type=Path, readable=False))  # checked by init_ledger: exit 3
@click.argument("output_dir", type=click.Path(path_type=Path))
@ledger_option
@opt("--model", "models", multiple=True, metavar="[CHEMISTRY=]MODEL",
     help="dorado model: a variant (default hac), a model name or a model folder; repeat with "
          "CHEMISTRY=MODEL (a dorado chemistry name, e.g. rna004_130bps, or a run info key FLOWCELL|KIT|RATE) "
          "to give a chemistry its own model.")
@opt("--batch-files", type=Whole(1), default=None, help="Files per batch (instead of --batch-size).")
@opt("--batch-size", default="20G", show_default=True, type=SIZE, help="Bytes of pod5 per batch, e.g. 20G or 500M.")
@opt("--lease", default="15m", show_default=True, type=DURATION,
     help="A batch without a heartbeat this long is redone elsewhere (90s, 15m, 2h).")
@opt("--heartbeat", default="60s", show_default=True, type=DURATION,
     help="How often a worker renews the lease of its batch; well under --lease.")
@opt("--clock-skew", default="60s", show_default=True, type=DURATION,
     help="Margin for nodes whose clocks differ, added to --lease before a batch is redone.")
@opt("--max-attempts", default=3, show_default=True, type=Whole(1),
     help="Tries per file (a lost or crashed batch counts one) before the file is failed.")
@opt("--min-qscore", default=0.0, show_default=True, type=float, help="Reads below go to fail/.")
@opt("--emit", type=click.Choice(["fastq", "fastq.gz", "bam"]), default="fastq", show_default=True,
     help="Output format of pass/ and fail/ files (bam keeps every dorado tag).")
@opt("--kit-name", default=None, help="Barcoding kit (dorado's exact name): dorado classifies reads while it "
     "basecalls; outputs go to pass|fail/<barcode>/.")
@opt("--sample-sheet", type=click.Path(path_type=Path), default=None,
     help="dorado sample sheet (CSV) naming aliases for barcodes; init keeps a copy in OUTPUT_DIR.")
@opt("--dorado", default="dorado", show_default=True, help="The dorado executable.")
@opt("--dorado-arg", "dorado_args", multiple=True, help="Extra argument for dorado (repeatable).")
@opt("--models-directory", default=None, help="dorado --models-directory (GPU nodes are often offline).")
@opt("--batch-timeout", default=None, type=DURATION, help="Kill dorado after this long on one batch.")
@opt("--settle", default="60s", show_default=True, type=DURATION, help="Follow mode: unchanged this long = complete.")
@opt("--allow-dorado-upgrade", is_flag=True,
     help="Let workers with a newer dorado than the study's join (default: they refuse, exit 13).")
def init(input_dir, output_dir, ledger_path, models, batch_files, batch_size, lease, heartbeat, clock_skew,
         max_attempts, min_qscore, emit, kit_name, sample_sheet, dorado, dorado_args, models_directory, batch_timeout,
         settle, allow_dorado_upgrade):
    """Create the ledger for INPUT_DIR's pod5 files, outputs under OUTPUT_DIR, and scan."""
    from .create import init_ledger
    from .modelplan import DEFAULT_MODEL, parse_model_option
    from .settings import Settings

    model, chemistry_models = parse_model_option(models)
    settings = Settings(
        input_dir=str(input_dir), output_dir=str(output_dir), model=model or DEFAULT_MODEL,
        chemistry_models=chemistry_models, allow_dorado_upgrade=allow_dorado_upgrade, batch_files=batch_files,
        batch_bytes=None if batch_files else batch_size, lease=lease, heartbeat=heartbeat, clock_skew=clock_skew,
        max_attempts=max_attempts, min_qscore=min_qscore, emit=emit, dorado=dorado, dorado_args=list(dorado_args),
        models_directory=models_directory, batch_timeout=batch_timeout, settle=settle, kit_name=kit_name,
        sample_sheet=str(sample_sheet) if sample_sheet else None,
    )
    with scanning() as update:
        path, report, warnings = init_ledger(settings, ledger_path, progress=update)
    for w in warnings + report.warnings:
        click.echo(f"Warning: {w}", err=True)
    click.echo(f"ledger created: {path}")
    click.echo(report.summary())
    click.echo("next: `ledgerbc doctor` (filesystem, locks, clock, dorado), then `ledgerbc submit --tasks N` "
               "(N workers, one GPU each)")
    click.echo(f"export LEDGERBC_LEDGER={_shell_quote(path)}")


@contextlib.contextmanager
def scanning(label: str = "scanning"):
    """A `progress(done, total)` callback for a long operation: in place on a terminal, silent in a log."""
    counter = progress.Counter(label)
    try:
        yield counter
    finally:
        counter.close()


def _shell_quote(path) -> str:
    import shlex

    return shlex.quote(str(path))


@cli.command()
@ledger_option
def scan(ledger_path):
    """Add new complete pod5 files to the ledger (idempotent)."""
    ledger = open_ledger(ledger_path)  # first: a wrong path is refused before the heavy imports
    from .scan import Scanner

    with scanning() as update:
        report = Scanner(ledger, ledger.read_settings()).scan(progress=update)
    for w in report.warnings:
        click.echo(f"Warning: {w}", err=True)
    click.echo(report.summary())


@cli.command()
@ledger_option
@opt("--json", "as_json", is_flag=True, help="Machine-readable (schema in the README).")
@opt("--watch", default=None, type=DURATION, help="Redraw every SECONDS until interrupted (Ctrl-C).")
def status(ledger_path, as_json, watch):
    """Progress, workers, failures and duplicates."""
    ledger = open_ledger(ledger_path)
    from . import status as status_mod


    def text():
        data = status_mod.report(ledger)
        return json.dumps(data, indent=2) if as_json else status_mod.render(data)

    if not watch:
        click.echo(text())
        return
    screen = progress.Screen()
    try:
        while True:
            screen.show(text())
            time.sleep(watch)
    except KeyboardInterrupt:  # how a watch ends: not an error
        return


@cli.command("settings")
@ledger_option
@opt("--allow-dorado-upgrade/--forbid-dorado-upgrade", "allow_upgrade", default=None,
     help="Let workers with a newer dorado than the study's join (status shows every version), or not.")
@opt("--set-model", "models", multiple=True, metavar="[CHEMISTRY=]MODEL",
     help="Give a chemistry its own model (or change the default): refused where a file was already "
          "basecalled with another model.")
def settings_command(ledger_path, allow_upgrade, models):
    """Show the study's settings, or change the few that may change mid-study."""
    from .provenance import change_settings

    ledger = open_ledger(ledger_path)
    if allow_upgrade is None and not models:
        for key, value in sorted(ledger.read_settings().to_dict().items()):
            click.echo(f"{key} = {json.dumps(value)}")
        return
    lines = change_settings(ledger, allow_upgrade, models)
    for line in lines or ["nothing changed"]:
        click.echo(line)


@cli.command()
@ledger_option
@opt("--all-failed", is_flag=True, help="Every failed file.")
@click.argument("files", nargs=-1)
def retry(ledger_path, all_failed, files):
    """Queue failed files again (all, or those named by their path relative to INPUT_DIR)."""
    ledger = open_ledger(ledger_path)
    from .claim import retry_failed
    from .scan import Scanner

    if not all_failed and not files:
        raise errors.BadInput("name the files to retry, or pass --all-failed.")
    n = retry_failed(ledger, None if all_failed else list(files))
    report = Scanner(ledger, ledger.read_settings()).scan()  # re-checks files that failed admission
    click.echo(f"{n} failed files queued again; {report.summary()}")


@cli.command()
@ledger_option
@opt("--worker-id", default=None, help="Default: <array job>_<task>@<host>, or <pid>@<host> off Slurm.")
@opt("--device", default=None, help="dorado --device, e.g. cuda:0 (default: dorado's own choice).")
@opt("--follow", is_flag=True, help="Keep scanning for new files while the sequencer writes.")
@opt("--idle-exit", default=None, type=DURATION, help="With --follow: exit after this long with nothing new.")
@opt("--max-batches", default=None, type=Whole(1), help="Exit after this many batches.")
@opt("--log-level", default="INFO", show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
     help="How much the worker logs (to stderr: the Slurm task's log).")
@click.pass_context
def run(ctx, ledger_path, worker_id, device, follow, idle_exit, max_batches, log_level):
    """The worker loop: claim, basecall, publish, until no work is left. What slurm_array.sh execs."""
    import logging

    from .layout import WORKER_ID_OK

    if worker_id is not None and not WORKER_ID_OK.match(worker_id):
        raise errors.BadInput(f"--worker-id '{worker_id}' may only hold letters, digits and . _ @ : + -")
    ledger = open_ledger(ledger_path)
    from .run import StopFlag, Worker, WorkerOptions

    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    stop = StopFlag()
    stop.install()
    worker = Worker.open(
        ledger,
        WorkerOptions(worker_id=worker_id, device=device, follow=follow, idle_exit=idle_exit, max_batches=max_batches),
        stop=stop,
    )
    ctx.exit(worker.run())


@cli.command()
@ledger_option
@opt("--rebuild", is_flag=True, help="Recreate a lost or corrupt ledger from the files on disk.")
@opt("--input", "input_dir", type=click.Path(path_type=Path), help="With --rebuild: INPUT_DIR.")
@opt("--output", "output_dir", type=click.Path(path_type=Path), help="With --rebuild: OUTPUT_DIR.")
@opt("--force", is_flag=True, help="Reclaim every running batch whose lease is not being renewed, without "
     "counting an attempt (after a cluster-wide crash). With --rebuild: accept an --input/--output other than "
     "the folders ledgerbc.settings.json records.")
def recover(ledger_path, rebuild, input_dir, output_dir, force):
    """Reclaim expired batches, clean dead work folders, reconcile the ledger with the outputs."""
    if rebuild:
        if not input_dir or not output_dir:
            raise errors.BadInput("--rebuild needs --input DIR and --output DIR (the folders given to init).")
        from .rebuild import rebuild_ledger

        with scanning() as update:
            path, lines = rebuild_ledger(input_dir, output_dir, ledger_path, force=force, progress=update)
        for line in lines:
            click.echo(line)
        click.echo(f"ledger rebuilt: {path}")
        click.echo(f"export LEDGERBC_LEDGER={_shell_quote(path)}")
        return
    ledger = open_ledger(ledger_path)
    from . import janitor

    report = janitor.recover(ledger, force=force)
    for line in report.lines():
        click.echo(line)


@cli.command()
@ledger_option
@opt("--deep", is_flag=True, help="Also read every pod5 and every output: each read id exactly once.")
@click.pass_context
def verify(ctx, ledger_path, deep):
    """Check the ledger against the outputs on disk, changing nothing (run it before deleting raw data).

    One line per violation, `<rel path>: <what is wrong>`; exit 0 only when every invariant holds, 14 otherwise.
    """
    from . import verify as verify_mod

    report = verify_mod.verify(open_ledger(ledger_path), deep=deep)
    for line in report.lines():
        click.echo(line)
    click.echo(report.summary(), err=True)
    ctx.exit(0 if report.ok else verify_mod.EXIT_VIOLATIONS)


@cli.command()
@ledger_option
def upgrade(ledger_path):
    """Upgrade a ledger written by an older ledgerbc (stop all workers first; a backup is kept)."""
    ledger = open_ledger(ledger_path)
    from .migrate import upgrade_ledger

    before, after, backup = upgrade_ledger(ledger)
    if before == after:
        click.echo(f"ledger is already at schema {after}")
    else:
        click.echo(f"ledger upgraded from schema {before} to {after}; backup at {backup}")


@cli.command()
@opt("--dir", "folder", default="demo-run", show_default=True, type=click.Path(path_type=Path),
     help="Where the demo's input, output and ledger go.")
@opt("--workers", default=4, show_default=True, type=Whole(1), help="Local worker processes.")
@opt("--files", default=60, show_default=True, type=Whole(0), help="Synthetic pod5 files to add.")
@opt("--testdata", default=None, type=click.Path(exists=True, file_okay=False, path_type=Path), help="Real pod5 folder to include "
     "(default: ../shared/testdata/real-pod5 when present).")
@click.pass_context
def demo(ctx, folder, workers, files, testdata):
    """Run the whole thing locally on an embedded dataset (simulated basecalls without dorado)."""
    from .demo import default_testdata, run_demo

    left = run_demo(folder, workers=workers, files=files, testdata=testdata or default_testdata(), echo=click.echo)
    ctx.exit(0 if left == 0 else 1)


# -- final products ------------------------------------------------------------------------------------
@cli.command()
@ledger_option
@opt("--partial", is_flag=True, help="Go ahead while files are unfinished: products of the done files only.")
def finalize(ledger_path, partial):
    """Per-sample products, sequencing_summary.txt and report.html in OUTPUT_DIR/final."""
    ledger = open_ledger(ledger_path)  # first: a wrong path is refused before the heavy imports
    from .finalize import finalize as make_products

    with scanning("finalizing") as update:
        result = make_products(ledger, partial=partial, progress=update)
    for w in result.warnings:
        click.echo(f"Warning: {w}", err=True)
    for line in result.lines():
        click.echo(line)


@cli.command()
@ledger_option
@opt("-o", "--html", "output", default=None,  # not --output: LEDGERBC_OUTPUT is recover's OUTPUT_DIR
     help="Write the page here ('-': standard output). Default: OUTPUT_DIR/final/report.html.")
def report(ledger_path, output):
    """The run report alone: one self-contained HTML page (works offline)."""
    ledger = open_ledger(ledger_path)
    from .report import render_report, save_report

    if output == "-":
        click.echo(render_report(ledger), nl=False)
    else:
        click.echo(f"report written: {save_report(ledger, output)}")


# -- Slurm and health ----------------------------------------------------------------------------------
@cli.command()
@ledger_option
@opt("--tasks", type=Whole(1), required=True, help="Array tasks (workers) to start.")
@opt("--partition", default=None, help="sbatch --partition.")
@opt("--time", default=None, help="sbatch --time (per task), e.g. 12:00:00.")
@opt("--gpus-per-task", default=1, show_default=True, type=Whole(0),
     help="GPUs per task (Slurm gres); 0 on a cluster without GPU gres.")
@opt("--account", default=None, help="sbatch --account.")
@opt("--cpus-per-task", default=None, type=Whole(1), help="sbatch --cpus-per-task.")
@opt("--mem", default=None, help="sbatch --mem, e.g. 32G.")
@opt("--run-arg", "run_args", multiple=True,
     help="An option for every task's `ledgerbc run` (repeatable), e.g. --run-arg=--follow.")
@opt("--finalize", "then_finalize", is_flag=True,
     help="Also submit `ledgerbc finalize` (no GPU), started when the array has ended (afterany).")
@opt("--finalize-partition", default=None, help="sbatch --partition of the finalize job (default: the cluster's).")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def submit(ledger_path, tasks, partition, time, gpus_per_task, account, cpus_per_task, mem, run_args, then_finalize,
           finalize_partition, extra):
    """Submit a Slurm array of workers (slurm_array.sh); sbatch options after `--` go to sbatch."""
    import shlex

    from . import ledgerfile, limits, slurm

    ledger = ledgerfile.check(ledger_path_given(ledger_path)).absolute()
    said = limits.warning(tasks, f"--tasks {tasks}")
    if said:
        click.echo(f"Warning: {said}", err=True)
    options = dict(partition=partition, time=time, gpus_per_task=gpus_per_task, account=account,
                   cpus_per_task=cpus_per_task, mem=mem, extra=extra, run_args=run_args)
    job_id = slurm.submit(ledger, tasks, **options)
    click.echo(f"submitted array job {job_id} ({tasks} tasks)")
    click.echo(f"sbatch command: {shlex.join(slurm.build_sbatch_argv(ledger, tasks, **options))}")
    if then_finalize:
        final_id = slurm.submit_finalize(ledger, job_id, partition=finalize_partition, account=account)
        click.echo(f"submitted finalize job {final_id} (starts when array job {job_id} has ended)")
        argv = slurm.build_finalize_argv(ledger, job_id, partition=finalize_partition, account=account)
        click.echo(f"sbatch command: {shlex.join(argv)}")
    click.echo(f"watch it: ledgerbc status --ledger {shlex.quote(str(ledger))} --watch 30")


@cli.command()
@ledger_option
@click.pass_context
def doctor(ctx, ledger_path):
    """Check the ledger's filesystem (mount, locks), clock, content, and dorado with its model."""
    from . import doctor as doctor_mod
    from .db import Ledger

    checks = doctor_mod.run_checks(Ledger(ledger_path_given(ledger_path)))  # doctor reports a bad path itself
    for check in checks:
        click.echo(check.line())
    ctx.exit(doctor_mod.exit_code(checks))


def main():
    cli(prog_name="ledgerbc")


if __name__ == "__main__":
    main()
