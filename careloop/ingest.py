"""The raw sink: stores inbound messages and their audit records in one commit, with a
handful of driver-level statements per commit.

Why: ``IngestSink._put`` spends 2-4 ms of CPU per message on this class of machine in ORM
object creation and per-row flushes, and even SQLAlchemy Core costs ~0.4 ms a statement
here, which caps durable MLLP ingest near 300 messages/s on one connection, far below
the fsync rate. This subclass keeps ``IngestSink``'s contract exactly:

- one transaction per ``put`` (committed when it returns; SQLite synchronous=FULL as set
  by ``careloop.db``), retried on driver errors, ``TransientError`` after five attempts;
- duplicates by (connector, dedup_key), within the batch or already stored, are not
  stored again and answer the first copy's id and reply;
- one ``message.receive`` / ``message.duplicate`` audit record per item, in item order,
  on the same hash chain (``careloop.audit_log.canonical``/``chain_hash``), with the
  audit head locked (SQLite BEGIN IMMEDIATE, PostgreSQL SELECT ... FOR UPDATE);
- values go through the SQLAlchemy column types' bind processors, so rows read back
  exactly like rows written by the ORM.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.engine import Engine

from careloop import audit_log
from careloop.clock import utc
from careloop.errors import TransientError
from careloop.model import PutResult, RawIn
from careloop.store import Store
from careloop.tables import AuditRecord, RawMessage

_RAW_COLS = (
    "connector",
    "kind",
    "content_type",
    "dedup_key",
    "received_at",
    "body",
    "headers",
    "ack",
    "status",
    "status_reason",
    "attempts",
    "next_attempt_at",
)
_AUDIT_COLS = (
    "seq",
    "at",
    "actor",
    "action",
    "outcome",
    "person_id",
    "entity",
    "purpose",
    "detail",
    "prev_hash",
    "hash",
)
_CHUNK = 400


class _Sql:
    """Dialect-specific SQL text and bind processors, built once per engine."""

    def __init__(self, engine: Engine) -> None:
        d = engine.dialect
        self.pg = d.name == "postgresql"
        ph = "%s" if self.pg else "?"
        raw_t, audit_t = RawMessage.__table__, AuditRecord.__table__  # type: ignore[attr-defined]

        def procs(table: Any, cols: Sequence[str]) -> list[Callable[[Any], Any] | None]:
            return [table.c[c].type.dialect_impl(d).bind_processor(d) for c in cols]

        def marks(table: Any, cols: Sequence[str]) -> str:
            # psycopg needs JSON parameters cast, as SQLAlchemy renders them.
            return ", ".join(
                f"{ph}::json" if self.pg and table.c[c].type.__class__.__name__ == "JSON" else ph
                for c in cols
            )

        self.raw_procs, self.audit_procs = procs(raw_t, _RAW_COLS), procs(audit_t, _AUDIT_COLS)
        self.insert_raw = (
            f"INSERT INTO raw_message ({', '.join(_RAW_COLS)}) VALUES ({marks(raw_t, _RAW_COLS)})"
            " RETURNING id"
        )
        self.insert_audit = (
            f"INSERT INTO audit_record ({', '.join(_AUDIT_COLS)}) VALUES ({marks(audit_t, _AUDIT_COLS)})"
        )
        self.head = "SELECT seq, hash FROM audit_head WHERE id = 1" + (" FOR UPDATE" if self.pg else "")
        self.head_insert = f"INSERT INTO audit_head (id, seq, hash) VALUES (1, {ph}, {ph})"
        self.head_update = f"UPDATE audit_head SET seq = {ph}, hash = {ph} WHERE id = 1"
        self.ph = ph

    def dups(self, n: int) -> str:
        return (
            f"SELECT id, dedup_key, ack FROM raw_message WHERE connector = {self.ph} "
            f"AND dedup_key IN ({', '.join([self.ph] * n)})"
        )

    @staticmethod
    def bind(procs: list[Callable[[Any], Any] | None], values: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(
            p(v) if p is not None and v is not None else v for p, v in zip(procs, values, strict=True)
        )


class IngestSink:
    """The RawSink every connector hands its messages to (``connectors.base.RawSink``).

    Each ``put`` is one transaction (committed when it returns); duplicates by (connector,
    dedup_key), within the batch or already stored, are not stored again and answer the first
    copy's id and reply; every item gets a ``message.receive`` or ``message.duplicate`` audit
    record on the same hash chain that ``careloop.audit_log.append`` extends.

    It keeps one database connection for its writes (checking a connection out of the pool
    and back costs about a quarter of a small commit's CPU), serialised by a lock; SQLite
    serialises writers anyway, and group commit upstream keeps the lock uncontended. A
    connection that raised is discarded and replaced. ``close()`` releases it (it is also
    released when the sink is garbage-collected)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._sql: _Sql | None = None
        self._lock = threading.Lock()
        self._conn: Any = None
        self._release: weakref.finalize[Any, Any] | None = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _connection(self) -> Any:
        if self._conn is None:
            self._conn = self.store.engine.raw_connection()
            # Ours alone from now on: closing it closes the driver connection, whatever
            # happens to the pool (tests dispose engines while sinks are still alive).
            self._conn.detach()
            self._release = weakref.finalize(self, _close_quietly, self._conn)
        return self._conn

    def _drop(self) -> None:
        if self._release is not None:
            self._release()  # closes (returns) the connection once
        self._conn, self._release = None, None

    async def put(self, items: Sequence[RawIn]) -> list[PutResult]:
        return await asyncio.to_thread(self.put_sync, items)

    def put_sync(self, items: Sequence[RawIn]) -> list[PutResult]:
        if not items:
            return []
        engine = self.store.engine
        errors = engine.dialect.dbapi.Error  # type: ignore[union-attr]
        with self._lock:
            if self._sql is None:
                self._sql = _Sql(engine)
            for attempt in range(5):
                conn = self._connection()
                try:
                    cur = conn.cursor()
                    try:
                        if not self._sql.pg:
                            cur.execute("BEGIN IMMEDIATE")
                        out = self._put_raw(cur, self._sql, items)
                        conn.commit()
                        return out
                    except BaseException:
                        with contextlib.suppress(Exception):
                            conn.rollback()
                        raise
                    finally:
                        with contextlib.suppress(Exception):
                            cur.close()
                except errors as exc:
                    # A concurrent insert of the same dedup key, a busy database or a broken
                    # connection: start again on a fresh connection.
                    self._drop()
                    if attempt == 4:
                        raise TransientError("the store did not accept the message") from exc
        raise AssertionError("unreachable")

    def _put_raw(self, cur: Any, sql: _Sql, items: Sequence[RawIn]) -> list[PutResult]:
        now = self.store.clock.now()
        prior: dict[tuple[str, str], PutResult] = {}
        wanted: dict[str, list[str]] = {}
        for item in items:
            if item.dedup_key:
                wanted.setdefault(item.connector, []).append(item.dedup_key)
        for connector, keys in wanted.items():
            uniq = sorted(set(keys))
            for i in range(0, len(uniq), _CHUNK):
                part = uniq[i : i + _CHUNK]
                cur.execute(sql.dups(len(part)), (connector, *part))
                for rid, key, ack in cur.fetchall():
                    prior[(connector, key)] = PutResult(rid, True, bytes(ack) if ack is not None else None)

        cur.execute(sql.head)
        row = cur.fetchone()
        if row is None:
            seq, prev = 0, audit_log.GENESIS
            cur.execute(sql.head_insert, (seq, prev))
        else:
            seq, prev = row[0], row[1]
        at = utc(now)
        out: list[PutResult] = []
        audits: list[tuple[Any, ...]] = []
        for item in items:
            key = (item.connector, item.dedup_key) if item.dedup_key else None
            first = prior.get(key) if key is not None else None
            if first is None:
                cur.execute(
                    sql.insert_raw,
                    sql.bind(
                        sql.raw_procs,
                        (
                            item.connector,
                            item.kind,
                            item.content_type,
                            item.dedup_key,
                            now,
                            item.body,
                            dict(item.headers),
                            item.reply,
                            "pending",
                            None,
                            0,
                            None,
                        ),
                    ),
                )
                rid = cur.fetchone()[0]
                res = PutResult(rid, False, item.reply)
                if key is not None:
                    prior[key] = res
                action, entity = "message.receive", f"raw_message/{rid}"
                detail: dict[str, Any] = {
                    "kind": item.kind,
                    "control_id": _control_id(item.dedup_key),
                    "bytes": len(item.body),
                }
            else:
                res = PutResult(first.raw_id, True, first.reply)
                action, entity = "message.duplicate", f"raw_message/{first.raw_id}"
                detail = {"kind": item.kind}
            out.append(res)
            seq += 1
            actor = f"connector:{item.connector}"
            h = audit_log.chain_hash(
                prev, audit_log.canonical(seq, at, actor, action, "success", None, entity, None, detail)
            )
            audits.append(
                sql.bind(
                    sql.audit_procs,
                    (
                        seq,
                        at,
                        actor,
                        action,
                        "success",
                        None,
                        entity,
                        None,
                        detail,
                        prev,
                        h,
                    ),
                )
            )
            prev = h
        cur.executemany(sql.insert_audit, audits)
        cur.execute(sql.head_update, (seq, prev))
        return out


def _control_id(dedup_key: str | None) -> str | None:
    # dedup keys end with the sender's control id / delivery id (no PHI).
    return dedup_key.rsplit("|", 1)[-1] if dedup_key else None


def _close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):
        conn.close()
