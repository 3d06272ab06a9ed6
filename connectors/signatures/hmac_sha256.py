"""Plain HMAC-SHA256 of the raw body in a configured header (GitHub-, Shopify- and many
in-house CRMs' style): hex or base64, with an optional prefix such as ``sha256=``.

The scheme carries no timestamp, so it cannot expire a captured request by itself:
replays are caught by delivery-id de-duplication only (an optional delivery-id header,
else the event id in the body). Prefer a timestamped scheme where the sender offers one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime
from typing import Literal

from connectors.signatures import Rejected, SignedRequest, same


def signature(secret: str, body: bytes, encoding: Literal["hex", "base64"], prefix: str = "") -> str:
    mac = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    return prefix + (mac.hex() if encoding == "hex" else base64.b64encode(mac).decode())


class HmacSha256:
    def __init__(
        self,
        secret: str,
        header: str,
        encoding: Literal["hex", "base64"] = "hex",
        prefix: str = "",
        id_header: str | None = None,
    ) -> None:
        self._secret, self._header, self._encoding, self._prefix = secret, header.lower(), encoding, prefix
        self._id_header = id_header.lower() if id_header else None

    def verify(self, req: SignedRequest, now: datetime) -> str | None:
        given = req.headers.get(self._header)
        if not given:
            raise Rejected("missing signature header")
        expected = signature(self._secret, req.body, self._encoding, self._prefix)
        candidate = given.strip()
        if self._encoding == "hex":
            candidate = candidate[: len(self._prefix)] + candidate[len(self._prefix) :].lower()
        if not same(expected.encode(), candidate.encode()):
            raise Rejected("no matching signature")
        return req.headers.get(self._id_header) if self._id_header else None
