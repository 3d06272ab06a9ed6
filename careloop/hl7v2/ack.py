"""HL7 v2 acknowledgments (ACK) for received messages.

The ACK echoes the message's control id (MSH-10) in MSA-2, swaps sender and receiver
(MSH-3/4 <-> MSH-5/6), reuses the message's encoding characters, version (MSH-12),
processing id (MSH-11) and character set (MSH-18), and on errors carries an ERR segment
with an HL7 table 0357 code (ERR-3 from v2.5 on, ERR-1 before). An MSH-12 that is not a
supported version is not echoed: the ACK then says 2.5.1. The ACK's own control id
(its MSH-10) is unique per ACK (``AckIds``: a random per-process prefix and a counter),
so two ACKs never share one, whatever the senders' control ids.

Rejected (AR/CR, ``header_error``): a message whose MSH cannot be acknowledged or read
reliably: MSH-12 missing or not a supported version (203), MSH-9 or MSH-10 missing (101),
MSH-7 not a valid DTM, or missing from v2.5 on where it is required (102/101).

Modes: original mode (MSH-15 and MSH-16 both empty) answers AA/AE/AR; enhanced mode
answers with an accept acknowledgment CA/CE/CR, sent or not per MSH-15 (AL always, NE
never, ER only on error, SU only on success). careloop does its application processing
after the commit, asynchronously, so it sends no separate application ACK (MSH-16).
"""

from __future__ import annotations

import base64
import itertools
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Final, Literal

from careloop.hl7v2.parse import DEFAULT_ENCODING, Encoding, Header, escape, is_dtm, normalize_version

DEFAULT_VERSION: Final = "2.5.1"  # the ACK's MSH-12 when the message's is missing or unsupported

# HL7 table 0357, message error condition codes.
ERROR_CODES: Final[dict[int, str]] = {
    0: "Message accepted",
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    104: "Value too long",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    205: "Duplicate key identifier",
    206: "Application record locked",
    207: "Application internal error",
}


class Outcome(Enum):
    OK = "ok"  # AA / CA
    ERROR = "error"  # AE / CE
    REJECT = "reject"  # AR / CR


_ORIGINAL: Final = {Outcome.OK: "AA", Outcome.ERROR: "AE", Outcome.REJECT: "AR"}
_ENHANCED: Final = {Outcome.OK: "CA", Outcome.ERROR: "CE", Outcome.REJECT: "CR"}

AckStyle = Literal["auto", "original", "enhanced"]


@dataclass(frozen=True, slots=True)
class AckError:
    """One error to report in ERR: a table 0357 code, a PHI-free text and a location."""

    code: int
    message: str
    location: str = ""  # ERL: "SEG^seq^field[^rep^comp^sub]", e.g. "MSH^1^18"
    severity: str = "E"  # E error, W warning, I information (table 0516)


def shape_error(header: Header) -> AckError | None:
    """What rejects a message whatever its MSH-7 and MSH-10: MSH-12 then MSH-9."""
    raw_version = header.version
    if not raw_version.strip():
        return AckError(101, "MSH-12 (version id) is missing", "MSH^1^12")
    if normalize_version(raw_version) is None:
        return AckError(203, "MSH-12 (version id) is not a supported HL7 v2 version", "MSH^1^12")
    if not header.message_type[0]:
        return AckError(101, "MSH-9 (message type) is missing", "MSH^1^9")
    return None


def message_error(header: Header) -> AckError | None:
    """What rejects one message of a sender's MSH shape: MSH-10, then MSH-7."""
    if not header.control_id.strip():
        return AckError(101, "MSH-10 (message control id) is missing", "MSH^1^10")
    ts = header.get(7)
    if not ts.strip():
        # Required (R) from v2.5 on; optional before.
        if version_tuple(normalize_version(header.version) or DEFAULT_VERSION) >= (2, 5):
            return AckError(101, "MSH-7 (date/time of message) is missing", "MSH^1^7")
        return None
    if not is_dtm(ts):
        return AckError(102, "MSH-7 (date/time of message) is not a valid DTM", "MSH^1^7")
    return None


def header_error(header: Header) -> AckError | None:
    """The reason to reject (AR/CR) a message for its MSH, or None: the first of MSH-12,
    MSH-9, MSH-10, MSH-7 that is missing or invalid."""
    return shape_error(header) or message_error(header)


class AckIds:
    """Unique ACK control ids: ``A``, a random prefix drawn per process (8 base32
    characters, 40 bits; drawn again in a forked child) and a hexadecimal counter. 20
    characters at most (the MSH-10 length before v2.7) for the first 16**11 ACKs."""

    def __init__(self, prefix: str | None = None) -> None:
        self._fixed = prefix
        self.reseed()

    def reseed(self) -> None:
        self.prefix = (
            self._fixed
            if self._fixed is not None
            else "A" + base64.b32encode(secrets.token_bytes(5)).decode()
        )
        self._count = itertools.count(1)

    def __call__(self) -> str:
        return f"{self.prefix}{next(self._count):X}"


next_ack_id: Final = AckIds()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=next_ack_id.reseed)


