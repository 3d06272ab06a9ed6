"""The channel conformance kit: the checks every channel passes, as one base test class.

A channel's test module subclasses ``ChannelConformance`` and fills in four hooks; pytest
then runs every check against it (Singer SDK style: one class, small named checks):

    class TestTwilioSmsConformance(ChannelConformance):
        channel_class = TwilioSmsChannel
        secrets = ("token-value",)
        bad_configs = [({"account_sid": "nope"}, "account_sid")]
        def config(self) -> dict[str, Any]: ...
        def item(self, key: str) -> OutboxItem: ...
        def provider(self, behaviour: Behaviour) -> AbstractAsyncContextManager[Provider]: ...

``provider(behaviour)`` yields a ``Provider``: the channel built against a provider that
behaves as asked ("ok", "throttled", "server_error", "timeout", "rejected") and a count
of messages the provider accepted. HTTP channels use ``ScriptedHTTP`` (an
``httpx.MockTransport``); others run a real local server (aiosmtpd for SMTP). What the
behaviours mean at the wire is the channel test's choice: for HTTP 429, 503, a read
timeout and 400; for SMTP 421/452, 451, a silent server and 550.

The checks: bad config is rejected naming the field; secrets never appear in repr, dumps,
logs or error messages, and neither do the recipient or the message text (PHI); a 2xx
gives a receipt; throttling, server errors and timeouts raise ``TransientError``; other
rejections raise ``PermanentError``; the same key sent twice reaches the provider once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlmodel import Session

from careloop.clock import SystemClock
from careloop.config import format_errors
from careloop.errors import PermanentError, TransientError
from careloop.tables import OutboxItem, Person
from channels.base import Channel, Receipt

Behaviour = Literal["ok", "throttled", "server_error", "timeout", "rejected"]
RECEIPT_STATUSES = frozenset({"queued", "sent", "delivered", "captured"})
T = TypeVar("T")


@dataclass
class Provider:
    channel: Channel
    deliveries: Callable[[], int]


class ScriptedHTTP:
    """An ``httpx.AsyncClient`` over ``MockTransport`` whose provider behaves as told.

    ``ok(request)`` builds the provider's success response; ``accepted`` counts the
    requests that reached it with ``behaviour == "ok"`` and matched ``counts``."""

    def __init__(
        self,
        behaviour: Behaviour,
        ok: Callable[[httpx.Request], httpx.Response],
        counts: Callable[[httpx.Request], bool] = lambda r: r.method == "POST",
    ) -> None:
        self.behaviour, self._ok, self._counts = behaviour, ok, counts
        self.accepted = 0
        self.requests: list[httpx.Request] = []
        self.client = httpx.AsyncClient(transport=httpx.MockTransport(self._handle))

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.behaviour == "throttled":
            return httpx.Response(
                429, json={"code": 20429, "message": "Too Many Requests"}, headers={"Retry-After": "1"}
            )
        if self.behaviour == "server_error":
            return httpx.Response(503, json={"code": 20503, "message": "Service Unavailable"})
        if self.behaviour == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        if self.behaviour == "rejected":
            return httpx.Response(400, json={"code": 21211, "message": "Invalid parameter"})
        if self._counts(request):
            self.accepted += 1
        return self._ok(request)


@contextmanager
def captured_logs(ignore: Sequence[str] = ()) -> Iterator[list[str]]:
    """Every log line emitted meanwhile, at any level, formatted with its arguments;
    ``ignore`` names loggers of the test's own servers (their logs are not ours)."""
    lines: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if not any(record.name == n or record.name.startswith(n + ".") for n in ignore):
                lines.append(self.format(record))

    handler = _Keep(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


class ChannelConformance:
    """Base test class; see the module docstring for the hooks to fill in."""

    channel_class: ClassVar[Any]
    secrets: ClassVar[Sequence[str]] = ()
    # (changes to the valid config, the field the error must name); a None value removes the key.
    bad_configs: ClassVar[Sequence[tuple[dict[str, Any], str]]] = ()
    # loggers of the test's own provider (aiosmtpd logs what it receives); never the channel's
    provider_loggers: ClassVar[Sequence[str]] = ()

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def item(self, key: str) -> OutboxItem:
        raise NotImplementedError

    def provider(self, behaviour: Behaviour) -> AbstractAsyncContextManager[Provider]:
        raise NotImplementedError

    # ---------------------------------------------------------------- helpers

    def phi(self, item: OutboxItem) -> list[str]:
        """Values that must never show in logs or errors: the address and the texts."""
        out = [item.recipient]
        out += [v for k, v in item.content.items() if k in ("text", "subject", "html") and isinstance(v, str)]
        return [v for v in out if v]

    async def _send(self, behaviour: Behaviour, keys: Sequence[str]) -> tuple[list[Receipt], int]:
        async with self.provider(behaviour) as p:
            try:
                receipts = [await p.channel.send(self.item(k)) for k in keys]
            finally:
                await p.channel.aclose()
            return receipts, p.deliveries()

    async def _failure(self, behaviour: Behaviour) -> BaseException:
        async with self.provider(behaviour) as p:
            try:
                await p.channel.send(self.item(f"conf-{behaviour}"))
            except Exception as exc:
                return exc
            finally:
                await p.channel.aclose()
        raise AssertionError(f"provider behaviour {behaviour!r} did not raise")

    # ---------------------------------------------------------------- checks

    def test_config_is_valid(self) -> None:
        self.channel_class.Config.model_validate(self.config())

    def test_bad_config_is_rejected_naming_the_field(self) -> None:
        assert self.bad_configs, "list at least one bad config"
        for changes, field in self.bad_configs:
            data = {**self.config(), **changes}
            data = {k: v for k, v in data.items() if not (k in changes and changes[k] is None)}
            with pytest.raises(ValidationError) as err:
                self.channel_class.Config.model_validate(data)
            text = "\n".join(format_errors(err.value))
            assert field in text, f"error for {changes} does not name {field!r}: {text}"

    def test_secrets_and_phi_never_in_repr_dumps_logs_or_errors(self) -> None:
        cfg = self.channel_class.Config.model_validate(self.config())
        texts = [repr(cfg), str(cfg), cfg.model_dump_json(), str(cfg.model_dump())]
        with captured_logs(self.provider_loggers) as lines:
            receipts, _ = run(self._send("ok", ["conf-secret"]))
            texts += [repr(r) for r in receipts]
            failures: tuple[Behaviour, ...] = ("throttled", "server_error", "timeout", "rejected")
            for behaviour in failures:
                exc = run(self._failure(behaviour))
                texts += [str(exc), repr(exc)]

            async def channel_repr() -> str:
                async with self.provider("ok") as p:
                    try:
                        return repr(p.channel) + str(vars(p.channel).get("config"))
                    finally:
                        await p.channel.aclose()

            texts.append(run(channel_repr()))
        blob = "\n".join(texts + lines)
        for secret in self.secrets:
            assert secret not in blob, "a secret leaked into repr, a dump, a log or an error"
        for value in self.phi(self.item("conf-secret")):
            assert value not in blob, "PHI leaked into a log or an error"

    def test_2xx_gives_a_receipt(self) -> None:
        receipts, delivered = run(self._send("ok", ["conf-ok"]))
        assert delivered == 1
        assert receipts[0].status in RECEIPT_STATUSES
        assert receipts[0].provider_id

    def test_throttling_is_transient(self) -> None:
        exc = run(self._failure("throttled"))
        assert isinstance(exc, TransientError), repr(exc)

    def test_server_error_is_transient(self) -> None:
        exc = run(self._failure("server_error"))
        assert isinstance(exc, TransientError), repr(exc)

    def test_timeout_is_transient(self) -> None:
        exc = run(self._failure("timeout"))
        assert isinstance(exc, TransientError), repr(exc)

    def test_other_rejection_is_permanent(self) -> None:
        exc = run(self._failure("rejected"))
        assert isinstance(exc, PermanentError), repr(exc)

    def test_same_key_twice_delivers_once(self) -> None:
        receipts, delivered = run(self._send("ok", ["conf-dup", "conf-dup"]))
        assert delivered == 1
        assert receipts[0].provider_id == receipts[1].provider_id

    def test_different_keys_deliver_separately(self) -> None:
        _, delivered = run(self._send("ok", ["conf-a", "conf-b"]))
        assert delivered == 2


def seed_sms_outbox(engine: Engine, keys: Sequence[str]) -> None:
    """One synthetic person with a pending SMS reminder for each of ``keys``: the load for
    outbox crash tests and benchmarks. The schema must exist."""
    now = SystemClock().now()
    with Session(engine) as s:
        person = Person(created_at=now)
        s.add(person)
        s.flush()
        assert person.id is not None
        for i, key in enumerate(keys):
            s.add(
                OutboxItem(
                    key=key,
                    person_id=person.id,
                    channel="sms",
                    template="appointment-reminder",
                    purpose="treatment",
                    phi_class="none",
                    recipient=f"+1555{i:07d}",
                    content={"text": "Reminder: your visit is tomorrow. Reply C to confirm."},
                    created_at=now,
                )
            )
        s.commit()
