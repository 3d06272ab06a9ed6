"""HL7 v2 acknowledgments (ACK) for received messages.

The ACK echoes the message's control id (MSH-10) in MSA-2, swaps sender and receiver
(MSH-3/4 <-> MSH-5/6), reuses the message's encoding characters, version (MSH-12),
processing id (MSH-11) and character set (MSH-18), and on errors carries an ERR segment
with an HL7 table 0357 code (ERR-3 from v2.5 on, ERR-1 before).

Modes: original mode (MSH-15 and MSH-16 both empty) answers AA/AE/AR; enhanced mode
answers with an accept acknowledgment CA/CE/CR, sent or not per MSH-15 (AL always, NE
never, ER only on error, SU only on success). careloop does its application processing
after the commit, asynchronously, so it sends no separate application ACK (MSH-16).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Final, Literal

from careloop.hl7v2.parse import DEFAULT_ENCODING, Encoding, Header, escape

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

    def render(self, timestamp: str, control_id: str, error: AckError | None = None) -> bytes:
        # Deterministic: the same message always gets byte-identical ACK ids.
        ack_id = ("A" + control_id)[:199] if control_id else "A" + timestamp
        text = self.head + timestamp + self.middle + ack_id + self.tail + control_id
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
        version = header.version or "2.5.1"
        trigger = header.get(9, 2)
        sending_app, sending_fac = header.raw(5) or receiver, header.raw(6)
        receiving_app, receiving_fac = header.raw(3), header.raw(4)
        processing = header.raw(11) or "P"
        charset = header.raw(18).split(enc.repetition, 1)[0]
    else:
        version, trigger, sending_app, sending_fac = "2.5.1", "", receiver, ""
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
) -> bytes:
    """The ACK message for ``header`` (None when the message had no readable MSH)."""
    control_id = header.control_id if header is not None else ""
    return ack_template(header, outcome, style, receiver).render(hl7_timestamp(at), control_id, error)


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
