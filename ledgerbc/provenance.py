"""What made a study's outputs: one dorado version, one model per chemistry (DESIGN §5 provenance).

- The study's dorado version is pinned once: by `init` when dorado is on PATH (`create.py`), else by the
  first worker, atomically in the ledger's settings (`admit_worker`: of two first workers, one pins and the
  other is checked against it). Every worker runs `dorado --version` at start; one whose version is not the
  study's refuses to claim (`DoradoVersionMismatch`, exit 13, one line with both versions and the fix) —
  unless the study allows upgrades (`init --allow-dorado-upgrade`, or mid-study `ledgerbc settings
  --allow-dorado-upgrade`): then a worker with the same or a newer version joins, and `status` shows every
  version in use. An older one is refused even then.
- The model each batch ran with is recorded at its publication from dorado's BAM (`batch.py`).
- `change_settings` (`ledgerbc settings`): the upgrade switch, and models per chemistry mid-study, refused
  where a file was already basecalled (or is being) with another model: one chemistry, one model.
"""
from __future__ import annotations

import json

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from . import claim, modelplan, models
from .dorado import version_key
from .errors import BadInput, DoradoVersionMismatch
from .models import Pod5File, Setting
from .settings import Settings


def _get(conn, key: str, default=None):
    raw = conn.execute(sa.select(Setting.value).where(Setting.key == key)).scalar_one_or_none()
    return default if raw is None else json.loads(raw)


def _put(conn, key: str, value) -> None:
    """One setting, inserted or replaced (a ledger made before the key existed has no row for it)."""
    stmt = sqlite_insert(Setting).values(key=key, value=json.dumps(value))
    conn.execute(stmt.on_conflict_do_update(index_elements=["key"], set_={"value": stmt.excluded.value}))


def version_refusal(study: str, worker: str, allow_upgrade: bool) -> str | None:
    """Why a worker with dorado `worker` may not join a study pinned to `study`, or None."""
    if worker == study:
        return None
    if allow_upgrade and version_key(worker) >= version_key(study):
        return None
    if allow_upgrade:
        return (f"this worker's dorado is {worker}, older than the study's {study} (the study allows upgrades, not "
                f"downgrades). Run the workers with dorado {study} or newer (e.g. `module load dorado`)")
    return (f"this worker's dorado is {worker}, the study's is {study}: one study's outputs come from one dorado. "
            f"Run the workers with dorado {study.split('+', 1)[0]} (e.g. `module load dorado/{study.split('+', 1)[0]}`), "
            "or let newer versions join with `ledgerbc settings --allow-dorado-upgrade`")


def admit_worker(ledger, worker_id: str, version: str, output_dir=None) -> str:
    """Pin the study's dorado version to `version` if none is pinned yet, else check `version` against it
    (one transaction). Returns the study's version; raises DoradoVersionMismatch, after recording a
    `worker-refused` event, when this worker may not claim."""

    def txn(conn):
        now = ledger.clock()
        study = _get(conn, "dorado_version")
        if study is None:
            _put(conn, "dorado_version", version)
            claim.event(conn, now, "dorado-pinned", worker_id, message=f"the study's dorado is {version}")
            return version, None, True
        refused = version_refusal(study, version, bool(_get(conn, "allow_dorado_upgrade", False)))
        if refused is not None:
            claim.event(conn, now, "worker-refused", worker_id, message=refused)
        return study, refused, False

    study, refused, pinned = ledger.transact(txn)
    if refused is not None:
        raise DoradoVersionMismatch(refused + ".")
    if pinned and output_dir is not None:
        Settings.update_json(output_dir, {"dorado_version": version})  # what a rebuilt ledger gets back
    return study


def change_settings(ledger, allow_upgrade: bool | None = None, model_values=()) -> list[str]:
    """Change what a study may change mid-study, in one transaction: whether newer dorado versions may
    join, and models (`--set-model` values: a default, `SELECTOR=MODEL` entries added or replaced). A model
    change is refused (BadInput) when any file whose model it changes is done or claimed. Returns one line
    per change; the settings file beside the outputs is rewritten (what a rebuild restores)."""
    default, added = modelplan.parse_model_option(model_values, "--set-model") if model_values else (None, {})

    changed = {}

    def txn(conn):
        changed.clear()
        lines = []
        if allow_upgrade is not None and bool(_get(conn, "allow_dorado_upgrade", False)) != allow_upgrade:
            changed["allow_dorado_upgrade"] = allow_upgrade
            lines.append(f"allow_dorado_upgrade = {str(allow_upgrade).lower()}")
        if model_values:
            old_default = _get(conn, "model", modelplan.DEFAULT_MODEL)
            old = dict(_get(conn, "chemistry_models", {}) or {})
            new_default = default or old_default
            new = {**old, **added}
            problems = modelplan.problems(new_default, new, "--set-model")
            if problems:
                raise BadInput("\n".join(problems))
            _refuse_model_changes(conn, (old_default, old), (new_default, new))
            if new_default != old_default:
                changed["model"] = new_default
                lines.append(f"model = {new_default}")
            if new != old:
                changed["chemistry_models"] = new
                lines += [f"model {s} = {m}" for s, m in sorted(new.items()) if old.get(s) != m]
        for key, value in changed.items():
            _put(conn, key, value)
        if lines:
            claim.event(conn, ledger.clock(), "settings", message="; ".join(lines))
        return lines

    lines = ledger.transact(txn)
    if changed:
        Settings.update_json(ledger.read_settings().output_dir, changed)
    return lines


def _refuse_model_changes(conn, old, new) -> None:
    """One chemistry key, one model: no key that has a done or claimed file may get another model."""
    t = Pod5File
    rows = conn.execute(
        sa.select(t.chemistry, sa.func.count()).where(t.state.in_((models.DONE, models.CLAIMED)))
        .group_by(t.chemistry)).all()
    for key, n in rows:
        was, becomes = modelplan.choose_model(*old, key), modelplan.choose_model(*new, key)
        if was != becomes:
            raise BadInput(
                f"{n} files of chemistry {key or 'unknown'} were (or are being) basecalled with {was}: giving them "
                f"{becomes} would mix models in one study. Basecall other data with that model in a new study "
                "(`ledgerbc init`).")
