"""A big scan inspects pod5 files in a process pool (scan._observe_all): same observations, same order."""
from __future__ import annotations

from ledgerbc import scan
from ledgerbc.testkit import synth


def test_the_process_pool_gives_the_same_observations_in_order(tmp_path, monkeypatch):
    root = tmp_path / "input"
    synth.make_dataset(root, 12, seed=3)
    synth.truncate_copy(root / "semi;colon.pod5", root / "cut.pod5")  # incomplete
    (root / "not-pod5.pod5").write_bytes(b"\x8bPOD\r\n\x1a\n" + b"junk" * 10 + b"\x8bPOD\r\n\x1a\n")  # unreadable
    todo = list(scan.walk(root))
    serial = [scan.observe(path, rel, st, busy) for rel, path, st, busy in todo]
    monkeypatch.setattr(scan, "PARALLEL_MIN_FILES", 1)
    monkeypatch.setattr(scan.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    pooled = list(scan._observe_all([(rel, path, st, busy) for rel, path, st, busy in todo]))
    assert pooled == serial
    assert [o.rel for o in pooled] == [rel for rel, *_ in todo]
    assert sum(o.info is not None for o in pooled) == 12 and sum(o.incomplete for o in pooled) == 1
