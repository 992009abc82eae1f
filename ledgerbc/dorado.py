"""Running dorado (DESIGN §5): an argv list (never a shell), BAM to a file, stderr to the batch log.

dorado has no SIGTERM handler, so stopping it is SIGTERM to its process group, a short grace, then SIGKILL.
"""

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

from .errors import BadInput

STOP_GRACE = 3.0
_VERSION_LINE = re.compile(r"^\d+\.\d+\.\d+(\+\S+)?$")


def build_argv(settings, assigned_dir: Path, device: str | None, executable: str | None = None,
               model: str | None = None) -> list[str]:
    """`dorado basecaller MODEL DIR ...`; `model`: the batch's own (modelplan.model_for), else the default."""
    argv = [executable or settings.dorado, "basecaller", model or settings.model, str(assigned_dir)]
    if device:
        argv += ["--device", device]
    if settings.models_directory:
        argv += ["--models-directory", settings.models_directory]
    if settings.kit_name:  # dorado classifies barcodes while it basecalls: BC:Z on every classified record
        argv += ["--kit-name", settings.kit_name]
        if settings.sample_sheet:
            argv += ["--sample-sheet", str(settings.sample_sheet_path)]
    return argv + list(settings.dorado_args)


def find_executable(settings) -> str:
    """dorado's full path, or a one-line error saying how to provide it."""
    found = shutil.which(settings.dorado)
    if not found:
        raise BadInput(
            f"dorado executable '{settings.dorado}' not found on PATH. Load it (e.g. `module load dorado`) "
            "or give its path with `ledgerbc init --dorado PATH`."
        )
    return found


def missing_warning(settings) -> str | None:
    """A warning for `init` when dorado is not found here (it may still be on the GPU nodes' PATH)."""
    if shutil.which(settings.dorado):
        return None
    return (f"dorado ('{settings.dorado}') is not found on PATH here; every worker needs it on its own. Provide it "
            "with `module load dorado` (in the job too), or init with `--dorado PATH`; `ledgerbc doctor` checks it.")


