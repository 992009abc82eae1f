"""Alembic migrations, run from inside the installed package (workers run from an install, not a checkout)."""

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


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def upgrade(connection, revision: str = "head") -> None:
    """Bring the database behind `connection` to `revision`."""
    command.upgrade(alembic_config(connection), revision)
