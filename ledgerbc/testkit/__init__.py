"""Test support that ships with the package, because `ledgerbc demo` uses it too.

- `testkit.dorado`: the stand-in `dorado` (follows the dorado facts of DESIGN §5);
- `testkit.synth`: synthetic pod5 datasets written with the real `pod5.Writer`;
- `install_fake_dorado(bin_dir)`: an executable `dorado` in `bin_dir` that runs the stand-in.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

# The folder holding the `ledgerbc` package, so the stand-in runs this very tree even when not installed.
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def install_fake_dorado(bin_dir) -> Path:
    """Write an executable `bin_dir/dorado` that runs `ledgerbc.testkit.dorado`; return its path."""
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "dorado"
    root = shlex.quote(str(_PACKAGE_ROOT))
    script.write_text(
        "#!/bin/sh\n"
        f'PYTHONPATH={root}"${{PYTHONPATH:+:$PYTHONPATH}}"\n'
        "export PYTHONPATH\n"
        f'exec {shlex.quote(sys.executable)} -m ledgerbc.testkit.dorado "$@"\n',
        encoding="utf-8",
    )
    script.chmod(0o755)
    return script
