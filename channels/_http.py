"""Provider HTTP calls for the HTTP-speaking channels, with errors converted at the boundary.

One rule for every provider: timeouts, connection failures, 408, 425, 429 and 5xx are
``TransientError`` (the outbox retries with backoff); any other 4xx is ``PermanentError``
(dead letter), except an answer that rejects the channel's credentials or refuses its
account at the provider (``Credentials``: which answers do is the channel's to say, 401 for
all of them): that is ``ChannelUnavailable``, the channel's outage, not the item's failure.
A transient answer's ``Retry-After`` (``retry_after`` below) rides on the ``TransientError``
as ``retry_after``, so the outbox waits at least that long before the next attempt and holds
the channel back meanwhile. Error messages carry the channel id, the operation, the HTTP status and the
provider's error code when it has one: never URLs with query strings, bodies or addresses.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from careloop.errors import ChannelUnavailable, PermanentError, TransientError
from careloop.plugins import Health
from channels.base import DeliveryUncertain

log = logging.getLogger("careloop.channels")

TRANSIENT_STATUS = frozenset({408, 425, 429})

# The longest wait a provider's ``Retry-After`` can impose: a larger value (a misconfigured
# proxy, a provider's maintenance window) is cut to this, so one answer cannot park the
# channel for a day; the outbox's retry limit and ``not_after`` still apply after it.
MAX_RETRY_AFTER = timedelta(hours=1)


def retry_after(value: str | None, now: datetime | None = None) -> timedelta | None:
    """The wait a ``Retry-After`` header value asks for (RFC 9110 section 10.2.3): either
    delay-seconds (``120``: digits only) or an HTTP-date, taken relative to ``now`` (the
    response's ``Date`` when it has one, so the provider's clock is compared with itself;
    else our wall clock). Capped at ``MAX_RETRY_AFTER``. None when there is nothing to
    honour: no header, garbage, a negative number, zero, or a date already past."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = int(value[:12])  # a longer run of digits is far beyond the cap anyway
        wait = timedelta(seconds=seconds)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None:
            return None
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
        wait = when - (now or datetime.now(UTC))
    if wait <= timedelta(0):
        return None
    return min(wait, MAX_RETRY_AFTER)


def response_retry_after(resp: httpx.Response) -> timedelta | None:
    """``retry_after`` of a response's ``Retry-After``, an HTTP-date read against the
    response's own ``Date`` header when that parses."""
    value = resp.headers.get("retry-after")
    if value is None:
        return None
    now: datetime | None = None
    date = resp.headers.get("date")
    if date:
        try:
            now = parsedate_to_datetime(date)
        except (TypeError, ValueError, IndexError, OverflowError):
            now = None
        if now is not None and now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
    return retry_after(value, now)


def transient(resp: httpx.Response, message: str) -> TransientError:
    """A ``TransientError`` for a transient answer, carrying its ``Retry-After``; the wait
    is named in the message (it ends up in the item's ``last_error``)."""
    wait = response_retry_after(resp)
    if wait is not None:
        message = f"{message}; provider asked to retry after {int(wait.total_seconds())} s"
    return TransientError(message, retry_after=wait)


def new_client() -> httpx.AsyncClient:
    """The client a channel makes for itself when none is injected. TCP_NODELAY: httpx
    writes a request's headers and body separately, and with Nagle's algorithm the body
    then waits for the peer's delayed ACK (measured: 9-14 ms per request on loopback
    without it, about 2 ms with it)."""
    transport = httpx.AsyncHTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    return httpx.AsyncClient(transport=transport)


async def call(
    client: httpx.AsyncClient, what: str, method: str, url: str, *, uncertain: bool = False, **kw: Any
) -> httpx.Response:
    """Send one request; transport failures become ``TransientError``.

    With ``uncertain`` (a non-idempotent send), a failure after the request may have left
    (read/write timeout, connection lost mid-exchange) is ``DeliveryUncertain``; failures
    before it left (connect errors, pool timeout) stay plain transient errors.
    """
    try:
        return await client.request(method, url, **kw)
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        raise TransientError(f"{what}: provider unreachable ({type(exc).__name__})") from None
    except httpx.TransportError as exc:
        err = DeliveryUncertain if uncertain else TransientError
        raise err(f"{what}: provider did not answer ({type(exc).__name__})") from None


