"""INPUT_DIR/OUTPUT_DIR inside the ledger's folder are stored relative to it, so a worker reaching the
shared filesystem through another mount point finds them through its own path to the ledger."""
from __future__ import annotations

import json
import os

import sqlalchemy as sa

from ledgerbc import db, models
from ledgerbc.create import init_ledger
from ledgerbc.settings import Settings
from ledgerbc.testkit.synth import make_dataset


def stored(ledger) -> dict:
    rows = ledger.transact(lambda c: c.execute(sa.select(models.Setting.key, models.Setting.value)).all())
    return {k: json.loads(v) for k, v in rows}


def test_paths_inside_the_ledger_folder_follow_the_mount(tmp_path):
    study = tmp_path / "mount-a" / "study"
    make_dataset(study / "input", 2, hostile_names=False, size_spread=False)
    path, _report, _w = init_ledger(
        Settings(input_dir=str(study / "input"), output_dir=str(study / "output"), batch_files=1),
        study / "ledger.db",
    )
    raw = stored(db.Ledger(path))
    assert (raw["input_dir"], raw["output_dir"]) == ("input", "output")
    # the default place, OUTPUT_DIR/ledgerbc.db, stores OUTPUT_DIR as "."
    (tmp_path / "mount-b").symlink_to(tmp_path / "mount-a")  # a second path to the same files
    other = db.Ledger(tmp_path / "mount-b" / "study" / "ledger.db").read_settings()
    assert other.input_dir == str(tmp_path / "mount-b" / "study" / "input")
    assert other.output_dir == str(tmp_path / "mount-b" / "study" / "output")
    # the settings file beside the outputs keeps absolute paths (what `recover --rebuild` is given anyway)
    assert json.loads((study / "output" / "ledgerbc.settings.json").read_text())["input_dir"] == str(study / "input")


def test_default_ledger_place_and_paths_outside_stay_absolute(tmp_path):
    make_dataset(tmp_path / "input", 1, hostile_names=False, size_spread=False)
    path, _r, _w = init_ledger(Settings(input_dir=str(tmp_path / "input"), output_dir=str(tmp_path / "out")))
    raw = stored(db.Ledger(path))
    assert raw["output_dir"] == "." and raw["input_dir"] == str(tmp_path / "input")
    settings = db.Ledger(path).read_settings()
    assert settings.output_dir == str(tmp_path / "out") and settings.input_dir == str(tmp_path / "input")


def test_absolute_paths_of_older_ledgers_are_kept(tmp_path):
    s = Settings(input_dir="/somewhere/in", output_dir="/elsewhere/out")
    assert s.resolved(tmp_path) == s
    assert s.stored_for(tmp_path) == s
    inside = Settings(input_dir=str(tmp_path / "a" / ".." / "in"), output_dir=os.fspath(tmp_path))
    assert (inside.stored_for(tmp_path).input_dir, inside.stored_for(tmp_path).output_dir) == ("in", ".")
