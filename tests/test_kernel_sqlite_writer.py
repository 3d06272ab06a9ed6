"""SQLite writers of one process queue on a per-file lock (careloop.db.SQLiteConnection):
taken by BEGIN IMMEDIATE, given back by commit, rollback or close, shared by every engine
on the same file, and a writer that cannot get it in time fails like SQLite's busy
timeout instead of waiting for ever."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from careloop import db
from careloop.clock import SystemClock
from careloop.ingest import IngestSink
from careloop.model import RawIn
from careloop.store import Store


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "w.db"


@pytest.fixture
def engines(path: Path) -> Iterator[tuple[Engine, Engine]]:
    a, b = db.make_engine(f"sqlite:///{path}"), db.make_engine(f"sqlite:///{path}")
    db.upgrade(a)
    yield a, b
    a.dispose()
    b.dispose()


def writer_lock(path: Path) -> threading.Lock:
    return db._writers[os.path.realpath(path)]


def test_a_transaction_holds_the_files_writer_lock_until_commit(
    engines: tuple[Engine, Engine], path: Path
) -> None:
    a, _ = engines
    with a.connect() as conn:
        conn.execute(text("SELECT 1"))  # autobegin: BEGIN IMMEDIATE
        assert writer_lock(path).locked()
        conn.commit()
        assert not writer_lock(path).locked()


def test_rollback_and_close_give_the_lock_back(engines: tuple[Engine, Engine], path: Path) -> None:
    a, _ = engines
    with a.connect() as conn:
        conn.execute(text("SELECT 1"))
        conn.rollback()
        assert not writer_lock(path).locked()
        conn.execute(text("SELECT 1"))
        assert writer_lock(path).locked()
    # Returned to the pool mid-transaction: the pool's reset rolls back.
    assert not writer_lock(path).locked()
    raw = a.raw_connection().dbapi_connection
    assert isinstance(raw, db.SQLiteConnection)
    raw.begin_immediate()
    assert writer_lock(path).locked()
    raw.close()
    assert not writer_lock(path).locked()


def test_engines_on_one_file_share_the_lock_and_a_late_waiter_meets_sqlites_busy_handler(
    engines: tuple[Engine, Engine], path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = engines
    monkeypatch.setattr(db, "_WRITE_TIMEOUT_S", 0.05)
    with a.connect() as holder:
        holder.execute(text("SELECT 1"))
        with b.connect() as waiter:
            raw = waiter.connection.dbapi_connection
            assert isinstance(raw, db.SQLiteConnection) and raw._writer is writer_lock(path)
            # Past the queue's timeout SQLite decides; with no busy wait of its own it refuses
            # at once, as a SQLAlchemy error like any other driver error.
            raw.execute("PRAGMA busy_timeout=0")
            with pytest.raises(OperationalError, match="database is locked"):
                waiter.execute(text("SELECT 1"))
            assert not raw._holding
    with b.connect() as conn:  # free again once the holder is done
        conn.execute(text("SELECT 1"))
        conn.commit()


def test_a_waiting_writer_goes_in_when_the_holder_commits(engines: tuple[Engine, Engine]) -> None:
    a, b = engines
    order: list[str] = []
    began = threading.Event()

    def second() -> None:
        began.set()
        with b.begin() as conn:
            order.append("second")
            conn.execute(text("SELECT 1"))

    with a.begin() as conn:
        conn.execute(text("SELECT 1"))
        t = threading.Thread(target=second)
        t.start()
        began.wait(5)
        order.append("first")
    t.join(10)
    assert not t.is_alive()
    assert order == ["first", "second"]


def test_the_ingest_sink_gives_the_lock_back_after_a_put_and_after_a_failure(
    engines: tuple[Engine, Engine], path: Path
) -> None:
    a, _ = engines
    sink = IngestSink(Store(a, SystemClock()))
    item = RawIn("c", "k", b"synthetic", "text/plain", "key-1")
    assert not sink.put_sync([item])[0].duplicate
    assert not writer_lock(path).locked()
    # A failure inside the transaction (a body that is not bytes) rolls back and frees it.
    bad = RawIn("c", "k", object(), "text/plain", "key-2")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        sink.put_sync([bad])
    assert not writer_lock(path).locked()
    assert sink.put_sync([item])[0].duplicate
    sink.close()


def test_in_memory_databases_queue_on_nothing() -> None:
    e = db.make_engine("sqlite://")
    with e.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert isinstance(raw, db.SQLiteConnection) and raw._writer is None
        conn.execute(text("SELECT 1"))
    e.dispose()
