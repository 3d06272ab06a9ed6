"""The file connector's error/ folder: a file whose messages were answered with an error
ACK goes there every time it is seen, and the reason names the ACK codes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from careloop.clock import SystemClock
from careloop.db import make_engine, upgrade
from careloop.ingest import IngestSink
from careloop.store import Store
from connectors.hl7v2_file import FileConfig, FileConnector
from tests.hl7_support import adt


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    engine = make_engine(f"sqlite:///{tmp_path}/files.db")
    upgrade(engine)
    yield Store(engine, SystemClock())
    engine.dispose()


async def _drop(store: Store, inbox: Path, name: str, data: bytes) -> FileConnector:
    (inbox / name).write_bytes(data)
    c = FileConnector("files", FileConfig(directory=inbox, min_age_s=0))
    await c.start(IngestSink(store))
    try:
        await c.scan_once()
    finally:
        await c.stop()
    return c


@pytest.mark.anyio
async def test_a_file_with_an_error_message_dropped_again_goes_to_error_again(
    store: Store, tmp_path: Path
) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    bad = adt("A01", "FE1", charset="ASCII").replace(b"Examplar", b"Ex\xe1mplar")
    await _drop(store, inbox, "first.hl7", bad)
    again = await _drop(store, inbox, "again.hl7", bad)
    assert again.files_error == 1 and again.files_done == 0
    assert (inbox / "error" / "again.hl7").exists() and not (inbox / "done" / "again.hl7").exists()


@pytest.mark.anyio
async def test_the_error_reason_names_the_ack_code_ar_or_ae(store: Store, tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    await _drop(store, inbox, "ar.hl7", adt("A01", "FE2", version="9.9"))
    reason = (inbox / "error" / "ar.hl7.error.txt").read_text()
    assert reason == "1 message(s) stored with an error ACK (AR)\n"
