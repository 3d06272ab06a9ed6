"""fhir_writeback auth: SMART Backend Services (the connectors' ``careloop.smart_auth``) against
the authlib authorization server and the local FHIR server the other FHIR tests use, and a
rejected credential as the channel's problem (item pending, channel degraded), not the item's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey
from pydantic import ValidationError
from sqlmodel import Session, select

from careloop.clock import VirtualClock
from careloop.config import format_errors
from careloop.errors import PermanentError, TransientError
from careloop.store import Store
from careloop.tables import DeadLetter, OutboxItem
from channels.base import ABSENT
from channels.fhir_writeback import FhirWritebackChannel, FhirWritebackConfig
from channels.outbox import DeliverStage
from tests.fake_fhir import FakeFhir
from tests.fhir_local_server import serve
from tests.smart_auth_server import SmartAuthServer
from tests.test_channels_fhir_writeback import TOKEN, config, item
from tests.test_channels_outbox import person
from tests.test_fhir_client import _pem, anyio_backend

__all__ = ["anyio_backend", "person"]  # the fixtures, used by the tests below

CLIENT_ID = "careloop-writeback"


@pytest.fixture
def fhir() -> Iterator[FakeFhir]:
    f = FakeFhir(token="not-issued-yet")
    f.start()
    yield f
    f.stop()


@dataclass
class Env:
    auth: SmartAuthServer
    fhir: FakeFhir
    channel: FhirWritebackChannel
    clock: VirtualClock
    public: RSAKey | ECKey
    seen: list[tuple[str, int]] = field(default_factory=list)  # (path, status) of every response

    def statuses(self, path: str) -> list[int]:
        return [status for p, status in self.seen if p == path]


@pytest.fixture(params=["RS384", "ES384"])
async def env(request: pytest.FixtureRequest, fhir: FakeFhir, clock: VirtualClock) -> AsyncIterator[Env]:
    alg = request.param
    if alg == "RS384":
        priv: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = rsa.generate_private_key(65537, 2048)
        public: RSAKey | ECKey = RSAKey.import_key(_pem(priv))
    else:
        priv = ec.generate_private_key(ec.SECP384R1())
        public = ECKey.import_key(_pem(priv))
    auth = SmartAuthServer(expires_in=600)
    auth.register(CLIENT_ID, public)

    def issue(token: str) -> None:
        fhir.token = token  # the FHIR server accepts the latest token only

    auth.on_issue = issue
    seen: list[tuple[str, int]] = []

    async def record(resp: httpx.Response) -> None:
        seen.append((resp.request.url.path, resp.status_code))

    async with serve(auth.app) as auth_url, httpx.AsyncClient(event_hooks={"response": [record]}) as http:
        auth.token_url = f"{auth_url}/token"
        cfg = config(
            fhir.base_url,
            bearer_token=None,
            auth={
                "token_url": auth.token_url,
                "client_id": CLIENT_ID,
                "private_key": _pem(priv).decode(),
                "alg": alg,
                "kid": "wb-1",
            },
        )
        ch = FhirWritebackChannel("ehr-writeback", FhirWritebackConfig.model_validate(cfg), http, clock)
        yield Env(auth, fhir, ch, clock, public, seen)


# ---------------------------------------------------------------- SMART Backend Services


@pytest.mark.anyio
async def test_token_is_fetched_on_first_use_and_reused(env: Env) -> None:
    assert env.auth.issued == []  # nothing fetched before the first request
    for k in ("wb-a1", "wb-a2", "wb-a3"):
        assert (await env.channel.send(item(k))).status == "delivered"
    absent = await env.channel.status(item("wb-never-sent"))  # searched for, with the same token
    assert absent is not None and absent.status == ABSENT
    assert len(env.auth.issued) == 1 and env.fhir.creates == 3
    assert env.statuses("/fhir/Communication") == [201, 201, 201, 200]  # no 401 on the way
    assert env.channel.health().degraded is False


@pytest.mark.anyio
async def test_token_is_refreshed_shortly_before_it_expires(env: Env) -> None:
    t0 = env.clock.now()
    await env.channel.send(item("wb-e1"))
    env.clock.set(t0 + timedelta(seconds=500))  # expires_in 600: still good
    await env.channel.send(item("wb-e2"))
    assert len(env.auth.issued) == 1
    env.clock.set(t0 + timedelta(seconds=580))  # within the last 60 s (a tenth): refresh first
    await env.channel.send(item("wb-e3"))
    assert len(env.auth.issued) == 2
    # The refresh came before the request, not after a 401 for it.
    assert env.statuses("/fhir/Communication") == [201, 201, 201]
    assert env.fhir.creates == 3


@pytest.mark.anyio
async def test_401_refreshes_once_and_retries_once(env: Env) -> None:
    await env.channel.send(item("wb-r1"))
    env.fhir.token = "revoked-by-the-ehr"  # the EHR dropped the cached token early
    receipt = await env.channel.send(item("wb-r2"))
    assert receipt.status == "delivered" and receipt.provider_id == "Communication/2"
    assert len(env.auth.issued) == 2
    assert env.statuses("/fhir/Communication") == [201, 401, 201]
    assert env.statuses("/token") == [200, 200]
    jtis = [claims["jti"] for _, claims in env.auth.assertions]
    assert len(set(jtis)) == 2  # a fresh assertion for the refresh
    assert env.channel.health().degraded is False


@pytest.mark.anyio
async def test_401_after_the_refresh_is_a_channel_credentials_problem(env: Env) -> None:
    env.auth.on_issue = lambda token: None  # tokens the FHIR server never accepts
    for _ in range(2):
        with pytest.raises(TransientError, match="rejected the channel's credentials") as err:
            await env.channel.send(item("wb-x1"))
        assert not any(t in str(err.value) for t in [*env.auth.issued, env.fhir.token or ""])
    # Per send: the cached token, then one refresh and one retry; no loop.
    assert env.statuses("/fhir/Communication") == [401, 401, 401, 401]
    assert len(env.auth.issued) == 3
    health = env.channel.health()
    assert health.ok and health.degraded and "credentials" in health.detail


@pytest.mark.anyio
async def test_assertion_is_signed_as_the_connectors_is(env: Env) -> None:
    await env.channel.send(item("wb-j1"))
    ((header, claims),) = env.auth.assertions  # verified by authlib's RFC 7523 server side
    assert env.channel.config.auth is not None and header["alg"] == env.channel.config.auth.alg
    assert header["kid"] == "wb-1" and header["typ"] == "JWT"
    assert claims["iss"] == claims["sub"] == CLIENT_ID
    assert claims["aud"] == env.auth.token_url
    assert 0 < claims["exp"] - claims["iat"] <= 300
    # And by joserfc directly, with the registered public key, as the connector tests' server does.
    smart = env.channel._smart
    assert smart is not None
    token = jwt.decode(smart.assertion(), env.public, algorithms=["RS384", "ES384"])
    assert token.header["alg"] == header["alg"] and token.claims["jti"] != claims["jti"]
    other = RSAKey.generate_key(2048) if isinstance(env.public, RSAKey) else ECKey.generate_key("P-384")
    with pytest.raises(Exception, match="signature"):
        jwt.decode(smart.assertion(), other, algorithms=["RS384", "ES384"])


@pytest.mark.anyio
async def test_client_unknown_to_the_authorization_server_is_transient_and_degrades(env: Env) -> None:
    env.auth.clients.clear()
    with pytest.raises(TransientError, match="rejected the client credentials") as err:
        await env.channel.send(item("wb-u1"))
    assert "channel ehr-writeback" in str(err.value)
    assert env.channel.health().degraded and env.fhir.posts == 0
    env.auth.register(CLIENT_ID, env.public)  # registration restored: the next send works
    assert (await env.channel.send(item("wb-u1"))).status == "delivered"
    assert env.channel.health().degraded is False


# ---------------------------------------------------------------- a rejected static token


def test_rejected_static_token_leaves_the_item_pending_and_the_channel_degraded(
    store: Store, person: int, fhir: FakeFhir
) -> None:
    with store.session() as s:
        row = item("wb-static")
        row.id, row.person_id = None, person
        s.add(row)
    fhir.token = "rotated-on-the-ehr"  # our static token has expired
    ch = FhirWritebackChannel(
        "ehr-writeback", FhirWritebackConfig.model_validate(config(fhir.base_url)), clock=store.clock
    )
    channels: dict[str, Any] = {"ehr-writeback": ch}  # Any: see tests/test_channels_retry_after.stage_for
    stage = DeliverStage(store, channels, max_attempts=2)
    clock = store.clock
    assert isinstance(clock, VirtualClock)

    async def go() -> None:
        for _ in range(4):  # an outage longer than max_attempts tries: not the item's fault
            await stage.run_once()
            with Session(store.engine) as s:
                [got] = s.exec(select(OutboxItem)).all()
                assert got.status == "pending" and got.attempts == 0
                assert "credentials" in (got.last_error or "") and TOKEN not in (got.last_error or "")
                assert s.exec(select(DeadLetter)).all() == []
                due = got.next_attempt_at
            assert due is not None
            clock.set(due.replace(tzinfo=clock.now().tzinfo) + timedelta(seconds=1))
        health = ch.health()
        assert health.degraded and "rejected the channel's credentials" in health.detail
        assert TOKEN not in health.detail
        fhir.token = TOKEN  # the EHR accepts our token again
        await stage.run_once()
        await ch.aclose()

    asyncio.run(go())
    with Session(store.engine) as s:
        [got] = s.exec(select(OutboxItem)).all()
    assert got.status == "delivered" and fhir.creates == 1
    assert ch.health().degraded is False


def test_a_403_is_the_items_not_the_channels(fhir: FakeFhir) -> None:
    """EHRs answer 403 for one restricted patient: dead-lettered alone, the channel not held."""
    fhir.token = TOKEN
    fhir.fail_with = [403]

    async def go() -> None:
        ch = FhirWritebackChannel("ehr-writeback", FhirWritebackConfig.model_validate(config(fhir.base_url)))
        try:
            with pytest.raises(PermanentError, match="HTTP 403"):
                await ch.send(item("wb-403"))
            assert not ch.health().degraded
            assert (await ch.send(item("wb-next"))).status == "delivered"
        finally:
            await ch.aclose()

    asyncio.run(go())


# ---------------------------------------------------------------- config


def _errors(**changes: Any) -> str:
    with pytest.raises(ValidationError) as err:
        FhirWritebackConfig.model_validate(config(**changes))
    return "\n".join(format_errors(err.value))


SMART = {"token_url": "https://ehr.example.org/token", "client_id": CLIENT_ID, "private_key": "PEM"}


def test_auth_config_is_validated_naming_the_field() -> None:
    assert "bearer_token" in (e := _errors(auth=SMART)) and "auth" in e
    assert "auth.private_key" in _errors(bearer_token=None, auth={**SMART, "private_key": None})
    assert "auth.private_key_file" in _errors(bearer_token=None, auth={**SMART, "private_key_file": "/k.pem"})
    assert "auth.token_url" in _errors(
        bearer_token=None, auth={**SMART, "token_url": "http://idp.example.org/t"}
    )
    assert "auth.alg" in _errors(bearer_token=None, auth={**SMART, "alg": "HS256"})
    cfg = FhirWritebackConfig.model_validate(config(bearer_token=None, auth=SMART))
    assert cfg.auth is not None and "Communication.write" in cfg.auth.scope and "PEM" not in repr(cfg)
    own = FhirWritebackConfig.model_validate(
        config(bearer_token=None, auth={**SMART, "scope": "system/*.write"})
    )
    assert own.auth is not None and own.auth.scope == "system/*.write"
