"""Accepting HL7 v2 payloads, shared by the MLLP and file connectors (pure, no I/O).

A payload (one message, several, or an FHS/BHS batch) becomes one ``RawIn`` per message,
each with its kind (``hl7v2:<MSH-9.1>^<MSH-9.2>``), its dedup key (``MSH-3|MSH-4|MSH-10``)
and the ACK to send once it is committed (stored with it, so a duplicate gets the same
bytes). Messages whose bytes do not decode in their MSH-18 character set, that hold a
segment whose id cannot be read (``parse.check_segments``: the mapper could not parse them),
or that fail ``strict`` structure validation, are still kept, with an AE ACK carrying the ERR.
Messages whose MSH is unusable (``header_error``: MSH-12 missing or unsupported, MSH-9 or
MSH-10 missing, MSH-7 invalid) are kept too, with an AR (CR in enhanced mode) ACK.

A message kept with an error (AE or AR) is stored with status ``error`` and the reason
(``RawIn.rejected``), never mapped: the sender was told it was not processed. It has the
header ``hl7_error`` (the table 0357 code) and ``hl7_ack`` (the acknowledgment code), and
a dedup key over its bytes as well as its control id: the same bytes sent again are a
duplicate (same ACK back), a corrected message sent again under the same control id is
not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from careloop.clock import Clock
from careloop.hl7v2.ack import AckError, AckStyle, Outcome, ack_code, build_ack, header_error, should_send
from careloop.hl7v2.parse import (
    Header,
    HL7FormatError,
    batch_header,
    check_segments,
    decode,
    is_batch,
    read_header,
    split_messages,
)
from careloop.model import RawIn

CONTENT_TYPE = "x-application/hl7-v2+er7"


@dataclass
class Accepted:
    """One frame's fate: raw messages to store, or a NACK to send right away."""

    items: list[RawIn]
    nack: bytes | None = None
    batch: bool = False
    headers: list[Header | None] = field(default_factory=list)
    batch_header: bytes | None = None  # the batch's BHS segment, answered by the ACK batch's


class HL7Acceptor:
    """Turns payloads into raw messages with their ACKs for one connector."""

    def __init__(
        self,
        connector_id: str,
        clock: Clock,
        timezone: str,
        style: AckStyle = "auto",
        strict: bool = False,
        receiving_application: str = "CARELOOP",
    ) -> None:
        self.id, self.clock, self.timezone, self.style = connector_id, clock, timezone, style
        self.strict, self.receiving_application = strict, receiving_application

    def accept(self, body: bytes, headers: Mapping[str, str]) -> Accepted:
        now = self.clock.now()
        style = self.style
        messages = split_messages(body)
        out = Accepted([], batch=len(messages) > 1 or is_batch(body), batch_header=batch_header(body))
        for msg in messages:
            hdr = read_header(msg)
            error = header_error(hdr)
            outcome = Outcome.OK if error is None else Outcome.REJECT
            if error is None:
                try:
                    text, _ = decode(msg, hdr)
                    check_segments(text, hdr.enc)
                except HL7FormatError as exc:  # CharsetError, or a segment that cannot be read
                    error = AckError(exc.code, str(exc), exc.location)
                if error is None and self.strict:
                    error = strict_check(msg)
                outcome = Outcome.OK if error is None else Outcome.ERROR
            reply = (
                build_ack(hdr, outcome, now, error, style, self.receiving_application)
                if should_send(hdr, outcome, style)
                else None
            )
            mtype, trigger = hdr.message_type
            kind = f"hl7v2:{mtype or 'UNKNOWN'}^{trigger}" if trigger else f"hl7v2:{mtype or 'UNKNOWN'}"
            hdrs = {"timezone": self.timezone, **dict(headers)}
            key = dedup_key(hdr)
            rejected = None
            if error is not None:
                hdrs["hl7_error"] = str(error.code)
                hdrs["hl7_ack"] = ack = ack_code(hdr, outcome, style)
                key = error_dedup_key(hdr, msg)
                where = f" at {error.location}" if error.location else ""
                rejected = f"not processed ({ack}): {error.message} (HL7 table 0357 code {error.code}{where})"
            out.items.append(RawIn(self.id, kind[:64], msg, CONTENT_TYPE, key, hdrs, reply, rejected))
            out.headers.append(hdr)
        return out


def dedup_key(hdr: Header) -> str | None:
    """``MSH-3|MSH-4|MSH-10``; None without a control id (nothing to deduplicate on)."""
    ctrl = hdr.control_id.strip()
    if not ctrl:
        return None
    key = f"{hdr.raw(3)}|{hdr.raw(4)}|{ctrl}"
    if len(key) > 255:
        # Keep the control id readable at the end (the audit log shows it).
        key = "sha256:" + hashlib.sha256(key.encode()).hexdigest() + "|" + ctrl[:150]
    return key


def error_dedup_key(hdr: Header, message: bytes) -> str:
    """The dedup key of a message kept with an error ACK: ``sha256:<hex>|MSH-10``, the hash
    over ``MSH-3|MSH-4`` and the message's bytes."""
    digest = hashlib.sha256(f"{hdr.raw(3)}|{hdr.raw(4)}|".encode("latin-1", "replace") + message)
    return "sha256:" + digest.hexdigest() + "|" + hdr.control_id.strip()[:150]


def strict_check(message: bytes) -> AckError | None:
    """Structure validation with hl7apy (opt-in: about 100 messages/s). PHI-free errors."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.exceptions import HL7apyException
    from hl7apy.parser import parse_message

    try:
        text = message.decode("utf-8", errors="replace").replace("\n", "\r")
        parsed = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        parsed.validate()
    except HL7apyException as exc:
        name = type(exc).__name__
        code = {
            "UnsupportedVersion": 203,
            "InvalidName": 200,
            "ChildNotFound": 100,
            "ChildNotValid": 100,
            "MaxChildLimitReached": 100,
            "ValidationError": 101,
        }.get(name, 102)
        return AckError(code, f"structure validation failed ({name})")
    except Exception as exc:  # hl7apy raises plain errors on some malformed input
        return AckError(102, f"structure validation failed ({type(exc).__name__})")
    return None
