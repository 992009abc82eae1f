"""Helpers for tests and demos that need a `dorado` on PATH."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

# The folder holding the `ledgerbc` package, so the stand-in runs this very tree even when not installed.
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def install_fake_dorado(bin_dir) -> Path:
    """Write an executable `bin_dir/dorado` that runs `ledgerbc.simulated_dorado`; return its path."""
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "dorado"
    root = shlex.quote(str(_PACKAGE_ROOT))
    script.write_text(
        "#!/bin/sh\n"
        f'PYTHONPATH={root}"${{PYTHONPATH:+:$PYTHONPATH}}"\n'
        "export PYTHONPATH\n"
        f'exec {shlex.quote(sys.executable)} -m ledgerbc.simulated_dorado "$@"\n',
        encoding="utf-8",
    )
    script.chmod(0o755)
    return script
