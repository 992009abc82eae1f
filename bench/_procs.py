"""Shared harness of the multi-process benchmarks (claim.py, ceiling.py, scale_limit.py).

`run_workers` forks N processes that wait at one barrier, run `target(index, *args)` and hand back a
JSON-able dict through a result file; `bench_folders` gives a fresh folder on local disk, or the same
fresh folder reached through each GlusterFS mount (half the processes use each: two clients, as two
hosts would be).
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import tempfile
import traceback
import uuid
from pathlib import Path

from _fill import gluster_mounts


def places(where: str) -> list[tuple[str, list[Path] | None]]:
    """[(name, mounts)] for a comma list of `local`/`gluster`; mounts None for local disk. Prints skips."""
    out = []
    for name in where.split(","):
        if name == "local":
            out.append(("local", None))
        elif name == "gluster":
            mounts = gluster_mounts()
            if mounts:
                out.append(("gluster", [Path(m) for m in mounts]))
            else:
                print("gluster: skipped (LEDGERBC_TEST_GLUSTER_A/B not set or not mounted; ci/cluster-up.sh sets them)")
        else:
            raise SystemExit(f"--where: unknown place {name!r} (local, gluster)")
    return out


@contextlib.contextmanager
def bench_folders(mounts: list[Path] | None, prefix: str):
    """A fresh folder (a list: one path per mount of the same folder), removed afterwards."""
    sub = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if mounts is None:
        folders = [Path(tempfile.mkdtemp(prefix=sub, dir="/tmp"))]
    else:
        folders = [m / sub for m in mounts]
        folders[0].mkdir()
    try:
        yield folders
    finally:
        shutil.rmtree(folders[0], ignore_errors=True)


def _child(target, index, args, barrier, out_path):
    try:
        result = target(index, barrier, *args)
        Path(out_path).write_text(json.dumps({"ok": True, **result}))
    except BaseException:  # noqa: BLE001 - the parent reports it
        Path(out_path).write_text(json.dumps({"ok": False, "error": traceback.format_exc()}))
        raise


def run_workers(target, procs: int, args_of, scratch: Path, timeout: float) -> list[dict]:
    """Fork `procs` processes running `target(i, barrier, *args_of(i))`; their result dicts, in order.

    `target` must call `barrier.wait()` once it is ready, so every process starts measuring together.
    """
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(procs)
    outs = [scratch / f"result-{uuid.uuid4().hex[:6]}-{i}.json" for i in range(procs)]
    ps = [ctx.Process(target=_child, args=(target, i, args_of(i), barrier, str(outs[i]))) for i in range(procs)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(timeout)
    for p in ps:  # only our own processes, by handle
        if p.is_alive():
            p.kill()
            p.join()
    missing = [(o.name, p.exitcode) for o, p in zip(outs, ps) if not o.exists()]
    if missing:
        raise SystemExit(f"benchmark processes ended without a result (file, exit code): {missing[:4]}")
    results = [json.loads(o.read_text()) for o in outs]
    for o in outs:
        o.unlink()
    bad = [r["error"] for r in results if not r["ok"]]
    if bad:
        raise SystemExit(f"a benchmark process failed:\n{bad[0]}")
    return results


def load() -> float:
    return round(os.getloadavg()[0], 2)
