"""Alembic migrations, run from inside the installed package (workers run from an install, not a checkout).

The migration scripts are the one source of the schema revisions this version knows: which ledgers it
opens (`db.Ledger` refuses others) and what `upgrade` writes both come from here.

Every command checks a ledger's revision when it opens it, so the revisions are read from the scripts'
`revision`/`down_revision` lines with `ast` (milliseconds) instead of importing alembic (most of a second);
alembic itself is imported only to create or upgrade a ledger. tests/test_schema.py checks that this
reading and alembic's own walk of the scripts agree.
"""

import ast
import functools
from pathlib import Path

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(connection=None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _revision_of(script: Path) -> tuple[str, str | None] | None:
    """(revision, down_revision) assigned at the top level of a migration script, or None."""
    found = {}
    for node in ast.parse(script.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("revision", "down_revision"):
                found[node.targets[0].id] = ast.literal_eval(node.value)
    return (found["revision"], found.get("down_revision")) if "revision" in found else None


@functools.cache
def known_revisions() -> tuple[str, ...]:
    """Every revision of the shipped migrations, oldest first; the last is the head this version writes."""
    parent = dict(filter(None, map(_revision_of, sorted((MIGRATIONS / "versions").glob("*.py")))))
    child = {down: rev for rev, down in parent.items()}
    if len(child) != len(parent):
        raise RuntimeError(f"the migrations in {MIGRATIONS} branch: {parent}")
    chain, rev = [], child.get(None)
    while rev is not None:
        chain.append(rev)
        rev = child.get(rev)
    if len(chain) != len(parent):
        raise RuntimeError(f"the migrations in {MIGRATIONS} do not form one chain: {parent}")
    return tuple(chain)


def head_revision() -> str:
    return known_revisions()[-1]


def upgrade(connection, revision: str = "head") -> None:
    """Bring the database behind `connection` to `revision`."""
    from alembic import command

    command.upgrade(alembic_config(connection), revision)
