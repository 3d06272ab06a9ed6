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

Per message it runs one INSERT (``ON CONFLICT DO NOTHING RETURNING id``: a key already
stored returns no row and is looked up afterwards, so new messages need no lookup first),
and per commit a head read, one executemany of the audit records and a head update. The
audit hash input is written out directly (``_canonical``) while it matches
``audit_log.canonical``. Durable MLLP ingest on one connection waits for each of these
commits, so every statement and every microsecond here is latency (bench/mllp_ingest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _q  # json.dumps' own, ensure_ascii
from typing import Any

from sqlalchemy.engine import Engine

from careloop import audit_log
from careloop.clock import utc
from careloop.db import SQLiteConnection
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

        def proc(table: Any, col: str) -> Callable[[Any], Any]:
            p = table.c[col].type.dialect_impl(d).bind_processor(d)
            return p if p is not None else _same

        def marks(table: Any, cols: Sequence[str]) -> str:
            # psycopg needs JSON parameters cast, as SQLAlchemy renders them.
            return ", ".join(
                f"{ph}::json" if self.pg and table.c[c].type.__class__.__name__ == "JSON" else ph
                for c in cols
            )

        # The columns whose values need the column type's conversion; the others are
        # plain str/int/None, which every driver takes as they are.
        self.raw_time, self.raw_body = proc(raw_t, "received_at"), proc(raw_t, "body")
        self.raw_headers, self.raw_ack = proc(raw_t, "headers"), proc(raw_t, "ack")
        self.audit_time, self.audit_detail = proc(audit_t, "at"), proc(audit_t, "detail")
        # A key already stored makes the insert a no-op that returns no row: no lookup
        # before the insert in the usual case (a new message).
        self.insert_raw = (
            f"INSERT INTO raw_message ({', '.join(_RAW_COLS)}) VALUES ({marks(raw_t, _RAW_COLS)})"
            " ON CONFLICT (connector, dedup_key) DO NOTHING RETURNING id"
        )
        self.insert_audit = (
            f"INSERT INTO audit_record ({', '.join(_AUDIT_COLS)}) VALUES ({marks(audit_t, _AUDIT_COLS)})"
        )
        self.head = "SELECT seq, hash FROM audit_head WHERE id = 1" + (" FOR UPDATE" if self.pg else "")
        self.head_insert = f"INSERT INTO audit_head (id, seq, hash) VALUES (1, {ph}, {ph})"
        self.head_update = f"UPDATE audit_head SET seq = {ph}, hash = {ph} WHERE id = 1"
        # As audit_log._head: a record past the head row (the row is written at commit) wins.
        self.latest_after = f"SELECT seq, hash FROM audit_record WHERE seq > {ph} ORDER BY seq DESC LIMIT 1"
        self.ph = ph

    def dups(self, n: int) -> str:
        return (
            f"SELECT id, dedup_key, ack FROM raw_message WHERE connector = {self.ph} "
            f"AND dedup_key IN ({', '.join([self.ph] * n)})"
        )


def _same(value: Any) -> Any:
    return value


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
        # Converted ``headers`` by content: a connector sends the same few again and again.
        self._headers: dict[tuple[tuple[str, str], ...], Any] = {}
        # Called (from the committing thread) after a commit that stored something new, so
        # the mapping stage starts at once instead of at its next poll (Hub.start sets it).
        self.on_commit: Callable[[], None] | None = None

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
                # The driver's own connection: the pool's proxy adds a call per statement.
                conn = self._connection().dbapi_connection
                try:
                    cur = conn.cursor()
                    try:
                        if isinstance(conn, SQLiteConnection):
                            conn.begin_immediate()
                        elif not self._sql.pg:
                            cur.execute("BEGIN IMMEDIATE")
                        out = self._put_raw(cur, self._sql, items)
                        conn.commit()
                        if self.on_commit is not None and any(not r.duplicate for r in out):
                            with contextlib.suppress(Exception):  # committed: a nudge is optional
                                self.on_commit()
                        return out
                    except BaseException:
                        with contextlib.suppress(Exception):
                            conn.rollback()
                        raise
                    finally:
                        with contextlib.suppress(Exception):
                            cur.close()
                except (errors, _Vanished) as exc:
                    # A busy database, a broken connection, or a first copy deleted while we
                    # looked it up: start again on a fresh connection.
                    self._drop()
                    if attempt == 4:
                        raise TransientError("the store did not accept the message") from exc
        raise AssertionError("unreachable")

    def _put_raw(self, cur: Any, sql: _Sql, items: Sequence[RawIn]) -> list[PutResult]:
        now = self.store.clock.now()
        at = utc(now)
        received, stamp = sql.raw_time(now), sql.audit_time(at)
        body_p, ack_p, headers_p = sql.raw_body, sql.raw_ack, sql.raw_headers
        headers_seen = self._headers
        if len(headers_seen) > 256:
            headers_seen.clear()

        # Pass 1: insert the rows. ``first`` maps a (connector, dedup_key) to its first
        # copy, earlier in this batch or stored before (looked up after the inserts).
        first: dict[tuple[str, str], PutResult | None] = {}
        stored_before: dict[str, list[str]] = {}
        slots: list[PutResult | tuple[str, str]] = []
        for item in items:
            key = (item.connector, item.dedup_key) if item.dedup_key else None
            if key is not None and key in first:
                slots.append(key)
                continue
            hdrs = item.headers
            # Cached only for str keys and values: 1, 1.0 and True are equal keys to a dict.
            if all(type(k) is str and type(v) is str for k, v in hdrs.items()):
                hkey = tuple(hdrs.items())
                headers = headers_seen.get(hkey)
                if headers is None:
                    headers = headers_seen[hkey] = headers_p(dict(hdrs))
            else:
                headers = headers_p(dict(hdrs))
            cur.execute(
                sql.insert_raw,
                (
                    item.connector,
                    item.kind,
                    item.content_type,
                    item.dedup_key,
                    received,
                    body_p(item.body),
                    headers,
                    ack_p(item.reply) if item.reply is not None else None,
                    "error" if item.rejected else "pending",
                    item.rejected[:500] if item.rejected else None,
                    0,
                    None,
                ),
            )
            row = cur.fetchone()
            if row is not None:
                res = PutResult(row[0], False, item.reply)
                slots.append(res)
                if key is not None:
                    first[key] = res
            else:  # the key was stored by an earlier put
                assert key is not None
                first[key] = None
                stored_before.setdefault(key[0], []).append(key[1])
                slots.append(key)
        for connector, keys in stored_before.items():
            for i in range(0, len(keys), _CHUNK):
                part = keys[i : i + _CHUNK]
                cur.execute(sql.dups(len(part)), (connector, *part))
                for rid, dkey, ack in cur.fetchall():
                    first[(connector, dkey)] = PutResult(rid, True, bytes(ack) if ack is not None else None)

        # Pass 2: one audit record per item, in item order, on the hash chain.
        cur.execute(sql.head)
        row = cur.fetchone()
        if row is None:
            seq, prev = 0, audit_log.GENESIS
            cur.execute(sql.head_insert, (seq, prev))
        else:
            seq, prev = row[0], row[1]
        cur.execute(sql.latest_after, (seq,))
        later = cur.fetchone()
        if later is not None:
            seq, prev = later[0], later[1]
        out: list[PutResult] = []
        audits: list[tuple[Any, ...]] = []
        fast_canonical = _fast_canonical_ok()
        at_text = _at_text(at)
        for item, slot in zip(items, slots, strict=True):
            detail: dict[str, Any]
            if isinstance(slot, PutResult):
                res = slot
                action, entity = "message.receive", f"raw_message/{res.raw_id}"
                detail = {
                    "kind": item.kind,
                    "control_id": _control_id(item.dedup_key),
                    "bytes": len(item.body),
                }
            else:
                copy = first[slot]
                if copy is None:  # stored before, then gone: the retry inserts it again
                    raise _Vanished
                res = PutResult(copy.raw_id, True, copy.reply)
                action, entity = "message.duplicate", f"raw_message/{copy.raw_id}"
                detail = {"kind": item.kind}
            out.append(res)
            seq += 1
            actor = f"connector:{item.connector}"
            if fast_canonical:
                body = _canonical(seq, at_text, actor, action, entity, detail)
            else:
                body = audit_log.canonical(seq, at, actor, action, "success", None, entity, None, detail)
            h = audit_log.chain_hash(prev, body)
            audits.append(
                (seq, stamp, actor, action, "success", None, entity, None, sql.audit_detail(detail), prev, h)
            )
            prev = h
        cur.executemany(sql.insert_audit, audits)
        cur.execute(sql.head_update, (seq, prev))
        return out


def _at_text(at: datetime) -> str:
    return utc(at).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _canonical(seq: int, at_text: str, actor: str, action: str, entity: str, detail: dict[str, Any]) -> bytes:
    """``audit_log.canonical`` of the sink's records (outcome success, no person, no purpose,
    a detail of str/int/None values), written out instead of building and sorting dicts:
    the audit hash is a fifth of a message's CPU on the ingest hot path otherwise. Used only
    while ``_fast_canonical_ok`` finds both give the same bytes."""
    parts = [
        f"{_q(k)}:{'null' if v is None else v if type(v) is int else _q(v)}"
        for k, v in sorted(detail.items())
    ]
    return (
        f'{{"action":{_q(action)},"actor":{_q(actor)},"at":{_q(at_text)},"detail":{{{",".join(parts)}}},'
        f'"entity":{_q(entity)},"outcome":"success","person":null,"purpose":null,"seq":{seq}}}'
    ).encode()


@functools.cache
def _fast_canonical_ok() -> bool:
    """Whether ``_canonical`` still writes what ``audit_log.canonical`` writes (checked once
    per process on awkward values; if the canonical form ever changes, the sink falls back)."""
    at = datetime(2026, 3, 2, 14, 0, 7, 123456, tzinfo=UTC)
    samples: list[dict[str, Any]] = [
        {"kind": 'hl7v2:ADT^A01 "q" \\ é \u2603 \x01', "control_id": "C-1/é", "bytes": 532},
        {"kind": "k", "control_id": None, "bytes": 0},
        {"kind": "hl7v2:SIU^S12"},
    ]
    return all(
        _canonical(7, _at_text(at), 'connector:a"b', "message.receive", "raw_message/1", d)
        == audit_log.canonical(
            7, at, 'connector:a"b', "message.receive", "success", None, "raw_message/1", None, d
        )
        for d in samples
    )


class _Vanished(Exception):
    """A dedup key's first copy was deleted between our insert and our lookup."""


def _control_id(dedup_key: str | None) -> str | None:
    # dedup keys end with the sender's control id / delivery id (no PHI).
    return dedup_key.rsplit("|", 1)[-1] if dedup_key else None


def _close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):
        conn.close()
