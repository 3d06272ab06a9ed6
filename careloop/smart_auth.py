"""SMART Backend Services client auth, shared by the FHIR connectors and the FHIR write-back
channel (plugins do not import each other, so it lives in the kernel).

The client_credentials grant with ``private_key_jwt`` client authentication: the client signs
a short-lived assertion (RS384 or ES384, ``exp`` at most five minutes ahead, a fresh ``jti``
each time) with authlib's RFC 7523 helper and trades it for an access token, which is cached
until shortly before it expires. ``authorized`` sends a request with the token and, on a 401,
drops it and sends once more with a new one; what a 401 that survives means is the caller's
to say (a connector: a permanent error; the write-back channel: its credentials are down).

Errors name the plugin (``connector ehr``, ``channel ehr-writeback``), never a token.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import httpx
from authlib.oauth2.rfc7523 import private_key_jwt_sign
from joserfc.jwk import ECKey, RSAKey
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from careloop.errors import PermanentError, TransientError

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_S = 300  # SMART Backend Services: the assertion expires within five minutes


class SmartAuthConfig(BaseModel):
    """SMART Backend Services credentials (``private_key`` is a PEM file or inline PEM text)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    token_url: str
    client_id: str
    private_key: SecretStr | None = Field(None, description="inline PEM private key")
    private_key_file: Path | None = Field(None, description="PEM private key file")
    alg: Literal["RS384", "ES384"] = "RS384"
    kid: str | None = None
    scope: str = "system/*.read system/Subscription.write"
    assertion_ttl_s: int = Field(MAX_ASSERTION_S, ge=10, le=MAX_ASSERTION_S)

    def key_pem(self) -> bytes:
        if self.private_key is not None:
            return self.private_key.get_secret_value().encode()
        if self.private_key_file is not None:
            return self.private_key_file.read_bytes()
        raise PermanentError("SMART auth: private_key or private_key_file is required")


class SmartBackendAuth:
    """Fetches and caches SMART Backend Services access tokens.

    ``name`` and ``kind`` label errors (``connector ehr``); ``monotonic`` is the clock the
    cached token's lifetime is read on, in seconds (a channel passes its own clock, so a
    virtual one drives the refresh). The assertion's ``iat``/``exp`` are always wall time:
    the authorization server checks them against its own clock."""

    def __init__(
        self,
        config: SmartAuthConfig,
        http: httpx.AsyncClient,
        name: str,
        *,
        kind: str = "connector",
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config, self.http, self.label, self.monotonic = config, http, f"{kind} {name}", monotonic
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()
        self.fetches = 0  # tokens obtained (tests and status pages)
        self._signing_key: Any = None

    def assertion(self) -> str:
        """A fresh client assertion: iss = sub = client_id, aud = token URL, unique jti."""
        c = self.config
        now = int(time.time())
        header = {"kid": c.kid, "typ": "JWT"} if c.kid else {"typ": "JWT"}
        jwt = private_key_jwt_sign(
            self._key(),
            c.client_id,
            c.token_url,
            alg=c.alg,
            header=header,
            claims={"jti": secrets.token_urlsafe(24)},
            issued_at=now,
            expires_at=now + c.assertion_ttl_s,
        )
        return jwt.decode() if isinstance(jwt, bytes) else str(jwt)

    def _key(self) -> Any:
        if self._signing_key is None:
            try:
                pem = self.config.key_pem()
            except OSError as exc:
                raise PermanentError(
                    f"{self.label}: the SMART private key file cannot be read ({type(exc).__name__})"
                ) from None
            try:
                self._signing_key = (RSAKey if self.config.alg.startswith("RS") else ECKey).import_key(pem)
            except (ValueError, TypeError):
                raise PermanentError(
                    f"{self.label}: the SMART private key is not a {self.config.alg[:2]} PEM key"
                ) from None
        return self._signing_key

    def invalidate(self, refused: str | None = None) -> None:
        """Drop the cached token (only if it is ``refused``, when that is given: a request
        that raced a refresh must not throw the new token away)."""
        if refused is None or refused == self._token:
            self._token, self._expires = None, 0.0

    async def authorized(self, send: Callable[[str], Awaitable[httpx.Response]]) -> httpx.Response:
        """``send(authorization_header_value)`` with the cached token; on a 401, once more with
        a freshly fetched one. Returns the last response: a 401 then means the server refused
        a token it had just been issued."""
        token = await self.token()
        r = await send(f"Bearer {token}")
        if r.status_code != 401:
            return r
        self.invalidate(token)
        return await send(f"Bearer {await self.token()}")

    async def token(self) -> str:
        async with self._lock:
            if self._token is not None and self.monotonic() < self._expires:
                return self._token
            data = {
                "grant_type": "client_credentials",
                "scope": self.config.scope,
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": self.assertion(),
            }
            try:
                r = await self.http.post(
                    self.config.token_url, data=data, headers={"Accept": "application/json"}
                )
            except httpx.HTTPError as exc:
                raise TransientError(
                    f"{self.label}: token endpoint unreachable ({type(exc).__name__})"
                ) from None
            if r.status_code == 429 or r.status_code >= 500:
                raise TransientError(f"{self.label}: token endpoint answered {r.status_code}")
            if r.status_code >= 400:
                raise PermanentError(
                    f"{self.label}: the authorization server rejected the client credentials "
                    f"(HTTP {r.status_code}); check client_id, key and registration, then restart"
                )
            try:
                doc = r.json()
            except ValueError:
                raise TransientError(
                    f"{self.label}: token endpoint answered {r.status_code} without JSON"
                ) from None
            token = doc.get("access_token") if isinstance(doc, dict) else None
            if not isinstance(token, str):
                raise PermanentError(f"{self.label}: token response has no access_token")
            expires_in = float(doc.get("expires_in") or 300)
            # Refresh a little early so a request never leaves with a token about to lapse.
            self._token, self._expires = (
                token,
                self.monotonic() + max(1.0, expires_in - min(30.0, expires_in / 10)),
            )
            self.fetches += 1
            return token
