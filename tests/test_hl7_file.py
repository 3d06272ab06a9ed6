"""The HL7 v2 file connector: files are committed, then moved to done/ or error/."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from sqlmodel import Session, select

from careloop.ingest import IngestSink
from careloop.store import Store
from careloop.tables import RawMessage
from connectors.hl7v2_file import FileConfig, FileConnector
from tests.hl7_support import HL7_FIXTURES, adt, msh, siu


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _old(path: Path) -> None:
    past = time.time() - 60
    os.utime(path, (past, past))


def _rows(store: Store) -> list[RawMessage]:
    with Session(store.engine) as s:
        return list(s.exec(select(RawMessage)).all())


@pytest.mark.anyio
async def test_files_are_stored_then_moved_to_done_or_error(store: Store, tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    (inbox / "one.hl7").write_bytes(adt("A01", "F1").replace(b"\r", b"\n"))
    (inbox / "batch.hl7").write_bytes(
        b"FHS|^~\\&\rBHS|^~\\&\r" + adt("A03", "F2") + siu("S12", "F3") + b"BTS|2\rFTS|1\r"
    )
    (inbox / "garbage.hl7").write_bytes(b"this is not hl7")
    bad = (msh("ADT^A08", "F4", charset="ASCII") + "\rPID|1||X^^^NWH||Jos\xe9").encode("latin-1") + b"\r"
    (inbox / "charset.hl7").write_bytes(bad)
    (inbox / "fresh.hl7").write_bytes(adt("A01", "F5"))  # still being written: left alone
    (inbox / "notes.txt").write_text("ignored")
    for name in ("one.hl7", "batch.hl7", "garbage.hl7", "charset.hl7"):
        _old(inbox / name)

    c = FileConnector("files", FileConfig(directory=inbox, min_age_s=5))
    await c.start(IngestSink(store))
    try:
        await c.scan_once()
        await c.scan_once()  # nothing left to do: files already moved
    finally:
        await c.stop()
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["batch.hl7", "one.hl7"]
    errors = sorted(p.name for p in (inbox / "error").iterdir())
    assert errors == ["charset.hl7", "charset.hl7.error.txt", "garbage.hl7", "garbage.hl7.error.txt"]
    assert "AE" in (inbox / "error" / "charset.hl7.error.txt").read_text()
    assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == ["fresh.hl7", "notes.txt"]
    keys = sorted(r.dedup_key.rsplit("|", 1)[-1] for r in _rows(store) if r.dedup_key)
    assert keys == ["F1", "F2", "F3", "F4"]  # the undecodable message is kept
    assert c.health().ok is False


@pytest.mark.anyio
async def test_a_file_seen_again_after_a_crash_is_not_stored_twice(store: Store, tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    data = (HL7_FIXTURES / "siu_s12_booked.hl7").read_bytes()
    sink = IngestSink(store)
    sink.put_sync(
        FileConnector("files", FileConfig(directory=inbox)).accept(data, {})
    )  # committed, not moved
    (inbox / "again.hl7").write_bytes(data)
    _old(inbox / "again.hl7")
    c = FileConnector("files", FileConfig(directory=inbox, poll_interval_s=0.05))
    await c.start(sink)
    try:
        for _ in range(100):
            if (inbox / "done" / "again.hl7").exists():
                break
            await asyncio.sleep(0.05)
    finally:
        await c.stop()
    assert (inbox / "done" / "again.hl7").exists()
    assert len(_rows(store)) == 2


def test_config_requires_a_directory() -> None:
    with pytest.raises(ValueError):
        FileConfig.model_validate({"plugin": "hl7v2_file"})
