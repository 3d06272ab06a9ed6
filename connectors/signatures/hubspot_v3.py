"""HubSpot request signature v3: ``X-HubSpot-Signature-v3`` is the base64 HMAC-SHA256,
keyed by the app's client secret, of ``method + URI + body + timestamp``, where the
timestamp is ``X-HubSpot-Request-Timestamp`` (Unix milliseconds) and requests older than
five minutes are rejected.

The URI is the full URL HubSpot called (scheme, host, path, query). Behind a proxy the
app sees another URL, so the connector passes the configured public URL. HubSpot signs
the URI with a few characters URL-decoded (its documentation's table), done here too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from datetime import UTC, datetime, timedelta

from connectors.signatures import Rejected, SignedRequest, check_window, same

# HubSpot's table: these percent-encodings are decoded before signing.
_DECODE = {
    "%3A": ":",
    "%2F": "/",
    "%3F": "?",
    "%40": "@",
    "%21": "!",
    "%24": "$",
    "%27": "'",
    "%28": "(",
    "%29": ")",
    "%2A": "*",
    "%2C": ",",
    "%3B": ";",
}


def normalise_uri(uri: str) -> str:
    for enc, dec in _DECODE.items():
        uri = uri.replace(enc, dec).replace(enc.lower(), dec)
    return uri


def signature(secret: str, method: str, uri: str, body: bytes, timestamp_ms: str) -> str:
    """The v3 signature as HubSpot computes it (also used to build test vectors)."""
    source = method.upper().encode() + normalise_uri(uri).encode() + body + timestamp_ms.encode()
    return base64.b64encode(hmac.new(secret.encode(), source, hashlib.sha256).digest()).decode()


class HubSpotV3:
    def __init__(self, secret: str, tolerance: timedelta = timedelta(minutes=5)) -> None:
        self._secret = secret
        self._tolerance = tolerance

    def verify(self, req: SignedRequest, now: datetime) -> str | None:
        sig = req.headers.get("x-hubspot-signature-v3")
        ts = req.headers.get("x-hubspot-request-timestamp")
        if not sig or not ts:
            raise Rejected("missing X-HubSpot-Signature-v3 or X-HubSpot-Request-Timestamp header")
        if not ts.isdigit() or len(ts) > 15:
            raise Rejected("X-HubSpot-Request-Timestamp is not Unix milliseconds")
        check_window(datetime.fromtimestamp(int(ts) / 1000, UTC), now, self._tolerance)
        expected = signature(self._secret, req.method, req.url, req.body, ts)
        try:
            given = base64.b64decode(sig, validate=True)
        except (binascii.Error, ValueError):
            raise Rejected("X-HubSpot-Signature-v3 is not base64") from None
        if not same(base64.b64decode(expected), given):
            raise Rejected("no matching signature")
        return None  # HubSpot batches carry an eventId per item, not a delivery id
