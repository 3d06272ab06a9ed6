"""Shared fixtures. ``store`` runs each test on SQLite, and on PostgreSQL too when
CARELOOP_TEST_DATABASE_URL is set; every test gets a clean, migrated schema."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from careloop.clock import VirtualClock
from careloop.db import make_engine, upgrade
from careloop.store import Store

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
CORPUS = ROOT.parent / "shared" / "corpus"
# Tests over the public examples run where that folder is (beside the checkout), else skip.
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"no public corpus at {CORPUS}")
PG_URL = os.environ.get("CARELOOP_TEST_DATABASE_URL")

ENGINES = ["sqlite"] + (["postgresql"] if PG_URL else [])


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        eng = make_engine(f"sqlite:///{tmp_path}/test.db")
        upgrade(eng)
        yield eng
        eng.dispose()
        return
    assert PG_URL
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = make_engine(PG_URL)
    with admin.begin() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    eng = make_engine(PG_URL, schema=schema)
    upgrade(eng)
    try:
        yield eng
    finally:
        eng.dispose()
        with admin.begin() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock(datetime(2026, 3, 2, 14, 0, tzinfo=UTC))


@pytest.fixture
def store(engine: Engine, clock: VirtualClock) -> Store:
    return Store(engine, clock)


@pytest.fixture
def hubs() -> Iterator[list[Any]]:
    """Hubs a test builds (``hubs.append(Hub(...))``), stopped at teardown: their ingest
    sink's database connection and HTTP client are closed, not left to the garbage
    collector (psycopg warns about a connection it finalises, and warnings are errors)."""
    made: list[Any] = []
    yield made
    for hub in made:
        asyncio.run(hub.stop())
