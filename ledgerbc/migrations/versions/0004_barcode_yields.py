"""Reads and bases per barcode, kept by triggers on `outputs`: `status` reads a table of a few rows instead
of aggregating the outputs of every file (a barcoded ledger of 1M files has ~25M `outputs` rows: that
GROUP BY took 3-5 s per 100,000 files under the global lock, bench/scale.py).

- barcode_yields: per (barcode, kind pass|fail) the output files, reads and bases published. Every
  INSERT, DELETE or UPDATE of a pass/fail `outputs` row of a barcoded study (barcode not NULL) adds or
  takes back its share in the same transaction, whoever writes it (publication, reconcile, rebuild).
  Unbarcoded studies leave it empty (their totals are in pod5_files).

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_ADD = """
    INSERT INTO barcode_yields (barcode, kind, outputs, reads, bases)
    VALUES (NEW.barcode, NEW.kind, 1, NEW.reads, NEW.bases)
    ON CONFLICT (barcode, kind) DO UPDATE SET outputs = outputs + 1, reads = reads + excluded.reads,
                                             bases = bases + excluded.bases;
"""
_TAKE = """
    UPDATE barcode_yields SET outputs = outputs - 1, reads = reads - OLD.reads, bases = bases - OLD.bases
    WHERE barcode = OLD.barcode AND kind = OLD.kind;
"""
_COUNTED = "{row}.barcode IS NOT NULL AND {row}.kind IN ('pass', 'fail')"
TRIGGERS = {
    "outputs_yield_insert": f"AFTER INSERT ON outputs WHEN {_COUNTED.format(row='NEW')} BEGIN {_ADD} END",
    "outputs_yield_delete": f"AFTER DELETE ON outputs WHEN {_COUNTED.format(row='OLD')} BEGIN {_TAKE} END",
    "outputs_yield_take": (f"AFTER UPDATE OF barcode, kind, reads, bases ON outputs "
                           f"WHEN {_COUNTED.format(row='OLD')} BEGIN {_TAKE} END"),
    "outputs_yield_give": (f"AFTER UPDATE OF barcode, kind, reads, bases ON outputs "
                           f"WHEN {_COUNTED.format(row='NEW')} BEGIN {_ADD} END"),
}


def upgrade():
    op.create_table(
        "barcode_yields",
        sa.Column("barcode", sa.String(), primary_key=True),
        sa.Column("kind", sa.String(), primary_key=True),
        sa.Column("outputs", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("reads", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("bases", sa.Integer(), nullable=False, server_default="0"),
    )
    op.execute(
        "INSERT INTO barcode_yields (barcode, kind, outputs, reads, bases) "
        "SELECT barcode, kind, count(*), sum(reads), sum(bases) FROM outputs "
        f"WHERE {_COUNTED.format(row='outputs')} GROUP BY barcode, kind"
    )
    for name, body in TRIGGERS.items():
        op.execute(f"CREATE TRIGGER {name} {body}")


def downgrade():
    for name in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_table("barcode_yields")