class Credentials:
    """Whether a channel's provider accepts its credentials and its account, as its last
    answers said.

    ``statuses`` and ``codes`` are the answers that reject the credentials themselves (an
    HTTP status, a provider's error code under any status); ``account`` maps the provider's
    error codes that refuse the account itself (suspended, closed, out of funds: under any
    status) to what each means. Nothing to do with the item, so every item would get the
    same answer. ``check`` turns them into ``ChannelUnavailable`` (the item stays pending and
    uncounted, the channel is held) and ``health()`` reports the channel degraded, with the
    reason, until a request succeeds again. ``refused`` records a rejection a channel found
    some other way (an authorization server that refuses the client)."""

    def __init__(
        self,
        statuses: frozenset[int],
        codes: frozenset[str] = frozenset(),
        account: Mapping[str, str] | None = None,
    ) -> None:
        self.statuses, self.codes = statuses, codes
        self.account: Mapping[str, str] = dict(account or {})
        self.rejected: str | None = None  # why, until the next success

    def health(self) -> Health:
        return Health(True, self.rejected, degraded=True) if self.rejected else Health(True)

    def reject(self, resp: httpx.Response, code: str | None, what: str) -> ChannelUnavailable | None:
        """The error for ``resp`` if it rejects the credentials or the account, else None."""
        status = resp.status_code
        if code is not None and code in self.account:
            return self.refused(
                f"{what}: the provider refused the channel's account (HTTP {status}, provider code "
                f"{code}: {self.account[code]}); items wait until the provider accepts the account again"
            )
        if status not in self.statuses and code not in self.codes:
            return None
        suffix = f", provider code {code}" if code else ""
        return self.refused(
            f"{what}: the provider rejected the channel's credentials (HTTP {status}{suffix}); "
            "items wait until valid credentials are configured"
        )

    def refused(self, message: str) -> ChannelUnavailable:
        """Record that the provider refuses the channel (``message``: why, no secrets) and
        return the ``ChannelUnavailable`` to raise."""
        if self.rejected is None:
            log.warning("%s", message)  # once per outage, not once per item
        self.rejected = message
        return ChannelUnavailable(message)

    def accepted(self, what: str) -> None:
        """A request succeeded: the provider accepts the channel again."""
        if self.rejected is not None:
            log.info("%s: the provider accepts the channel's requests again", what)
            self.rejected = None


def check(resp: httpx.Response, what: str, credentials: Credentials | None = None) -> None:
    """Raise the careloop error a non-2xx response stands for; with ``credentials``, record
    a success there and raise ``ChannelUnavailable`` for an answer that rejects them or the
    channel's account."""
    if resp.is_success:
        if credentials is not None:
            credentials.accepted(what)
        return
    code = provider_code(resp)
    unavailable = credentials.reject(resp, code, what) if credentials is not None else None
    if unavailable is not None:
        raise unavailable
    suffix = f" (provider code {code})" if code else ""
    if resp.status_code in TRANSIENT_STATUS or resp.status_code >= 500:
        raise transient(resp, f"{what}: HTTP {resp.status_code}{suffix}")
    raise PermanentError(f"{what}: HTTP {resp.status_code}{suffix}")


def provider_code(resp: httpx.Response) -> str | None:
    """The provider's own error code (Twilio ``code``, FHIR OperationOutcome issue code)."""
    try:
        data = json.loads(resp.content or b"null")
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    code = data.get("code")
    if isinstance(code, int | str) and str(code).isalnum():
        return str(code)
    issues = data.get("issue")
    if isinstance(issues, list) and issues and isinstance(issues[0], dict):
        c = issues[0].get("code")
        if isinstance(c, str) and c.replace("-", "").isalnum():
            return c
    return None


def json_body(resp: httpx.Response, what: str) -> dict[str, Any]:
    try:
        data = resp.json()
    except ValueError:
        raise TransientError(f"{what}: provider answered {resp.status_code} without JSON") from None
    if not isinstance(data, dict):
        raise TransientError(f"{what}: provider answered {resp.status_code} with unexpected JSON")
    return data
