"""Messages whose MSH cannot be acknowledged as received are rejected (AR, CR in enhanced
mode) with an ERR naming the field (HL7 table 0357), and still kept; every ACK has its own
control id. Over real sockets, with python-hl7's client and a plain asyncio one."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import hl7.client
import pytest
from sqlmodel import Session, col, select

from careloop.clock import VirtualClock
from careloop.hl7v2.ack import AckIds, Outcome, build_ack, header_error
from careloop.hl7v2.parse import is_dtm, normalize_version, parse_bytes, read_header
from careloop.ingest import IngestSink
from careloop.store import Store
from careloop.tables import RawMessage
from connectors.hl7v2_mllp import MLLPConfig, MLLPConnector
from tests.hl7_support import PID_DEFAULT, ack_id, adt, frame, msa, msh, segment

AT = datetime(2026, 3, 2, 14, 0, 7, tzinfo=UTC)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def started(store: Store, **kw: Any) -> MLLPConnector:
    c = MLLPConnector("adt", MLLPConfig(plugin="hl7v2_mllp", port=free_port(), idle_timeout_s=5, **kw))
    await c.start(IngestSink(store))
    return c


@pytest.fixture
async def listener(store: Store) -> AsyncIterator[MLLPConnector]:
    c = await started(store)
    yield c
    await c.stop()


async def exchange(port: int, payloads: list[bytes], replies: int | None = None) -> list[bytes]:
    """Send every payload framed on one connection, then read ``replies`` ACKs."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    try:
        for p in payloads:
            writer.write(frame(p))
        await writer.drain()
        for _ in range(len(payloads) if replies is None else replies):
            data = await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 10)
            out.append(data[data.index(b"\x0b") + 1 : -2])
    finally:
        writer.close()
    return out


def unframe(data: bytes) -> bytes:
    assert data[:1] == b"\x0b" and data.endswith(b"\x1c\r")
    return data[1:-2]


def rows(store: Store) -> list[RawMessage]:
    with Session(store.engine) as s:
        return list(s.exec(select(RawMessage).order_by(col(RawMessage.id))).all())


def err(ack: bytes) -> tuple[str, str]:
    """(ERR-2 location, ERR-3.1 code) of a v2.5+ ACK."""
    line = segment(ack, "ERR")
    assert line is not None, ack
    return line[2], line[3].split("^")[0]


def body(msh_line: str) -> bytes:
    return (msh_line + "\rEVN|A01|20260302081500-0500\r" + PID_DEFAULT + "\rPV1|1|I\r").encode()


NO_CONTROL_ID = body(msh("ADT^A01^ADT_A01", ""))
NO_TYPE = body(msh("", "NT1"))
BAD_VERSION = body(msh("ADT^A01^ADT_A01", "BV1", version="9.9"))
BAD_TIME = body(msh("ADT^A01^ADT_A01", "BT1", ts="20261340250000"))


@pytest.mark.anyio
async def test_each_unusable_msh_gets_ar_with_the_field_and_is_kept(
    listener: MLLPConnector, store: Store
) -> None:
    def send() -> list[bytes]:
        with hl7.client.MLLPClient("127.0.0.1", listener.port) as client:
            return [
                unframe(client.send_message(m))
                for m in (NO_CONTROL_ID, NO_TYPE, BAD_VERSION, BAD_TIME, adt("A01", "OK1"))
            ]

    no_id, no_type, bad_version, bad_time, ok = await asyncio.to_thread(send)
    assert msa(no_id) == ("AR", "") and err(no_id) == ("MSH^1^10", "101")
    assert msa(no_type) == ("AR", "NT1") and err(no_type) == ("MSH^1^9", "101")
    assert msa(bad_version) == ("AR", "BV1") and err(bad_version) == ("MSH^1^12", "203")
    assert parse_bytes(bad_version).msh.raw(12) == "2.5.1"  # 9.9 is not echoed
    assert msa(bad_time) == ("AR", "BT1") and err(bad_time) == ("MSH^1^7", "102")
    assert msa(ok) == ("AA", "OK1") and segment(ok, "ERR") is None
    stored = rows(store)
    assert [r.body for r in stored] == [NO_CONTROL_ID, NO_TYPE, BAD_VERSION, BAD_TIME, adt("A01", "OK1")]
    assert [(r.headers or {}).get("hl7_error") for r in stored] == ["101", "101", "203", "102", None]
    assert [(r.headers or {}).get("hl7_ack") for r in stored] == ["AR"] * 4 + [None]
    assert [r.ack for r in stored] == [no_id, no_type, bad_version, bad_time, ok]
    # Refused messages are kept for inspection, not mapped: only the accepted one waits.
    assert [r.status for r in stored] == ["error"] * 4 + ["pending"]
    assert stored[2].status_reason is not None and "code 203 at MSH^1^12" in stored[2].status_reason
    assert listener.stats.stored == 5
    assert len({ack_id(a) for a in (no_id, no_type, bad_version, bad_time, ok)}) == 5


