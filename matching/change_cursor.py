"""Where a process stands in the ``index_changes`` log: which entries to read next, never skipping one that
commits late, however long its transaction stays open.

- SQLite has one writer at a time, so ids are handed out in commit order: the cursor is the last id read.
- PostgreSQL hands out ids at insert time, and a transaction may commit long after others with higher ids. Each
  entry carries its transaction's id (``txid``); the cursor is the oldest transaction that was still running
  when the last poll began (the snapshot's ``xmin``): everything older has finished and was read. Entries of
  transactions from ``xmin`` on are read again at each poll, minus those already applied.

Pruning records the highest id (and txid) it removed (``change_log_pruned``); a cursor that had not read that
far has lost entries and must reload from the records themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import Row, delete, func, select, text
from sqlalchemy.orm import Session

from llmatch.db import db_now, is_sqlite
from llmatch.models import ChangeLogPruned, IndexChange

COLUMNS = (
    IndexChange.id,
    IndexChange.dataset_id,
    IndexChange.source,
    IndexChange.record_id,
    IndexChange.embedding_id,
    IndexChange.txid,
)


def consistent_snapshot(session: Session) -> None:
    """Make every statement of the session's transaction read one snapshot (call before the first statement).
    SQLite's read transactions already do; PostgreSQL needs REPEATABLE READ."""
    if not is_sqlite(session.get_bind()):
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})


@dataclass
class IdCursor:
    """SQLite: entries are committed in id order."""

    last_id: int = 0
    pruned_at_start: int = 0  # what pruning had removed when the indexes were loaded: already reflected
    _read_up_to: int = 0

    def start(self, session: Session) -> None:
        self.last_id = self._read_up_to = session.scalar(select(func.max(IndexChange.id))) or 0
        pruned = session.get(ChangeLogPruned, 1)
        self.pruned_at_start = pruned.max_id if pruned else 0

    def read(self, session: Session) -> list[Row]:
        rows = session.execute(select(*COLUMNS).where(IndexChange.id > self.last_id).order_by(IndexChange.id)).all()
        self._read_up_to = rows[-1].id if rows else self.last_id
        return list(rows)

    def advance(self) -> None:
        self.last_id = self._read_up_to

    def lost_entries(self, session: Session) -> bool:
        pruned = session.get(ChangeLogPruned, 1)
        return pruned is not None and pruned.max_id > max(self.last_id, self.pruned_at_start)


@dataclass
class TxidCursor:
    """PostgreSQL: entries of transactions from ``xmin`` on are read again, minus those already applied."""

    xmin: int = 0
    applied: dict[int, int] = field(default_factory=dict)  # entry id -> txid, for entries with txid >= xmin
    pruned_at_start: int = -1  # what pruning had removed when the indexes were loaded: already reflected
    _next_xmin: int = 0
    _read: list[Row] = field(default_factory=list)

    def start(self, session: Session) -> None:
        """Position at the session's snapshot (see ``consistent_snapshot``): what it shows counts as applied."""
        self.xmin = _snapshot_xmin(session)
        rows = session.execute(select(IndexChange.id, IndexChange.txid).where(IndexChange.txid >= self.xmin)).all()
        self.applied = {row.id: row.txid for row in rows}
        pruned = session.get(ChangeLogPruned, 1)
        self.pruned_at_start = pruned.max_txid if pruned and pruned.max_txid is not None else -1

    def read(self, session: Session) -> list[Row]:
        # The horizon first: every transaction older than it has finished, so the next statement sees its entries.
        self._next_xmin = _snapshot_xmin(session)
        rows = session.execute(select(*COLUMNS).where(IndexChange.txid >= self.xmin).order_by(IndexChange.id)).all()
        self._read = list(rows)
        return [row for row in rows if row.id not in self.applied]

    def advance(self) -> None:
        horizon = self._next_xmin
        applied = {i: t for i, t in self.applied.items() if t >= horizon}
        applied.update({row.id: row.txid for row in self._read if row.txid >= horizon})
        self.applied, self.xmin, self._read = applied, horizon, []

    def lost_entries(self, session: Session) -> bool:
        pruned = session.get(ChangeLogPruned, 1)
        if pruned is None or pruned.max_txid is None:
            return False
        return pruned.max_txid >= self.xmin and pruned.max_txid > self.pruned_at_start


ChangeCursor = IdCursor | TxidCursor


def cursor_for(session: Session) -> ChangeCursor:
    return IdCursor() if is_sqlite(session.get_bind()) else TxidCursor()


def _snapshot_xmin(session: Session) -> int:
    return int(session.scalar(text("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")))


def prune(session: Session, retention: timedelta) -> int:
    """Delete log entries older than ``retention`` (in a write transaction), remembering how far it went."""
    cutoff = db_now(session) - retention
    old = IndexChange.created_at < cutoff
    top_id, top_txid = session.execute(select(func.max(IndexChange.id), func.max(IndexChange.txid)).where(old)).one()
    if top_id is None:
        return 0
    deleted = session.execute(delete(IndexChange).where(old, IndexChange.id <= top_id)).rowcount or 0
    marker = session.get(ChangeLogPruned, 1, with_for_update=True)
    if marker is None:
        session.add(ChangeLogPruned(id=1, max_id=top_id, max_txid=top_txid))
    else:
        marker.max_id = max(marker.max_id, top_id)
        if top_txid is not None:
            marker.max_txid = max(marker.max_txid or 0, top_txid)
    return deleted
