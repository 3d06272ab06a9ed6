"""SMS encoding and segment counting (GSM 03.38 GSM-7 versus UCS-2).

A message whose every character is in the GSM-7 default alphabet (or its extension
table, whose characters cost two septets: an escape and the character) is sent as
GSM-7: 160 septets in one segment, 153 per segment once it has to be split (the
concatenation header takes the rest). Any other character switches the whole message
to UCS-2: 70 UTF-16 code units in one segment, 67 per segment when split. Carriers do
not split an escape pair or a surrogate pair across segments, so packing is greedy per
character, not a division.

``check_sms_length`` is what ``careloop config check`` calls for every SMS template; its
problems name sizes and encodings only, never the text (templates are not PHI, but the
rule "no message text in errors" is kept everywhere).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")

Encoding = Literal["GSM-7", "UCS-2"]

GSM7_SINGLE, GSM7_PART = 160, 153
UCS2_SINGLE, UCS2_PART = 70, 67
DEFAULT_MAX_SEGMENTS = 3


@dataclass(frozen=True, slots=True)
class SmsSize:
    encoding: Encoding
    units: int  # septets (GSM-7) or UTF-16 code units (UCS-2)
    segments: int


def is_gsm7(text: str) -> bool:
    return all(ch in GSM7_BASIC or ch in GSM7_EXTENSION for ch in text)


def _costs(text: str, encoding: Encoding) -> list[int]:
    if encoding == "GSM-7":
        return [2 if ch in GSM7_EXTENSION else 1 for ch in text]
    return [2 if ord(ch) > 0xFFFF else 1 for ch in text]


def measure(text: str) -> SmsSize:
    """The encoding, length in units and segment count of ``text``."""
    encoding: Encoding = "GSM-7" if is_gsm7(text) else "UCS-2"
    costs = _costs(text, encoding)
    units = sum(costs)
    single, part = (GSM7_SINGLE, GSM7_PART) if encoding == "GSM-7" else (UCS2_SINGLE, UCS2_PART)
    if units == 0:
        return SmsSize(encoding, 0, 1)
    if units <= single:
        return SmsSize(encoding, units, 1)
    segments, used = 1, 0
    for cost in costs:
        if used + cost > part:  # an escape or surrogate pair never straddles two segments
            segments, used = segments + 1, 0
        used += cost
    return SmsSize(encoding, units, segments)


def non_gsm7_characters(text: str) -> list[str]:
    """Code points that force UCS-2 (as ``U+XXXX``, so a report shows no text)."""
    return sorted({f"U+{ord(ch):04X}" for ch in text if ch not in GSM7_BASIC and ch not in GSM7_EXTENSION})


def check_sms_length(text: str, max_segments: int = DEFAULT_MAX_SEGMENTS, reserve: int = 0) -> list[str]:
    """Problems with sending ``text`` as SMS within ``max_segments`` (empty list: fine).

    ``reserve`` adds room for what placeholders expand to (a date, a clinic name): the
    caller checks the template source and passes an estimate of the growth in characters.
    """
    # Filler "x" costs one unit in either encoding and never changes the encoding.
    size = measure(text + "x" * max(0, reserve))
    if size.segments <= max_segments:
        return []
    problem = (
        f"is {size.segments} SMS segments ({size.encoding}, {size.units} units), more than max_segments "
        f"{max_segments}"
    )
    forcing = non_gsm7_characters(text)
    if forcing:
        problem += f"; characters forcing UCS-2: {', '.join(forcing[:8])}"
    return [problem]


# What one ``{{ ... }}`` placeholder is assumed to expand to at most (a date like
# "Thu Mar 12", a time, a clinic's short name); the check is an estimate, the send-time
# check in the channel is exact.
PLACEHOLDER_WIDTH = 20
_EXPR = re.compile(r"\{\{.*?\}\}", re.S)
_STMT = re.compile(r"\{%.*?%\}|\{#.*?#\}", re.S)


def template_estimate(source: str) -> str:
    """A stand-in for a Jinja template's longest likely rendering: each expression becomes
    ``PLACEHOLDER_WIDTH`` GSM-7 characters, statements and comments vanish."""
    return _EXPR.sub("x" * PLACEHOLDER_WIDTH, _STMT.sub("", source))
