"""The audit chain's head row exists from the schema migration on, so the very first
appends of two connections queue on its row lock like every later append instead of both
taking seq 1; and the paths that insert the row when it is missing still work.

Also here: ``careloop audit disclosures`` for an id that names no one says so instead of
handing back an empty accounting."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session
from typer.testing import CliRunner

from audit import disclosures
from audit.cli import app
from audit.testing import SYNTHETIC_NAME, SYNTHETIC_PHONE, seed
from audit.verify import verify_database
from careloop import audit_log
from careloop.clock import VirtualClock
from careloop.db import alembic_config, is_postgres, make_engine, upgrade
from careloop.model import RawIn
from careloop.pipeline import IngestSink
from careloop.store import Store
from careloop.tables import Person

AT = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)
_WAIT_S = 60.0  # an upper bound for a step that takes milliseconds; never a measurement


def _head_rows(engine: Engine) -> list[tuple[int, int, str]]:
    with engine.connect() as c:
        return [
            (r[0], r[1], r[2]) for r in c.execute(text("SELECT id, seq, hash FROM audit_head ORDER BY id"))
        ]


def _chain(engine: Engine) -> list[tuple[int, str]]:
    with engine.connect() as c:
        return [(r[0], r[1]) for r in c.execute(text("SELECT seq, action FROM audit_record ORDER BY seq"))]


def _message(key: str) -> RawIn:
    return RawIn("adt", "hl7v2:ADT^A01", b"MSH|synthetic", "x-application/hl7-v2+er7", key, {}, None)


def test_a_new_database_starts_with_the_head_row_at_genesis(engine: Engine) -> None:
    assert _head_rows(engine) == [(1, 0, audit_log.GENESIS)]
    upgrade(engine)  # idempotent: no second row, nothing moved
    assert _head_rows(engine) == [(1, 0, audit_log.GENESIS)]
    rep = verify_database(engine)
    assert rep.ok and rep.records == 0, rep.faults


def test_the_first_append_and_the_first_ingest_continue_from_the_seeded_row(engine: Engine) -> None:
    store = Store(engine, VirtualClock(AT))
    with store.session() as s:
        assert audit_log.append(s, at=AT, actor="test", action="test.first").seq == 1
    sink = IngestSink(store)
    try:
        assert [r.duplicate for r in sink.put_sync([_message("m1")])] == [False]
    finally:
        sink.close()
    assert _chain(engine) == [(1, "test.first"), (2, "message.receive")]
    rows = _head_rows(engine)
    assert [(i, seq) for i, seq, _ in rows] == [(1, 2)]
    assert verify_database(engine).ok


def test_the_seed_moves_no_existing_head_and_its_downgrade_keeps_a_used_one(engine: Engine) -> None:
    cfg = alembic_config(engine)
    command.downgrade(cfg, "0001")
    assert _head_rows(engine) == []  # the untouched seed goes with its revision
    store = Store(engine, VirtualClock(AT))
    with store.session() as s:  # on the old schema the appender inserts the row itself
        audit_log.append(s, at=AT, actor="test", action="test.before")
        audit_log.append(s, at=AT, actor="test", action="test.before")
    before = _head_rows(engine)
    assert [(i, seq) for i, seq, _ in before] == [(1, 2)]
    upgrade(engine)
    assert _head_rows(engine) == before
    command.downgrade(cfg, "0001")  # a head that has moved records a real chain: it stays
    assert _head_rows(engine) == before
    upgrade(engine)
    assert verify_database(engine).ok


def test_a_deleted_head_row_is_still_recreated_by_both_appenders(engine: Engine) -> None:
    store = Store(engine, VirtualClock(AT))
    with engine.begin() as c:
        c.execute(text("DELETE FROM audit_head"))
    sink = IngestSink(store)
    try:
        sink.put_sync([_message("m1")])
    finally:
        sink.close()
    assert [(i, seq) for i, seq, _ in _head_rows(engine)] == [(1, 1)]
    with engine.begin() as c:
        c.execute(text("DELETE FROM audit_head"))
    with store.session() as s:
        assert audit_log.append(s, at=AT, actor="test", action="test.after").seq == 2
    assert [(i, seq) for i, seq, _ in _head_rows(engine)] == [(1, 2)]
    assert verify_database(engine).ok


def test_verify_reports_a_head_row_deleted_under_a_non_empty_log(engine: Engine) -> None:
    store = Store(engine, VirtualClock(AT))
    with store.session() as s:
        for i in range(3):
            audit_log.append(s, at=AT + timedelta(seconds=i), actor="test", action="test.x")
    assert verify_database(engine).ok
    with engine.begin() as c:  # a missing row reads as the genesis head: three records too many
        c.execute(text("DELETE FROM audit_head"))
    rep = verify_database(engine)
    assert not rep.ok and rep.first_bad is not None, rep.faults
    assert (rep.first_bad.kind, rep.first_bad.seq) == ("extra", 1)


def _blocked_by(conn: Connection, pid: int) -> bool:
    n = conn.execute(
        text("SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"), {"pid": pid}
    ).scalar_one()
    # pg_stat_activity is a snapshot taken once per transaction: end it, or the next poll
    # would not see a backend that started waiting since.
    conn.rollback()
    return bool(n)


def _two_first_writers(engine: Engine, second: Callable[[Store], None]) -> None:
    """Writer A appends the chain's first record and holds its transaction open; writer B
    (``second``, on its own connection and thread) then appends too. On PostgreSQL, A
    commits only once B is seen waiting on A's lock, so B has read the chain tip while A's
    record was uncommitted: the interleaving that collided when there was no head row to
    lock. SQLite lets one writer in at a time, so there B simply queues."""
    store = Store(engine, VirtualClock(AT))
    appended, release = threading.Event(), threading.Event()
    a_pid: list[int] = []
    errors: list[BaseException] = []

    def writer_a() -> None:
        try:
            with store.session() as s:
                if is_postgres(engine):
                    a_pid.append(int(s.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar_one()))
                audit_log.append(s, at=AT, actor="test", action="test.a")
                appended.set()
                if not release.wait(_WAIT_S):
                    raise AssertionError("writer A was never released")
        except BaseException as exc:
            errors.append(exc)
            appended.set()

    def writer_b() -> None:
        try:
            if not appended.wait(_WAIT_S):
                raise AssertionError("writer A never appended")
            second(store)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer_a), threading.Thread(target=writer_b)]
    for t in threads:
        t.start()
    try:
        assert appended.wait(_WAIT_S)
        if is_postgres(engine) and a_pid:
            with engine.connect() as watch:
                deadline = time.monotonic() + _WAIT_S
                while not _blocked_by(watch, a_pid[0]):
                    assert not errors, errors
                    assert time.monotonic() < deadline, "writer B never waited on writer A's lock"
                    time.sleep(0.01)
    finally:
        release.set()
        for t in threads:
            t.join(_WAIT_S)
    assert not any(t.is_alive() for t in threads), "a writer hung"
    assert not errors, errors


def _append_b(store: Store) -> None:
    with store.session() as s:
        audit_log.append(s, at=AT + timedelta(seconds=1), actor="test", action="test.b")


def _ingest_b(store: Store) -> None:
    sink = IngestSink(store)
    try:
        assert [r.duplicate for r in sink.put_sync([_message("b1")])] == [False]
    finally:
        sink.close()


def test_two_connections_appending_the_first_records_at_once_both_commit(engine: Engine) -> None:
    _two_first_writers(engine, _append_b)
    assert _chain(engine) == [(1, "test.a"), (2, "test.b")]
    assert [(i, seq) for i, seq, _ in _head_rows(engine)] == [(1, 2)]
    rep = verify_database(engine)
    assert rep.ok and rep.records == 2, rep.faults


def test_the_first_ingest_beside_a_first_append_queues_on_the_head_row(engine: Engine) -> None:
    _two_first_writers(engine, _ingest_b)
    assert _chain(engine) == [(1, "test.a"), (2, "message.receive")]
    assert [(i, seq) for i, seq, _ in _head_rows(engine)] == [(1, 2)]
    rep = verify_database(engine)
    assert rep.ok and rep.records == 2, rep.faults


def test_the_head_row_a_session_sees_is_the_seed_before_any_append(engine: Engine) -> None:
    with Session(engine) as s:
        h = audit_log.head(s)
        assert (h.seq, h.hash, h.stored, h.written) == (0, audit_log.GENESIS, True, 0)
        s.rollback()


# --------------------------------------------------------------------------- disclosures


def _new_person(store: Store) -> int:
    with store.session() as s:
        p = Person(created_at=AT)
        s.add(p)
        s.flush()
        assert p.id is not None
        return p.id


def _max_person(store: Store) -> int:
    with store.engine.connect() as c:
        return int(c.execute(text("SELECT max(id) FROM person")).scalar_one())


def _last_query(store: Store) -> tuple[int | None, dict[str, object]]:
    with store.engine.connect() as c:
        row = c.execute(
            text("SELECT person_id, detail FROM audit_record WHERE action = 'audit.query' ORDER BY seq DESC")
        ).first()
    assert row is not None
    detail = row[1] if isinstance(row[1], dict) else json.loads(row[1])
    return row[0], detail


def test_person_exists_knows_stored_and_merged_people_only(store: Store) -> None:
    sd = seed(store, AT)
    missing = _max_person(store) + 1
    with store.session() as s:
        assert disclosures.person_exists(s, sd.alice) and disclosures.person_exists(s, sd.merged)
        assert not disclosures.person_exists(s, missing)


@pytest.fixture
def cli_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    url = f"sqlite:///{tmp_path}/cli.db"
    monkeypatch.setenv("CARELOOP_DATABASE_URL", url)
    monkeypatch.chdir(tmp_path)
    eng = make_engine(url)
    upgrade(eng)
    return Store(eng, VirtualClock(AT))


def test_disclosures_for_an_unknown_person_say_so_and_exit_1(cli_store: Store) -> None:
    seed(cli_store, AT)
    missing = _max_person(cli_store) + 1000
    for fmt in ("json", "csv"):
        res = CliRunner().invoke(app, ["disclosures", str(missing), "--format", fmt])
        assert res.exit_code == 1, res.output
        assert res.stdout == ""  # no empty report that reads as "nothing was disclosed"
        assert res.stderr.strip() == f"no person with id {missing}"
        assert SYNTHETIC_NAME not in res.output and SYNTHETIC_PHONE not in res.output
    # The attempt is audited, tied to no person (the id may name someone later).
    person_id, detail = _last_query(cli_store)
    assert person_id is None
    assert detail["returned"] == 0 and detail["filters"]["person"] == missing  # type: ignore[index]


def test_disclosures_for_a_known_person_with_none_is_an_empty_report(cli_store: Store) -> None:
    seed(cli_store, AT)
    quiet = _new_person(cli_store)
    res = CliRunner().invoke(app, ["disclosures", str(quiet)])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["person"] == quiet and doc["entries"] == []
    assert _last_query(cli_store)[0] == quiet


def test_disclosures_in_the_log_are_reported_even_if_the_person_row_is_gone(cli_store: Store) -> None:
    gone = _new_person(cli_store)
    with cli_store.session() as s:
        audit_log.append(
            s,
            at=AT,
            actor="channel:sms",
            action="disclosure",
            person_id=gone,
            purpose="appointment-reminder",
            detail={"channel": "sms", "recipient_kind": "patient", "phi_class": "none", "outcome": "sent"},
        )
    with cli_store.engine.begin() as c:
        c.execute(text("DELETE FROM person WHERE id = :id"), {"id": gone})
    res = CliRunner().invoke(app, ["disclosures", str(gone), "--until", (AT + timedelta(days=1)).isoformat()])
    assert res.exit_code == 0, res.output
    assert [e["audit_seq"] for e in json.loads(res.stdout)["entries"]] == [1]
