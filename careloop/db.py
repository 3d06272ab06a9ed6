"""Engine creation and migrations.

SQLite (WAL, synchronous=FULL so that a committed message survives power loss) is the
default at ./var/careloop.db; ``CARELOOP_DATABASE_URL`` selects PostgreSQL or another file.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event, inspect
from sqlalchemy.engine import Engine, make_url
from sqlmodel import create_engine

from careloop.errors import ConfigError

DEFAULT_URL = "sqlite:///var/careloop.db"
_MIGRATIONS = Path(__file__).parent / "migrations"


def database_url(configured: str | None = None) -> str:
    """The environment wins over the config file, which wins over the default."""
    return os.environ.get("CARELOOP_DATABASE_URL") or configured or DEFAULT_URL


def make_engine(url: str, *, schema: str | None = None) -> Engine:
    """An engine for ``url``. ``schema`` (PostgreSQL only) pins the search_path, which the
    tests use to give each test a clean schema."""
    u = make_url(url)
    kwargs: dict[str, Any] = {}
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            private_file(Path(u.database), make_parent=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30, "factory": SQLiteConnection}
    elif schema:
        kwargs["connect_args"] = {"options": f"-csearch_path={schema}"}
    engine = create_engine(url, **kwargs)
    if u.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
    return engine


def private_file(path: Path, *, make_parent: bool = False) -> None:
    """Create ``path`` readable by the owner only, if it is not there yet (and its folder,
    with ``make_parent``): the database holds PHI (SQLite gives its -wal and -shm files the
    same mode), and so do reports and exports."""
    if make_parent:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def existing_engine(url: str) -> Engine:
    """An engine for a careloop database that must already exist (the commands that read
    it: ``explain``, ``messages``, ``audit verify`` ...). Opening a SQLite file that is not
    there would create an empty one, and a verifier would then report an empty chain as
    intact: a ConfigError says where it looked instead."""
    u = make_url(url)
    local = u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:"
    if local and not Path(str(u.database)).exists():
        raise ConfigError(
            [
                f"database: no careloop database at {u.database} (set CARELOOP_DATABASE_URL or "
                "database.url in --config; `careloop run` or `careloop db upgrade` creates one)"
            ]
        )
    engine = make_engine(url)
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            engine.dispose()
            where = f"{u.get_backend_name()} database {u.database or ''}".strip()
            raise ConfigError(
                [f"database: {where} holds no careloop schema (`careloop db upgrade` creates it)"]
            )
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Take transaction control from the driver so BEGIN IMMEDIATE below is honoured.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_begin_immediate(conn: Any) -> None:
    # Writers take the write lock up front: no deadlock-prone read-to-write upgrades.
    dbapi = conn.connection.dbapi_connection
    if isinstance(dbapi, SQLiteConnection):  # through SQLAlchemy, which wraps the driver's errors
        dbapi.begin_immediate(lambda: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


_WRITE_TIMEOUT_S = 30.0  # then SQLite's own busy handler decides
_writers: dict[str, threading.Lock] = {}
_writers_lock = threading.Lock()


class SQLiteConnection(sqlite3.Connection):
    """A sqlite3 connection whose ``BEGIN IMMEDIATE`` first waits for a per-file lock in
    this process (not a fair queue: whichever waiter the OS wakes goes next), released when
    the transaction ends (commit, rollback or close).

    Why: SQLite lets one writer in at a time, and a writer that finds the file locked
    polls, sleeping 1, 2, 5 ... up to 100 ms between tries (sqlite3's busy handler), so a
    stage thread could sleep tens of milliseconds after the lock was already free. The
    pipeline's stages, the MLLP writer and the API all write from threads of one process:
    waiting on a Python lock instead wakes the next writer as soon as the previous one
    committed. Other processes (the CLI beside a running hub) still meet SQLite's own
    busy handler, as before, and so does a writer still queued after ``_WRITE_TIMEOUT_S``
    (the queue only orders this process's writers; SQLite keeps the last word on locking).
    In-memory databases are private to their connection and queue on nothing."""

    def __init__(self, database: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(database, *args, **kwargs)
        name = os.fspath(database)
        self._writer: threading.Lock | None = None
        self._holding = False
        if name and name != ":memory:" and not name.startswith("file:"):
            key = os.path.realpath(name)
            with _writers_lock:
                self._writer = _writers.setdefault(key, threading.Lock())

    def begin_immediate(self, begin: Callable[[], object] | None = None) -> None:
        """``BEGIN IMMEDIATE`` (by calling ``begin`` when given), after this process's other
        writers to the same file."""
        writer = self._writer
        if writer is not None and not self._holding:
            self._holding = writer.acquire(timeout=_WRITE_TIMEOUT_S)
        try:
            if begin is None:
                self.execute("BEGIN IMMEDIATE")
            else:
                begin()
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._holding:
            self._holding = False
            assert self._writer is not None
            self._writer.release()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            if self.in_transaction is False:
                self._release()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._release()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._release()


def alembic_config(engine: Engine) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema up to ``revision`` (idempotent)."""
    command.upgrade(alembic_config(engine), revision)


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"