@pytest.mark.anyio
async def test_enhanced_mode_rejects_with_cr_as_msh_15_asks(listener: MLLPConnector, store: Store) -> None:
    def bad(accept_ack: str, n: int) -> bytes:
        return body(msh("ADT^A01^ADT_A01", f"E{n}", version="9.9", accept_ack=accept_ack, app_ack="NE"))

    good_su = adt("A01", "G1", accept_ack="SU", app_ack="NE")
    # NE and SU send nothing for a rejected message: the next reply is the next message's.
    acks = await exchange(listener.port, [bad("AL", 1), bad("ER", 2), bad("NE", 3), bad("SU", 4), good_su], 3)
    assert [msa(a) for a in acks] == [("CR", "E1"), ("CR", "E2"), ("CA", "G1")]
    assert err(acks[0]) == ("MSH^1^12", "203") and segment(acks[2], "ERR") is None
    assert [r.dedup_key.rsplit("|", 1)[-1] for r in rows(store) if r.dedup_key] == [
        "E1",
        "E2",
        "E3",
        "E4",
        "G1",
    ]


@pytest.mark.anyio
async def test_configured_mode_overrides_the_message_for_rejects_too(store: Store) -> None:
    enhanced, original = await started(store, ack_mode="enhanced"), await started(store, ack_mode="original")
    try:
        [cr] = await exchange(enhanced.port, [NO_TYPE])
        [ar] = await exchange(original.port, [body(msh("", "NT2", accept_ack="AL", app_ack="AL"))])
    finally:
        await enhanced.stop()
        await original.stop()
    assert msa(cr) == ("CR", "NT1") and msa(ar) == ("AR", "NT2")


@pytest.mark.anyio
async def test_a_corrected_message_under_the_same_control_id_is_not_a_duplicate(
    listener: MLLPConnector, store: Store
) -> None:
    fixed = adt("A01", "BT1")
    first, again, corrected, corrected_again = await exchange(
        listener.port, [BAD_TIME, BAD_TIME, fixed, fixed]
    )
    assert msa(first)[0] == "AR" and again == first  # the same bad bytes: a duplicate, same AR
    assert msa(corrected) == ("AA", "BT1") and corrected_again == corrected
    assert [r.body for r in rows(store)] == [BAD_TIME, fixed]
    assert listener.stats.duplicates == 2


@pytest.mark.anyio
async def test_a_message_without_control_id_in_v2_3_gets_an_eld_err_and_msa_3(
    listener: MLLPConnector,
) -> None:
    [ack] = await exchange(listener.port, [adt("A01", "", version="2.3")])
    line = segment(ack, "MSA")
    assert line is not None and line[1] == "AR" and line[2] == "" and "MSH-10" in line[3]
    eld = segment(ack, "ERR")
    assert eld is not None and eld[1] == "MSH^1^10^101&Required field missing&HL70357"
    assert parse_bytes(ack).msh.raw(12) == "2.3"


