"""The raw sink: the rows it writes, duplicates answered with the first copy, and an audit
chain that the ORM appender (careloop.audit_log.append) continues."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlmodel import Session, col, select

from careloop import audit_log, ingest
from careloop.model import RawIn
from careloop.pipeline import IngestSink
from careloop.store import Store
from careloop.tables import AuditHead, AuditRecord, RawMessage


def item(key: str | None, n: int = 0) -> RawIn:
    return RawIn(
        "adt",
        "hl7v2:ADT^A01",
        f"MSH|body{n}".encode(),
        "x-application/hl7-v2+er7",
        key,
        {"timezone": "America/New_York", "n": str(n)},
        f"ACK{key}".encode() if key else None,
    )


def test_sink_rows_duplicates_and_audit_chain(store: Store) -> None:
    stock = bulk = IngestSink(store)
    a = stock.put_sync([item("k1", 1), item("k2", 2), item("k1", 3), item(None, 4)])
    b = bulk.put_sync([item("k4", 5), item("k4", 6), item("k1", 7), item(None, 8)])
    assert [(r.duplicate, r.reply) for r in a] == [
        (False, b"ACKk1"),
        (False, b"ACKk2"),
        (True, b"ACKk1"),
        (False, None),
    ]
    assert [(r.duplicate, r.reply) for r in b] == [
        (False, b"ACKk4"),
        (True, b"ACKk4"),
        (True, b"ACKk1"),
        (False, None),
    ]
    assert a[2].raw_id == a[0].raw_id and b[2].raw_id == a[0].raw_id and b[1].raw_id == b[0].raw_id

    with Session(store.engine) as s:
        rows = {r.id: r for r in s.exec(select(RawMessage)).all()}
        by_stock, by_bulk = rows[a[0].raw_id], rows[b[0].raw_id]
        for attr in ("connector", "kind", "content_type", "status", "attempts", "status_reason"):
            assert getattr(by_stock, attr) == getattr(by_bulk, attr)
        assert by_bulk.headers == {"timezone": "America/New_York", "n": "5"}
        assert by_bulk.body == b"MSH|body5" and by_bulk.ack == b"ACKk4" and by_bulk.dedup_key == "k4"
        assert by_bulk.received_at.replace(tzinfo=None) == by_stock.received_at.replace(tzinfo=None)
        assert len(rows) == 5

        records = s.exec(select(AuditRecord).order_by(col(AuditRecord.seq))).all()
        head = s.get(AuditHead, 1)
    assert [r.action for r in records] == [
        "message.receive",
        "message.receive",
        "message.duplicate",
        "message.receive",
        "message.receive",
        "message.duplicate",
        "message.duplicate",
        "message.receive",
    ]
    prev = audit_log.GENESIS
    for r in records:  # the chain verifies across both writers
        assert r.prev_hash == prev and audit_log.record_hash(r) == r.hash
        prev = r.hash
    assert head is not None and head.seq == 8 and head.hash == prev
    assert records[4].detail == {"kind": "hl7v2:ADT^A01", "control_id": "k4", "bytes": 9}

    # The ORM appender continues the chain the sink left.
    with store.session() as s:
        audit_log.append(s, at=store.clock.now(), actor="test", action="test.append")
    with Session(store.engine) as s:
        last = s.exec(select(AuditRecord).order_by(col(AuditRecord.seq).desc())).first()
    assert last is not None and last.seq == 9 and last.prev_hash == prev


def test_sink_handles_large_groups_and_empty_puts(store: Store) -> None:
    sink = IngestSink(store)
    assert sink.put_sync([]) == []
    res = sink.put_sync([item(f"g{i}", i) for i in range(900)] + [item("g5", 5)])
    assert len(res) == 901 and res[-1].duplicate and res[-1].raw_id == res[5].raw_id
    assert len({r.raw_id for r in res}) == 900


def test_keys_stored_before_are_answered_with_their_first_copy_across_lookup_chunks(store: Store) -> None:
    sink = IngestSink(store)
    first = sink.put_sync([item(f"c{i}", i) for i in range(450)])
    again = sink.put_sync([item(None, 999), *(item(f"c{i}", 1000 + i) for i in reversed(range(450)))])
    assert not again[0].duplicate
    assert [(r.raw_id, r.duplicate, r.reply) for r in again[1:]] == [
        (first[i].raw_id, True, f"ACKc{i}".encode()) for i in reversed(range(450))
    ]
    with Session(store.engine) as s:
        assert len(s.exec(select(RawMessage)).all()) == 451


def test_headers_are_stored_as_given_even_when_equal_to_ones_seen_before(store: Store) -> None:
    sink = IngestSink(store)
    # 1, 1.0 and True are equal dict keys; their JSON differs, so each must be its own.
    values: list[object] = ["1", True, 1, 1.0, "1"]
    ids = []
    for n, v in enumerate(values):
        raw = RawIn("adt", "hl7v2:ADT^A01", b"MSH|x", "x/hl7", f"h{n}", {"flag": v}, None)  # type: ignore[dict-item]
        ids.append(sink.put_sync([raw])[0].raw_id)
    with Session(store.engine) as s:
        got = [s.get(RawMessage, i).headers["flag"] for i in ids]  # type: ignore[union-attr]
    assert got == values and [type(g) for g in got] == [type(v) for v in values]


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 10**12),
    st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5))])),
    st.text(),
    st.sampled_from(["message.receive", "message.duplicate"]),
    st.integers(1, 10**12),
    st.one_of(
        st.fixed_dictionaries({"kind": st.text()}),
        st.fixed_dictionaries(
            {"kind": st.text(), "control_id": st.none() | st.text(), "bytes": st.integers(0, 10**9)}
        ),
    ),
)
def test_the_sinks_audit_records_hash_the_canonical_form(
    seq: int, at: datetime, connector: str, action: str, raw_id: int, detail: dict[str, Any]
) -> None:
    actor, entity = f"connector:{connector}", f"raw_message/{raw_id}"
    fast = ingest._canonical(seq, ingest._at_text(at), actor, action, entity, detail)
    assert fast == audit_log.canonical(seq, at, actor, action, "success", None, entity, None, detail)
    assert ingest._fast_canonical_ok()


def test_a_head_row_behind_the_records_is_caught_up_not_collided_with(store: Store) -> None:
    """The head row is written at commit; if it ever lags the records (a commit path that
    skipped it), the sink continues the chain from the newest record, as audit_log does."""
    from audit.verify import verify_database

    sink = IngestSink(store)
    sink.put_sync([item("a", 1)])
    with Session(store.engine) as s:
        audit_log.append(s, at=store.clock.now(), actor="test", action="test.extra")
        s.flush()
        head = s.get(AuditHead, 1)
        assert head is not None
        lagging = (head.seq, head.hash)
        s.commit()
    with Session(store.engine) as s:  # put the head row back one record
        head = s.get(AuditHead, 1)
        assert head is not None and head.seq == lagging[0] + 1
        prev = s.exec(select(AuditRecord).where(AuditRecord.seq == lagging[0])).one()
        head.seq, head.hash = prev.seq, prev.hash
        s.commit()
    results = sink.put_sync([item("b", 2)])
    assert [r.duplicate for r in results] == [False]
    assert verify_database(store.engine).ok
