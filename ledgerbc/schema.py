"""Alembic migrations, run from inside the installed package (workers run from an install, not a checkout).

The migration scripts are the one source of the schema revisions this version knows: which ledgers it
opens (`db.Ledger` refuses others) and what `upgrade` writes both come from here.
"""

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(connection=None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def known_revisions() -> tuple[str, ...]:
    """Every revision of the shipped migrations, oldest first; the last is the head this version writes."""
    script = ScriptDirectory.from_config(alembic_config())
    return tuple(reversed([rev.revision for rev in script.walk_revisions()]))


def head_revision() -> str:
    return known_revisions()[-1]


def upgrade(connection, revision: str = "head") -> None:
    """Bring the database behind `connection` to `revision`."""
    command.upgrade(alembic_config(connection), revision)
