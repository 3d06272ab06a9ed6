"""A message holding a line that is not a segment (no readable segment id) cannot be
mapped: it is answered AE with ERR code 100 and kept with status ``error`` (on every
ingest path that goes through ``HL7Acceptor``), never AA and then dead-lettered."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlmodel import Session, select

from careloop.clock import SystemClock
from careloop.db import make_engine, upgrade
from careloop.hl7v2.parse import HL7FormatError, parse_bytes
from careloop.ingest import IngestSink
from careloop.store import Store
from careloop.tables import RawMessage
from connectors.hl7v2_accept import HL7Acceptor
from connectors.hl7v2_file import FileConfig, FileConnector
from tests.hl7_support import adt

STRAY = b"this line is not a segment\r"


def test_a_stray_line_gets_ae_with_err_100_and_is_kept_as_error() -> None:
    body = adt("A01", "G1") + STRAY
    with pytest.raises(HL7FormatError):
        parse_bytes(body)  # what the mapper would meet
    acc = HL7Acceptor("adt", SystemClock(), "UTC").accept(body, {})
    (item,) = acc.items
    assert item.reply is not None
    ack = item.reply.decode().split("\r")
    assert ack[1] == "MSA|AE|G1"
    assert ack[2].startswith(
        "ERR|||100^Segment sequence error^HL70357|E||||segment 5 has an invalid segment id"
    )
    assert item.rejected is not None and "code 100" in item.rejected
    assert item.headers["hl7_ack"] == "AE"


def test_lf_separated_message_with_a_lower_case_segment_is_not_acknowledged_aa() -> None:
    body = adt("A01", "G2").replace(b"\r", b"\n").replace(b"PV1|", b"pv1|")
    (item,) = HL7Acceptor("adt", SystemClock(), "UTC").accept(body, {}).items
    assert item.reply is not None and b"MSA|AE|G2" in item.reply


def test_valid_messages_with_z_segments_and_blank_lines_are_still_aa() -> None:
    body = adt("A01", "G3", extra=["ZPD|1|x", "Z01|2"]) + b"\r\n\r"
    (item,) = HL7Acceptor("adt", SystemClock(), "UTC").accept(body, {}).items
    assert item.reply is not None and b"MSA|AA|G3" in item.reply and item.rejected is None


def test_file_with_a_stray_line_goes_to_error_and_its_message_is_kept(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/f.db")
    upgrade(engine)
    inbox = tmp_path / "in"
    conn = FileConnector("files", FileConfig(plugin="hl7v2_file", directory=inbox, min_age_s=0))

    async def run() -> None:
        inbox.mkdir()
        (inbox / "a.hl7").write_bytes(adt("A01", "G4") + STRAY)
        await conn.start(IngestSink(Store(engine, SystemClock())))
        try:
            await conn.scan_once()
        finally:
            await conn.stop()

    asyncio.run(run())
    assert (conn.error_dir / "a.hl7").exists() and not (conn.done_dir / "a.hl7").exists()
    with Session(engine) as s:
        (row,) = s.exec(select(RawMessage)).all()
    engine.dispose()
    assert row.status == "error" and row.dedup_key is not None and row.dedup_key.endswith("|G4")
