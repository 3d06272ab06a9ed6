"""Webhook authentication schemes, one module each, with one small contract.

A scheme checks a request *before* its body is parsed: it sees the raw body bytes, the
headers (lower-cased names), the method, the URL as the sender signed it and the time
now. It returns the sender's delivery id when the scheme carries one, and raises
``Rejected`` (PHI-free reason, HTTP status) otherwise.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """What a scheme may look at. ``headers`` keys are lower-case."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes
    client_ip: str | None = None


class Rejected(Exception):
    """The request is not authentic (or too old). ``reason`` names the check, never data."""

    def __init__(self, reason: str, status: int = 401, code: str = "security") -> None:
        self.reason, self.status, self.code = reason, status, code
        super().__init__(reason)


class Scheme(Protocol):
    """One signature scheme, configured with its secret."""

    def verify(self, req: SignedRequest, now: datetime) -> str | None:
        """Check ``req``; return the delivery id the scheme carries (or None)."""
        ...


def check_window(sent: datetime, now: datetime, tolerance: timedelta) -> None:
    """Reject a timestamp outside ``now ± tolerance`` (replays and clock-skewed forgeries)."""
    if sent < now - tolerance:
        raise Rejected("timestamp is outside the tolerance window (too old)")
    if sent > now + tolerance:
        raise Rejected("timestamp is outside the tolerance window (in the future)")


def same(a: bytes, b: bytes) -> bool:
    """Constant-time comparison."""
    return hmac.compare_digest(a, b)
