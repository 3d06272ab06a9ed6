"""Stripe-style signatures: ``Stripe-Signature: t=<Unix seconds>,v1=<hex>[,v1=<hex>...]``,
the hex HMAC-SHA256 of ``{t}.{body}`` keyed by the endpoint secret (``whsec_...``, used
as-is, not base64-decoded). Several ``v1`` values appear during secret rotation."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta

from connectors.signatures import Rejected, SignedRequest, check_window, same


class StripeV1:
    def __init__(self, secret: str, tolerance: timedelta, header: str = "stripe-signature") -> None:
        self._key = secret.encode()
        self._tolerance = tolerance
        self._header = header.lower()

    def verify(self, req: SignedRequest, now: datetime) -> str | None:
        value = req.headers.get(self._header)
        if not value:
            raise Rejected("missing signature header")
        ts: str | None = None
        sigs: list[str] = []
        for part in value.split(","):
            k, _, v = part.strip().partition("=")
            if k == "t":
                ts = v
            elif k == "v1":
                sigs.append(v)
        if ts is None or not ts.isdigit() or len(ts) > 12 or not sigs:
            raise Rejected("signature header needs t= and v1=")
        check_window(datetime.fromtimestamp(int(ts), UTC), now, self._tolerance)
        expected = hmac.new(self._key, ts.encode() + b"." + req.body, hashlib.sha256).hexdigest().encode()
        if not any(same(expected, s.encode()) for s in sigs):
            raise Rejected("no matching signature")
        return None