@pytest.mark.parametrize(
    ("version", "echo"),
    [
        ("2.3.1", "2.3.1"),
        ("2.5", "2.5"),
        ("2.5.1^USA^HL70399", "2.5.1"),  # VID: only the first component is the version id
        (" 2.4 ", "2.4"),
        ("V2.4", "2.4"),
        ("2.5.0", "2.5"),
        ("2.8.2", "2.8.2"),
        ("2.1", "2.1"),
    ],
)
def test_vendor_spellings_of_supported_versions_are_accepted(version: str, echo: str) -> None:
    c = MLLPConnector("adt", MLLPConfig(plugin="hl7v2_mllp"))
    [raw] = c.accept(adt("A01", "V1", version=version), {})
    assert raw.reply is not None and msa(raw.reply) == ("AA", "V1")
    assert parse_bytes(raw.reply).msh.raw(12) == echo


@pytest.mark.parametrize(
    ("version", "ts", "location", "code"),
    [
        ("", "20260302090500-0500", "MSH^1^12", "101"),
        ("3.0", "20260302090500-0500", "MSH^1^12", "203"),
        ("2.9", "20260302090500-0500", "MSH^1^12", "203"),
        ("2.5.1.1", "20260302090500-0500", "MSH^1^12", "203"),
        ("2.5.1", "", "MSH^1^7", "101"),  # required from v2.5 on
        ("2.5.1", "2026-03-02", "MSH^1^7", "102"),
        ("2.5.1", "20260230", "MSH^1^7", "102"),  # no 30 February
        ("2.5.1", "20260302101500+1500", "MSH^1^7", "102"),
        ("2.5.1", "yesterday", "MSH^1^7", "102"),
    ],
)
def test_missing_or_invalid_header_fields_are_rejected(
    version: str, ts: str, location: str, code: str
) -> None:
    c = MLLPConnector("adt", MLLPConfig(plugin="hl7v2_mllp"))
    [raw] = c.accept(adt("A01", "H1", version=version, ts=ts), {})
    assert raw.reply is not None and msa(raw.reply) == ("AR", "H1")
    assert parse_bytes(raw.reply).msh.raw(12) == "2.5.1"
    assert err(raw.reply) == (location, code)


def test_the_first_unusable_field_is_reported_and_optional_msh_7_before_v2_5_is_fine() -> None:
    both = read_header(body(msh("", "", version="9.9")))
    error = header_error(both)
    assert error is not None and (error.code, error.location) == (203, "MSH^1^12")
    assert header_error(read_header(adt("A01", "T1", version="2.4", ts=""))) is None
    assert header_error(read_header(adt("A01", "T2", ts="20260302^S"))) is None  # TS with precision
    assert header_error(read_header(adt("A01", "T3", ts="20260302101500.1234-0500"))) is None
    assert normalize_version("2.3.1") == "2.3.1" and normalize_version("9.9") is None
    assert is_dtm("2026") and not is_dtm("20261301")


def test_ack_ids_are_unique_short_and_not_the_timestamp() -> None:
    hdr = read_header(adt("A01", "U1"))
    acks = [build_ack(hdr, Outcome.OK, AT) for _ in range(1000)]  # all in the same second
    ids = [ack_id(a) for a in acks]
    assert len(set(ids)) == 1000 and all(len(i) <= 20 for i in ids)
    assert not any("20260302140007" in i for i in ids)
    fixed = AckIds("AT")
    assert [fixed(), fixed()] == ["AT1", "AT2"]
    assert ack_id(build_ack(hdr, Outcome.OK, AT, ack_id="X9")) == "X9"


def test_two_listeners_in_the_same_second_never_share_an_ack_id() -> None:
    clock = VirtualClock(AT)
    a = MLLPConnector("a", MLLPConfig(plugin="hl7v2_mllp"), clock=clock)
    b = MLLPConnector("b", MLLPConfig(plugin="hl7v2_mllp"), clock=clock)
    ids = [ack_id(c.accept(adt("A01", "SAME"), {})[0].reply or b"") for c in (a, b, a, b)]
    assert len(set(ids)) == 4
