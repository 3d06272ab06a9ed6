"""Helpers for the HL7 v2 tests: synthetic message builders (invented people only),
MLLP framing and a blocking MLLP client."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from connectors.base import RawSink

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
HL7_FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "hl7"


def seg(name: str, fields: dict[int, str]) -> str:
    n = max(fields) if fields else 0
    return "|".join([name, *(fields.get(i, "") for i in range(1, n + 1))])


def msh(
    msg_type: str,
    control_id: str,
    *,
    ts: str = "20260302090500-0500",
    version: str = "2.5.1",
    charset: str = "",
    accept_ack: str = "",
    app_ack: str = "",
    sender: str = "NWADT",
    facility: str = "NORTHWIND",
) -> str:
    fields = {
        2: "^~\\&",
        3: sender,
        4: facility,
        5: "CARELOOP",
        6: "CARELOOP",
        7: ts,
        9: msg_type,
        10: control_id,
        11: "P",
        12: version,
        15: accept_ack,
        16: app_ack,
        18: charset,
    }
    # MSH-1 is the separator itself, so MSH-2 is the first text after "MSH|".
    n = max(k for k, v in fields.items() if v)
    return "MSH|" + "|".join(fields.get(i, "") for i in range(2, n + 1))


PID_DEFAULT = seg(
    "PID",
    {
        1: "1",
        3: "NW200001^^^NWH^MR",
        5: "Examplar^Dora^Q",
        7: "19900101",
        8: "F",
        11: "1 Test Way^^Springfield^MA^01101^USA^H",
        13: "^PRN^PH^^1^555^5550111~^NET^Internet^Dora.Examplar@Example.org",
        15: "es^Spanish^HL70296",
    },
)


def adt(
    trigger: str,
    control_id: str = "C1",
    *,
    pid: str = PID_DEFAULT,
    pv1: dict[int, str] | None = None,
    extra: list[str] | None = None,
    evn_ts: str = "20260302081500-0500",
    **kw: str,
) -> bytes:
    pv1_fields = {1: "1", 2: "I", 3: "4W^412^B^NWH", 19: "V9001^^^NWH^VN", 44: "20260302081000-0500"}
    if pv1 is not None:
        pv1_fields.update(pv1)
    segs = [
        msh(f"ADT^{trigger}^ADT_{trigger}", control_id, **kw),
        seg("EVN", {1: trigger, 2: evn_ts}),
        pid,
        seg("PV1", pv1_fields),
        *(extra or []),
    ]
    return ("\r".join(segs) + "\r").encode()


def siu(
    trigger: str,
    control_id: str = "S1",
    *,
    status: str = "Booked",
    pid: str = PID_DEFAULT,
    tq1: bool = True,
    sch11: str = "^^30^20260312103000-0400^20260312110000-0400",
    ais_start: str = "20260312103000-0400",
    **kw: str,
) -> bytes:
    segs = [
        msh(f"SIU^{trigger}^SIU_{trigger}", control_id, **kw),
        seg(
            "SCH",
            {
                1: "APT-1^NWSCHED",
                2: "APT-1F^NWSCHED",
                6: "PATCANCEL^Patient request^HL70276",
                7: "FOLLOWUP^Follow-up^HL70276",
                8: "ROUTINE^Routine^HL70277",
                9: "30",
                10: "min",
                11: sch11,
                25: status,
            },
        ),
    ]
    if tq1:
        segs.append(seg("TQ1", {1: "1", 7: "20260312103000-0400", 8: "20260312110000-0400"}))
    segs += [
        pid,
        seg("RGS", {1: "1", 2: "A"}),
        seg("AIS", {1: "1", 2: "A", 3: "99213^Office visit^C4", 4: ais_start, 7: "45", 8: "min"}),
        seg("AIL", {1: "1", 2: "A", 3: "CARDCL^^^NWH^^^Heart Center^2", 4: "C^Clinic^HL70305"}),
        seg("AIP", {1: "1", 2: "A", 3: "1234567890^Doctorson^Dana^^^Dr^^^NPI", 4: "D^Physician^HL70443"}),
    ]
    return ("\r".join(segs) + "\r").encode()


def frame(payload: bytes) -> bytes:
    return VT + payload + FS + CR


def read_frame(sock: socket.socket, buf: bytearray) -> bytes:
    """One MLLP frame's content from a blocking socket (``buf`` keeps leftovers)."""
    while True:
        end = buf.find(FS + CR)
        if end >= 0:
            start = buf.find(VT)
            payload = bytes(buf[start + 1 : end])
            del buf[: end + 2]
            return payload
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk


def msa(ack: bytes) -> tuple[str, str]:
    """(MSA-1, MSA-2) of an ACK."""
    for line in ack.split(b"\r"):
        if line.startswith(b"MSA"):
            parts = line.decode().split(line[3:4].decode())
            return parts[1], (parts[2] if len(parts) > 2 else "")
    raise AssertionError("no MSA segment")


def ack_id(ack: bytes) -> str:
    """The ACK's own control id (its MSH-10)."""
    line = ack.split(b"\r", 1)[0].decode("latin-1")
    return line.split(line[3])[9]


def without_ack_id(ack: bytes) -> bytes:
    """The ACK with its own control id (unique per ACK) blanked, to compare two ACKs."""
    head, sep, rest = ack.partition(b"\r")
    fs = head[3:4]
    parts = head.split(fs)
    parts[9] = b"*"
    return fs.join(parts) + sep + rest


def segment(ack: bytes, name: str) -> list[str] | None:
    for line in ack.split(b"\r"):
        if line.startswith(name.encode()):
            return line.decode("latin-1").split("|")
    return None


def fixture_messages() -> list[bytes]:
    """Every message in fixtures/hl7 (files may hold several)."""
    from careloop.hl7v2.parse import split_messages

    return [m for f in sorted(HL7_FIXTURES.glob("*.hl7")) for m in split_messages(f.read_bytes())]


class BackgroundListener:
    """An MLLP listener on its own event loop thread (for blocking clients and CLIs)."""

    def __init__(self, sink: RawSink, **config: object) -> None:
        import asyncio
        import threading

        from connectors.hl7v2_mllp import MLLPConfig, MLLPConnector

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.connector = MLLPConnector("adt", MLLPConfig(plugin="hl7v2_mllp", port=port, **config))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.connector.start(sink), self.loop).result(10)

    @property
    def port(self) -> int:
        return self.connector.port

    def close(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.connector.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
