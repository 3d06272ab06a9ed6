"""Durations ("72h", "30m", "2d", "1w") and anchor expressions ("appointment.start - 72h")."""

from __future__ import annotations

import re
from datetime import timedelta

_DUR = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_ANCHOR = re.compile(r"^\s*([a-z_.]+)\s*(?:([+-])\s*(\d+\s*[smhdw]))?\s*$")

ANCHORS = frozenset(
    {
        "now",
        "event",
        "appointment.start",
        "appointment.end",
        "encounter.start",
        "encounter.end",
        "instructions.delivered",
    }
)


def parse_duration(text: str) -> timedelta:
    m = _DUR.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration like 72h, 30m, 2d or 1w")
    return timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})


def parse_anchor(text: str) -> tuple[str, timedelta]:
    """``"appointment.start - 72h"`` -> ("appointment.start", -72h)."""
    m = _ANCHOR.match(text)
    if not m or m.group(1) not in ANCHORS:
        raise ValueError(
            f"{text!r} must be one of {sorted(ANCHORS)} optionally followed by + or - a duration"
        )
    offset = parse_duration(m.group(3)) if m.group(3) else timedelta(0)
    return m.group(1), (-offset if m.group(2) == "-" else offset)