class DoradoProcess:
    """One dorado run: started in its own session so the whole process group can be stopped."""

    def __init__(self, argv: list[str], bam_path: Path, log_path: Path, env=None):
        self.argv = argv
        self.bam_path = bam_path
        self.log_path = log_path
        bam_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(bam_path, "wb") as out, open(log_path, "ab") as err:
            gpus = (env if env is not None else os.environ).get("CUDA_VISIBLE_DEVICES")
            where = f" (CUDA_VISIBLE_DEVICES={gpus})" if gpus is not None else ""
            err.write(("[ledgerbc] running: " + " ".join(_quote(a) for a in argv) + where + "\n").encode())
            err.flush()
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True, env=env
            )

    def poll(self, timeout: float) -> int | None:
        """Wait up to `timeout` seconds; the exit status, or None while it runs."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = STOP_GRACE) -> int:
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            if self.poll(grace) is None:
                self._signal(signal.SIGKILL)
        return self.proc.wait()

    def _signal(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


# dorado options that --dorado-arg may not pass (DESIGN §5), and what to use instead. They break the
# contract (reads dropped or written elsewhere, outputs not per input, a read twice), or are ledgerbc's own.
REFUSED_ARGS = {
    "--min-qscore": "`ledgerbc init --min-qscore Q` (dorado writing to stdout drops the reads under it; ledgerbc "
                    "puts them in fail/)",
    "--emit-fastq": "`ledgerbc init --emit fastq` (dorado's FASTQ has no fn/pi tags, so reads cannot be split per input)",
    "--emit-sam": "`ledgerbc init --emit bam` (ledgerbc reads dorado's BAM and writes each input's output)",
    "--emit-summary": "nothing: ledgerbc writes summary/<rel>.tsv per input and `ledgerbc finalize` the merged one",
    "--output-dir": "the OUTPUT_DIR argument of `ledgerbc init` (dorado must write to stdout)",
    "-o": "the OUTPUT_DIR argument of `ledgerbc init` (dorado must write to stdout)",
    "--resume-from": "nothing: ledgerbc redoes only unfinished batches (`ledgerbc recover`, `ledgerbc retry`)",
    "--max-reads": "nothing: every read of every input is basecalled (a cut would leave reads missing)",
    "-n": "nothing: every read of every input is basecalled (a cut would leave reads missing)",
    "--read-ids": "nothing: every read of every input is basecalled (a read-id list would leave reads missing)",
    "-l": "nothing: every read of every input is basecalled (a read-id list would leave reads missing)",
    "--reference": "`dorado aligner` on the products of `ledgerbc finalize` (aligned output holds a read more than once)",
    "--device": "`ledgerbc run --device` (per worker; Slurm's CUDA_VISIBLE_DEVICES picks the GPU)",
    "-x": "`ledgerbc run --device` (per worker; Slurm's CUDA_VISIBLE_DEVICES picks the GPU)",
    "--models-directory": "`ledgerbc init --models-directory DIR`",
    "--kit-name": "`ledgerbc init --kit-name KIT` (outputs per barcode)",
    "--sample-sheet": "`ledgerbc init --sample-sheet CSV` (with --kit-name)",
}


def refused_args(args) -> list[str]:
    """One line per `--dorado-arg` value that dorado must not be given, naming what to use instead.
    Matches `--opt`, `--opt=value` and a short option with its value attached (`-oDIR`)."""
    out = []
    for arg in args:
        name = arg.split("=", 1)[0]
        if name not in REFUSED_ARGS and len(arg) > 2 and arg[0] == "-" and arg[1] != "-":
            name = arg[:2]
        if name in REFUSED_ARGS:
            out.append(f"--dorado-arg {arg} is refused: it would break ledgerbc's contract or is ledgerbc's own "
                       f"option. Use {REFUSED_ARGS[name]} instead.")
    return out


def query_version(executable: str, env=None, timeout: float = 120.0) -> tuple[str | None, str]:
    """Run `dorado --version`: (the version, what it printed), or (None, why there is none)."""
    try:
        proc = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"`{executable} --version` could not run: {exc}"
    said = (proc.stdout + proc.stderr).strip().splitlines()
    if proc.returncode != 0:
        return None, f"`{executable} --version` exited with status {proc.returncode}: {said[-1] if said else 'no output'}"
    found = version_from_output(proc.stdout, proc.stderr)
    if found is None:
        return None, f"`{executable} --version` printed no version ({said[-1] if said else 'no output'})"
    return found, found


def version_key(version: str) -> tuple[int, int, int]:
    """(major, minor, rev) of `X.Y.Z+hash`, to tell an upgrade from a downgrade."""
    head = version.split("+", 1)[0].split(".")
    nums = [int(p) if p.isdigit() else 0 for p in head[:3]]
    return tuple(nums + [0] * (3 - len(nums)))


def version_from_output(stdout: str, stderr: str) -> str | None:
    """The version `dorado --version` printed: `X.Y.Z+<hash>` alone on a line, on stderr (dorado < 1.3,
    after its `[info] Running: "--version"` log line) or stdout (>= 1.3). None if there is none."""
    for line in reversed((stdout + "\n" + stderr).splitlines()):
        line = line.strip()
        if _VERSION_LINE.match(line):
            return line
    return None


def error_lines(log_path: Path, limit: int = 200) -> list[str]:
    """dorado's `[error]` lines from a batch log (it may exit 0 after skipping a file)."""
    try:
        with open(log_path, "r", encoding="utf-8", errors="replace") as fh:
            return [line.strip() for line in fh if "[error]" in line][:limit]
    except OSError:
        return []


FULL_TEXTS = ("No space left on device", "Disk quota exceeded")


def said_disk_full(log_path: Path, tail: int = 1 << 16) -> bool:
    """Does the end of a batch log say a write failed for want of space (ENOSPC, EDQUOT)?"""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - tail))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return False
    return any(t in text for t in FULL_TEXTS)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
