"""Audit records as plain values: read from the store or a JSON Lines export, written back out.

The export holds every column the hash covers, in the same text form ``canonical`` uses,
so ``careloop audit verify --export FILE`` re-hashes it without the database.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from careloop.audit_log import canonical, chain_hash
from careloop.clock import utc
from careloop.tables import AuditRecord

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
EXPORT_FIELDS = (
    "seq",
    "at",
    "actor",
    "action",
    "outcome",
    "person",
    "entity",
    "purpose",
    "detail",
    "prev_hash",
    "hash",
)


@dataclass(frozen=True, slots=True)
class Rec:
    """One audit record, detached from any session."""

    seq: int
    at: datetime
    actor: str
    action: str
    outcome: str
    person_id: int | None
    entity: str | None
    purpose: str | None
    detail: dict[str, Any]
    prev_hash: str
    hash: str

    def computed_hash(self) -> str:
        """What ``hash`` must be, given the other columns."""
        body = canonical(
            self.seq,
            self.at,
            self.actor,
            self.action,
            self.outcome,
            self.person_id,
            self.entity,
            self.purpose,
            self.detail,
        )
        return chain_hash(self.prev_hash, body)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": format_time(self.at),
            "actor": self.actor,
            "action": self.action,
            "outcome": self.outcome,
            "person": self.person_id,
            "entity": self.entity,
            "purpose": self.purpose,
            "detail": self.detail,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


class UnreadableRecord(ValueError):
    """A line of an export that is not a well-formed record (the message names no values)."""


def format_time(dt: datetime) -> str:
    return utc(dt).strftime(TIME_FORMAT)


def parse_time(s: str) -> datetime:
    return datetime.strptime(s, TIME_FORMAT).replace(tzinfo=UTC)


def from_json(doc: Any) -> Rec:
    """A record from one export line's JSON; UnreadableRecord if a field is missing or mistyped."""
    if not isinstance(doc, dict) or set(doc) != set(EXPORT_FIELDS):
        raise UnreadableRecord("fields missing or unexpected")
    try:
        rec = Rec(
            seq=_typed(doc["seq"], int),
            at=parse_time(_typed(doc["at"], str)),
            actor=_typed(doc["actor"], str),
            action=_typed(doc["action"], str),
            outcome=_typed(doc["outcome"], str),
            person_id=_opt(doc["person"], int),
            entity=_opt(doc["entity"], str),
            purpose=_opt(doc["purpose"], str),
            detail=_typed(doc["detail"], dict),
            prev_hash=_typed(doc["prev_hash"], str),
            hash=_typed(doc["hash"], str),
        )
    except (TypeError, ValueError) as exc:
        raise UnreadableRecord("a field has the wrong type or format") from exc
    return rec


def _typed(v: Any, t: type[Any]) -> Any:
    if not isinstance(v, t) or (t is int and isinstance(v, bool)):
        raise TypeError(t.__name__)
    return v


def _opt(v: Any, t: type[Any]) -> Any:
    return None if v is None else _typed(v, t)


def from_row(row: Any) -> Rec:
    return Rec(
        row.seq,
        utc(row.at),
        row.actor,
        row.action,
        row.outcome,
        row.person_id,
        row.entity,
        row.purpose,
        row.detail,
        row.prev_hash,
        row.hash,
    )


_T = AuditRecord.__table__  # type: ignore[attr-defined]


def iter_db(
    conn: Connection, *, after_seq: int = 0, upto_seq: int | None = None, batch: int = 5000
) -> Iterator[Rec]:
    """Every record with seq > ``after_seq`` in seq order, fetched in keyset pages so memory
    stays flat however long the log is."""
    last = after_seq
    while True:
        stmt = select(_T).where(_T.c.seq > last).order_by(_T.c.seq).limit(batch)
        if upto_seq is not None:
            stmt = stmt.where(_T.c.seq <= upto_seq)
        rows = conn.execute(stmt).all()
        for row in rows:
            yield from_row(row)
        if len(rows) < batch:
            return
        last = rows[-1].seq


def write_jsonl(recs: Iterable[Rec], fp: IO[str]) -> int:
    n = 0
    for r in recs:
        fp.write(json.dumps(r.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=True))
        fp.write("\n")
        n += 1
    return n


def read_jsonl(path: Path) -> Iterator[tuple[int, Rec | UnreadableRecord]]:
    """(line number, record or the reason the line is unreadable) for each non-blank line."""
    with path.open("r", encoding="utf-8", errors="replace") as fp:
        for lineno, line in enumerate(fp, 1):
            if not line.strip():
                continue
            try:
                yield lineno, from_json(json.loads(line))
            except (ValueError, UnreadableRecord) as exc:
                yield lineno, exc if isinstance(exc, UnreadableRecord) else UnreadableRecord("not valid JSON")
