"""Standard Webhooks (standardwebhooks.com): ``webhook-id``, ``webhook-timestamp`` (Unix
seconds) and ``webhook-signature`` (space-separated ``v1,<base64 HMAC-SHA256>``) over
``{id}.{timestamp}.{body}``, keyed by the base64 part of a ``whsec_`` secret.

Several signatures may be sent during a key rotation: one match is enough. Only the
symmetric ``v1`` scheme is supported; ``v1a`` (Ed25519) entries are ignored. Svix sends
the same scheme with ``svix-`` header names, accepted as aliases.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from datetime import UTC, datetime, timedelta

from connectors.signatures import Rejected, SignedRequest, check_window, same

PREFIX = "whsec_"


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret; ValueError if it is not base64."""
    raw = secret.removeprefix(PREFIX)
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be whsec_ followed by base64") from None
    if not key:
        raise ValueError("must not be empty")
    return key


class StandardWebhooks:
    def __init__(self, secret: str, tolerance: timedelta) -> None:
        self._key = decode_secret(secret)
        self._tolerance = tolerance

    def _header(self, req: SignedRequest, name: str) -> str:
        value = req.headers.get(f"webhook-{name}") or req.headers.get(f"svix-{name}")
        if not value:
            raise Rejected(f"missing webhook-{name} header")
        return value

    def verify(self, req: SignedRequest, now: datetime) -> str | None:
        msg_id = self._header(req, "id")
        ts = self._header(req, "timestamp")
        sigs = self._header(req, "signature")
        if not ts.isdigit() or len(ts) > 12:
            raise Rejected("webhook-timestamp is not Unix seconds")
        check_window(datetime.fromtimestamp(int(ts), UTC), now, self._tolerance)
        signed = msg_id.encode() + b"." + ts.encode() + b"." + req.body
        expected = hmac.new(self._key, signed, hashlib.sha256).digest()
        for entry in sigs.split():
            version, _, value = entry.partition(",")
            if version != "v1":
                continue
            try:
                given = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                continue
            if same(expected, given):
                return msg_id
        raise Rejected("no matching signature")