def version_tuple(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for p in version.strip().split("."):
        if not p.isdigit():
            break
        parts.append(int(p))
    return tuple(parts) or (2, 5)


def is_enhanced(header: Header | None, style: AckStyle = "auto") -> bool:
    if style != "auto":
        return style == "enhanced"
    return header is not None and bool(header.get(15).strip() or header.get(16).strip())


def should_send(header: Header | None, outcome: Outcome, style: AckStyle = "auto") -> bool:
    """Whether an accept acknowledgment is sent at all (enhanced mode honours MSH-15)."""
    if not is_enhanced(header, style) or header is None:
        return True
    cond = header.get(15).strip().upper() or "AL"
    if cond == "NE":
        return False
    if cond == "ER":
        return outcome is not Outcome.OK
    if cond == "SU":
        return outcome is Outcome.OK
    return True


def ack_code(header: Header | None, outcome: Outcome, style: AckStyle = "auto") -> str:
    return (_ENHANCED if is_enhanced(header, style) else _ORIGINAL)[outcome]


def hl7_timestamp(at: datetime) -> str:
    """DTM with seconds and offset: 20260302140000+0000."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.strftime("%Y%m%d%H%M%S%z")


@dataclass(frozen=True, slots=True)
class AckTemplate:
    """An ACK with holes for what changes from one message to the next (the timestamp and
    the control id): every message of a sender with the same MSH shape shares one, so the
    MLLP hot path renders an ACK with a few string joins. ``build_ack`` renders through it,
    so the two cannot drift apart."""

    head: str  # MSH up to MSH-7
    middle: str  # MSH-8 .. MSH-9, up to MSH-10
    tail: str  # MSH-11 .. end, then MSA up to MSA-2
    codec: str
    enc: Encoding
    version: tuple[int, ...]
    send: bool  # should_send: whether this ACK is sent at all (enhanced mode, MSH-15)

    def render(
        self, timestamp: str, control_id: str, error: AckError | None = None, ack_id: str | None = None
    ) -> bytes:
        # A duplicate is answered with the stored ACK, so each rendering is a new ACK and
        # gets a new id (``ack_id`` only for tests that need fixed bytes).
        text = self.head + timestamp + self.middle + (ack_id or next_ack_id()) + self.tail + control_id
        if error is not None:
            if self.version < (2, 5):
                # MSA-3 text message, withdrawn in 2.5+
                text += self.enc.field + escape(error.message, self.enc)[:80]
            text += "\r" + _err(error, self.enc, self.version)
        return (text + "\r").encode(self.codec, errors="replace")


def ack_template(
    header: Header | None, outcome: Outcome, style: AckStyle = "auto", receiver: str = "CARELOOP"
) -> AckTemplate:
    """The ACK for ``header`` with the timestamp and control id left open."""
    enc: Encoding = header.enc if header is not None else DEFAULT_ENCODING
    fs = enc.field
    code = ack_code(header, outcome, style)
    if header is not None:
        version = normalize_version(header.version) or DEFAULT_VERSION
        trigger = header.get(9, 2)
        sending_app, sending_fac = header.raw(5) or receiver, header.raw(6)
        receiving_app, receiving_fac = header.raw(3), header.raw(4)
        processing = header.raw(11) or "P"
        charset = header.raw(18).split(enc.repetition, 1)[0]
    else:
        version, trigger, sending_app, sending_fac = DEFAULT_VERSION, "", receiver, ""
        receiving_app = receiving_fac = charset = ""
        processing = "P"
    v = version_tuple(version)
    if v >= (2, 3, 1):
        msg_type = f"ACK{enc.component}{trigger}{enc.component}ACK" if trigger else "ACK"
    else:
        msg_type = f"ACK{enc.component}{trigger}" if trigger else "ACK"
    enhanced = is_enhanced(header, style)
    rest = [processing, version, "", "", "NE" if enhanced else "", "NE" if enhanced else "", "", charset]
    while rest and not rest[-1]:  # version is never empty: the pops stop there
        rest.pop()
    return AckTemplate(
        head=fs.join(["MSH", enc.msh2, sending_app, sending_fac, receiving_app, receiving_fac, ""]),
        middle=fs.join(["", "", msg_type, ""]),
        tail=fs.join(["", *rest]) + "\r" + fs.join(["MSA", code, ""]),
        codec=_codec(charset),
        enc=enc,
        version=v,
        send=should_send(header, outcome, style),
    )


def build_ack(
    header: Header | None,
    outcome: Outcome,
    at: datetime,
    error: AckError | None = None,
    style: AckStyle = "auto",
    receiver: str = "CARELOOP",
    ack_id: str | None = None,
) -> bytes:
    """The ACK message for ``header`` (None when the message had no readable MSH)."""
    control_id = header.control_id if header is not None else ""
    return ack_template(header, outcome, style, receiver).render(hl7_timestamp(at), control_id, error, ack_id)


def _err(error: AckError, enc: Encoding, v: tuple[int, ...]) -> str:
    fs, cs, ss = enc.field, enc.component, enc.subcomponent
    label = ERROR_CODES.get(error.code, ERROR_CODES[207])
    loc = error.location.replace("^", cs)
    if v < (2, 5):
        # ERR-1 (ELD): segment^sequence^field^code&text&HL70357
        parts = ([*error.location.split("^"), "", "", ""])[:3]
        eld = cs.join([*parts, f"{error.code}{ss}{label}{ss}HL70357"])
        return fs.join(["ERR", eld])
    return fs.join(
        [
            "ERR",
            "",
            loc,
            f"{error.code}{cs}{label}{cs}HL70357",
            error.severity,
            "",
            "",
            "",
            escape(error.message, enc)[:250],
        ]
    )


def _codec(charset: str) -> str:
    from careloop.hl7v2.parse import CHARSETS

    return CHARSETS.get(" ".join(charset.strip().upper().split()), "utf-8")
