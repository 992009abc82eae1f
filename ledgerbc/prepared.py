"""Statements of the claim hot path, written against the models and compiled once to plain SQLite SQL.

The claim, heartbeat and publication run under the global lock. Building and executing statements through
SQLAlchemy's machinery cost about 2 of the ~5 ms a claim and its publication held the lock
(bench/claim.py), so they run as prebuilt SQL on the transaction's own sqlite3 connection. Writing them
as SQLAlchemy expressions over `models` keeps the column and table names in one place: a renamed column
breaks the import of this module, not a claim at 3 a.m. (tests/test_prepared.py compiles and runs each).
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

_DIALECT = sqlite.dialect(paramstyle="qmark")


@dataclass(frozen=True)
class Prepared:
    """One compiled statement: its SQL and the order of its named parameters."""

    sql: str
    names: tuple[str, ...]
    defaults: dict
    row: type | None = None  # for a SELECT: a namedtuple of its columns

    @classmethod
    def of(cls, stmt) -> "Prepared":
        compiled = stmt.compile(dialect=_DIALECT)
        row = None
        if isinstance(stmt, sa.Select):
            row = namedtuple("Row", [str(c.key) for c in stmt.selected_columns], rename=True)
        return cls(str(compiled), tuple(compiled.positiontup), dict(compiled.params), row)

    def args(self, params: dict) -> tuple:
        merged = {**self.defaults, **params}
        return tuple(merged[name] for name in self.names)

    def run(self, conn, **params):
        """Execute on the transaction's raw sqlite3 connection; returns the sqlite3 cursor."""
        return raw(conn).execute(self.sql, self.args(params))

    def rows(self, conn, **params) -> list:
        """A SELECT's rows, as namedtuples named after its columns."""
        return [self.row._make(r) for r in self.run(conn, **params)]

    def run_many(self, conn, rows: list[dict]):
        return raw(conn).executemany(self.sql, [self.args(r) for r in rows])


def raw(conn):
    """The sqlite3 connection under a SQLAlchemy connection (same transaction)."""
    return conn.connection.dbapi_connection


def p(name: str):
    return sa.bindparam(name)
