"""Writes a stage defers to the end of its batch: many rows, one statement per table.

A stage deciding a few hundred events inserts a few rows and updates a few rows for each;
one statement per row costs more than the work. Inside ``deferred(session)``, ``insert``
and ``careloop.store.write_through`` queue their rows instead, and the queue is written
(one executemany per table, parents before children; then the updates, one executemany
per table and column set, or in the order made when a column of a row is set twice):

- before any other statement runs on the session's connection (a read, an ORM flush, a
  savepoint, a statement not queued): whatever runs next sees every row queued before it,
  as if each had been written at once;
- by ``flush``, which a batch calls at the end of each savepoint's body (a savepoint
  released with rows still queued would keep them in the enclosing transaction even if
  writing them failed), and before the transaction commits.

A rollback (of a savepoint too) drops the queue: it holds only rows made since the last
statement, all inside the innermost savepoint (a savepoint begun inside ``deferred`` is
emitted at once, so the rows queued before it are written first). A row that fails to
write fails the ``flush`` (or the statement that set it off), inside that savepoint.

Ids: a queued row has no generated id yet. ``next_id`` hands out the primary key for a new
row of a table with an integer id: from the table's sequence on PostgreSQL (a block at a
time; never handed out twice), and on SQLite from the largest id in the table, which no
other connection can move while this transaction holds the write lock (BEGIN IMMEDIATE);
an insert into the table this module did not make drops the count, so it is read again.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Table, bindparam, event, func, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.dml import Insert
from sqlmodel import Session, SQLModel

_KEY = "careloop.deferred"
_ID_BLOCK = 100


class Deferred:
    """The queue of one batch (see the module docstring)."""

    def __init__(self) -> None:
        self.inserts: dict[Table, list[dict[str, Any]]] = {}
        self.updates: list[tuple[Table, tuple[str, ...], dict[str, Any]]] = []
        self.ids: dict[str, deque[int] | Iterator[int]] = {}
        self.flushing = False
        self.watched: dict[Any, Any] | None = None  # the connection's ``info`` it is noted in

    def flush(self, conn: Connection) -> None:
        if self.flushing or not (self.inserts or self.updates):
            return
        inserts, updates = self.inserts, self.updates
        self.inserts, self.updates = {}, []
        self.flushing = True
        try:
            for table in _insert_order():
                rows = inserts.get(table)
                if rows:
                    conn.execute(table.insert(), rows)
            for (table, names), params in _update_groups(updates):
                result = conn.execute(update_statement(table, names), params)
                if conn.dialect.supports_sane_multi_rowcount and result.rowcount != len(params):
                    raise RuntimeError(f"write_through: {table.name} row not found for update")
        finally:
            self.flushing = False


Shape = tuple[Table, tuple[str, ...]]


def _update_groups(
    updates: list[tuple[Table, tuple[str, ...], dict[str, Any]]],
) -> list[tuple[Shape, list[Any]]]:
    """The updates as executemany groups: one per (table, columns), in the order first
    made, when no column of a row is set in two groups (such updates commute: different
    rows, or different columns of one row); else runs of consecutive updates of one shape,
    in the order made."""
    groups: dict[Shape, list[dict[str, Any]]] = {}
    setters: dict[tuple[str, tuple[Any, ...], str], Shape] = {}  # (table, pk, column) -> shape
    for table, names, params in updates:
        shape = (table, names)
        pk = tuple(v for k, v in params.items() if k.startswith("pk_"))
        if any(setters.setdefault((table.name, pk, n), shape) != shape for n in names):
            break
        groups.setdefault(shape, []).append(params)
    else:
        return list(groups.items())
    runs: list[tuple[Shape, list[Any]]] = []
    for table, names, params in updates:
        if runs and runs[-1][0] == (table, names):
            runs[-1][1].append(params)
        else:
            runs.append(((table, names), [params]))
    return runs


@functools.cache
def _insert_order() -> list[Table]:
    """Every table, parents before children (computed once all tables are defined)."""
    return list(SQLModel.metadata.sorted_tables)


@functools.lru_cache(maxsize=256)
def update_statement(table: Table, names: tuple[str, ...]) -> Any:
    """``UPDATE table SET names... WHERE pk`` (parameters ``v_<name>``, ``pk_<name>``), built
    once per table and column set (so SQLAlchemy's statement cache hits)."""
    stmt = table.update().values({n: bindparam(f"v_{n}") for n in names})
    for c in table.primary_key.columns:
        stmt = stmt.where(c == bindparam(f"pk_{c.name}"))
    return stmt


def current(session: Session) -> Deferred | None:
    d: Deferred | None = session.info.get(_KEY)
    return d


@contextmanager
def deferred(session: Session) -> Iterator[Deferred]:
    """Queue this session's ``insert``/``write_through`` rows until the block ends (then
    they are written, unless the block raised)."""
    d = Deferred()
    conn = session.connection()
    _listen(conn.engine)
    d.watched = conn.info
    conn.info[_KEY] = d
    session.info[_KEY] = d
    try:
        yield d
        d.flush(session.connection())
    finally:
        session.info.pop(_KEY, None)
        d.watched.pop(_KEY, None)


def flushing(conn: Connection) -> bool:
    """Whether ``conn`` is writing a batch's queued rows just now."""
    d: Deferred | None = conn.info.get(_KEY)
    return d is not None and d.flushing


def flush(session: Session) -> None:
    """Write what is queued now (a no-op outside ``deferred``)."""
    d = current(session)
    if d is not None:
        d.flush(session.connection())


# Called with (session, table, values, is_insert) when a row is queued (the inserted row,
# or the values an UPDATE sets): whoever keeps what it read in memory for the batch
# (orchestrator.facts) learns of a change before it is written.
Watcher = Callable[[Session, Table, "dict[str, Any]", bool], None]
_watchers: list[Watcher] = []


def watch(fn: Watcher) -> None:
    """Call ``fn(session, table, values, is_insert)`` for every row queued from now on."""
    if fn not in _watchers:
        _watchers.append(fn)


def insert(session: Session, table: Table, row: dict[str, Any]) -> None:
    """Insert ``row`` into ``table``: queued inside ``deferred``, else at once. Every column
    without a server default must be in ``row`` (SQLModel defaults are not applied here)."""
    d = current(session)
    if d is None:
        session.connection().execute(table.insert(), row)
    else:
        d.inserts.setdefault(table, []).append(row)
        for fn in _watchers:
            fn(session, table, row, True)


def update(session: Session, table: Table, pk: dict[str, Any], values: dict[str, Any]) -> bool:
    """Queue ``UPDATE table SET values WHERE pk`` inside ``deferred`` (True), else do nothing
    and answer False (the caller writes it at once)."""
    d = current(session)
    if d is None:
        return False
    params = {f"pk_{k}": v for k, v in pk.items()}
    params.update({f"v_{k}": v for k, v in values.items()})
    d.updates.append((table, tuple(values), params))
    for fn in _watchers:
        fn(session, table, values, False)
    return True


def next_id(session: Session, table: Table) -> int | None:
    """The id for a new ``table`` row to be queued (None outside ``deferred``: insert it
    with RETURNING instead)."""
    d = current(session)
    if d is None:
        return None
    ids = d.ids.get(table.name)
    if isinstance(ids, deque) and not ids:
        ids = None
    if ids is None:
        conn = session.connection()
        if conn.dialect.name == "postgresql":
            got = conn.execute(
                text("SELECT nextval(pg_get_serial_sequence(:t, 'id')) FROM generate_series(1, :n)"),
                {"t": table.name, "n": _ID_BLOCK},
            )
            ids = deque(int(v) for v in got.scalars())
        else:  # see the module docstring: the write lock keeps the largest id ours
            top = conn.execute(select(func.max(table.c.id))).scalar() or 0
            ids = iter(range(int(top) + 1, 2**62))
        d.ids[table.name] = ids
    return ids.popleft() if isinstance(ids, deque) else next(ids)


def _before_execute(
    conn: Connection, clause: Any, multiparams: Any, params: Any, execution_options: Any
) -> None:
    d: Deferred | None = conn.info.get(_KEY)
    if d is None or d.flushing:
        return
    d.flush(conn)
    if isinstance(clause, Insert) and clause.table.name in d.ids and conn.dialect.name != "postgresql":
        d.ids.pop(clause.table.name, None)  # someone else's insert: count again


@event.listens_for(Session, "after_transaction_create")
def _savepoint_now(session: Any, transaction: Any) -> None:
    # SQLAlchemy emits a savepoint's SAVEPOINT at the first statement inside it. Emitted at
    # once instead, it writes the queue first (``_before_execute``): rows queued before it
    # belong to the enclosing transaction, rows queued inside it are rolled back with it.
    if transaction.nested and current(session) is not None:
        session.connection()


@event.listens_for(Session, "after_rollback")
def _drop(session: Any) -> None:
    d = current(session)
    if d is not None:
        d.inserts, d.updates = {}, []


@event.listens_for(Session, "before_commit")
def _flush_before_commit(session: Any) -> None:
    d = current(session)
    if d is not None:
        d.flush(session.connection())


def _listen(engine: Engine) -> None:
    if not event.contains(engine, "before_execute", _before_execute):
        event.listen(engine, "before_execute", _before_execute)
