"""Reply tokens: an outbound message's reply address names the outbox item it answers.

An email we send carries ``Reply-To: <local>+<token>@<domain>``; the token is the outbox
key (encoded) followed by an HMAC-SHA256 of it under a secret shared by the sending
channel and the inbound connector. A reply addressed to a valid token is linked to that
outbox item, hence to its person, whatever its ``From`` header claims (``From`` is trivial
to forge). Kept in the kernel because both a channel and a mapper use it, and plugin
packages never import each other.

Tokens are lowercase base32 (``a-z2-7``): mail systems may change the case of a local
part, and ``verify`` lowercases before checking. For the house key format (32 hex
characters) a token is 43 characters, so ``reply+<token>`` stays well inside the 64
octets RFC 5321 allows a local part.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re

MAC_CHARS = 16  # 10 bytes (80 bits) of HMAC-SHA256, base32
MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1
HEX_KEY_TOKEN_CHARS = 1 + 26 + MAC_CHARS  # a token for a house key (32 hex characters)
_CONTEXT = b"careloop-reply-token:v1:"
_HEX_KEY = re.compile(r"[0-9a-f]{32}")
_TOKEN = re.compile(r"[a-z2-7]+")


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _unb32(text: str) -> bytes:
    return base64.b32decode(text.upper() + "=" * (-len(text) % 8))


def _mac(secret: bytes, key: str) -> str:
    digest = hmac.new(secret, _CONTEXT + key.encode("utf-8"), hashlib.sha256).digest()
    return _b32(digest[:10])


def _encode_key(key: str) -> str:
    if _HEX_KEY.fullmatch(key):
        return "h" + _b32(bytes.fromhex(key))
    return "k" + _b32(key.encode("utf-8"))


def _decode_key(enc: str) -> str | None:
    try:
        if enc[:1] == "h":
            raw = _unb32(enc[1:])
            return raw.hex() if len(raw) == 16 else None
        if enc[:1] == "k":
            return _unb32(enc[1:]).decode("utf-8") or None
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return None


def make(secret: bytes, key: str) -> str:
    """The reply token for outbox ``key``."""
    return _encode_key(key) + _mac(secret, key)


def verify(secret: bytes, token: str) -> str | None:
    """The outbox key ``token`` names, or None when it is malformed or its MAC is wrong."""
    token = token.lower()
    if len(token) <= MAC_CHARS + 1 or not _TOKEN.fullmatch(token):
        return None
    enc, mac = token[:-MAC_CHARS], token[-MAC_CHARS:]
    key = _decode_key(enc)
    if key is None:
        return None
    return key if hmac.compare_digest(_mac(secret, key), mac) else None


def address(reply_to: str, secret: bytes, key: str) -> str | None:
    """``local+token@domain`` for ``reply_to``; None if the local part would be too long."""
    local, domain = reply_to.rsplit("@", 1)
    tagged = f"{local}+{make(secret, key)}"
    return f"{tagged}@{domain}" if len(tagged) <= MAX_LOCAL_PART else None


def token_of(addr: str) -> str | None:
    """The token part of ``local+token@domain`` (the text after the last ``+``), if any."""
    local = addr.strip().strip("<>").rsplit("@", 1)[0]
    if "+" not in local:
        return None
    return local.rsplit("+", 1)[1] or None
