"""Singleton jobs among workers (the watchman, the follow-mode scanner), held by lease in the ledger.

A role is taken when free, when its holder's heartbeat is older than `ttl`, or renewed by its holder.
Correctness never depends on a role: it only keeps N workers from doing the same chore.
"""

import sqlalchemy as sa

from .models import Role

WATCHMAN = "watchman"
SCANNER = "scanner"


def take_role(ledger, name: str, worker_id: str, ttl: float) -> bool:
    """Take or renew `name` for `worker_id`; False when another live worker holds it."""

    def txn(conn):
        now = ledger.clock()
        row = conn.execute(sa.select(Role.worker_id, Role.heartbeat_at).where(Role.name == name)).first()
        if row is None:
            conn.execute(sa.insert(Role).values(name=name, worker_id=worker_id, heartbeat_at=now))
            return True
        if row.worker_id == worker_id or now - row.heartbeat_at > ttl:
            conn.execute(sa.update(Role).where(Role.name == name).values(worker_id=worker_id, heartbeat_at=now))
            return True
        return False

    return ledger.transact(txn)


def drop_role(ledger, name: str, worker_id: str) -> None:
    ledger.transact(
        lambda conn: conn.execute(sa.delete(Role).where(Role.name == name, Role.worker_id == worker_id))
    )


def holder(conn, name: str) -> str | None:
    return conn.execute(sa.select(Role.worker_id).where(Role.name == name)).scalar_one_or_none()


def drop_role_quietly(ledger, name: str, worker_id: str) -> None:
    """Best effort on the way out: an unreachable ledger just lets the role expire."""
    from .errors import LedgerError

    try:
        drop_role(ledger, name, worker_id)
    except LedgerError:
        pass


def renewed_within(ledger, name: str, seconds: float) -> bool:
    """True when someone holds `name` and renewed it within `seconds`: its holder is most likely alive."""

    def txn(conn):
        at = conn.execute(sa.select(Role.heartbeat_at).where(Role.name == name)).scalar_one_or_none()
        return at is not None and ledger.clock() - at <= seconds

    return ledger.transact(txn)
