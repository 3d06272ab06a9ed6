"""connectors.fhir_client: SMART Backend Services against an authorization server built with
authlib's server side, token caching and refresh on 401, paged search and error conversion."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc.jwk import ECKey, RSAKey

from careloop.errors import PermanentError, TransientError
from connectors.fhir_client import FhirClient, SmartAuthConfig, SmartBackendAuth
from tests.fhir_local_server import LocalFhirServer, serve
from tests.smart_auth_server import SmartAuthServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class Env:
    auth: SmartAuthServer
    ehr: LocalFhirServer
    client: FhirClient
    smart: SmartBackendAuth


@pytest.fixture(params=["RS384", "ES384"])
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    alg = request.param
    if alg == "RS384":
        priv: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = rsa.generate_private_key(65537, 2048)
        public: RSAKey | ECKey = RSAKey.import_key(_pem(priv))
    else:
        priv = ec.generate_private_key(ec.SECP384R1())
        public = ECKey.import_key(_pem(priv))
    auth, ehr = SmartAuthServer(), LocalFhirServer()
    auth.register("careloop-test", public)

    def issue(token: str) -> None:
        ehr.require_token = token  # the resource server accepts the latest token only

    auth.on_issue = issue
    async with serve(auth.app) as auth_url, serve(ehr.app) as ehr_url, httpx.AsyncClient() as http:
        auth.token_url = f"{auth_url}/token"
        ehr.base = f"{ehr_url}/fhir"
        cfg = SmartAuthConfig(
            token_url=auth.token_url,
            client_id="careloop-test",
            private_key=_pem(priv).decode(),
            alg=alg,
            kid="k1",
        )
        smart = SmartBackendAuth(cfg, http, "ehr")
        yield Env(auth, ehr, FhirClient(ehr.base, http, connector="ehr", auth=smart), smart)


@pytest.mark.anyio
async def test_smart_backend_token_is_fetched_once_and_cached(env: Env) -> None:
    env.ehr.write({"resourceType": "Patient", "id": "p1"})
    assert (await env.client.read("Patient/p1") or {})["id"] == "p1"
    assert (await env.client.read(f"{env.ehr.base}/Patient/p1/_history/1") or {})["id"] == "p1"
    assert len(env.auth.issued) == 1 and env.smart.fetches == 1
    ((header, claims),) = env.auth.assertions
    assert header["alg"] == env.smart.config.alg and header["kid"] == "k1"
    assert claims["iss"] == claims["sub"] == "careloop-test"
    assert claims["aud"] == env.auth.token_url
    assert 0 < claims["exp"] - claims["iat"] <= 300


@pytest.mark.anyio
async def test_token_is_refreshed_on_401_with_a_fresh_assertion(env: Env) -> None:
    env.ehr.write({"resourceType": "Patient", "id": "p1"})
    await env.client.read("Patient/p1")
    env.ehr.require_token = "revoked-by-the-server"
    assert (await env.client.read("Patient/p1") or {})["id"] == "p1"
    assert len(env.auth.issued) == 2
    jtis = [c["jti"] for _, c in env.auth.assertions]
    assert len(jtis) == 2 and len(set(jtis)) == 2


@pytest.mark.anyio
async def test_401_after_refresh_asks_for_credentials(env: Env) -> None:
    env.auth.on_issue = lambda token: None  # tokens the resource server never accepts
    env.ehr.require_token = "something-else"
    with pytest.raises(PermanentError) as err:
        await env.client.read("Patient/p1")
    assert "connector ehr" in str(err.value) and "credentials" in str(err.value)
    assert len(env.auth.issued) == 2  # the cached one, then one refresh: no retry loop


@pytest.mark.anyio
async def test_unknown_client_is_rejected_by_the_authorization_server(env: Env) -> None:
    other = rsa.generate_private_key(65537, 2048)
    cfg = SmartAuthConfig(
        token_url=env.auth.token_url, client_id="careloop-test", private_key=_pem(other).decode(), alg="RS384"
    )
    bad = FhirClient(
        env.ehr.base, env.client.http, connector="ehr", auth=SmartBackendAuth(cfg, env.client.http, "ehr")
    )
    with pytest.raises(PermanentError, match="rejected the client credentials"):
        await bad.read("Patient/p1")


@pytest.mark.anyio
async def test_paged_search_follows_next_links(env: Env) -> None:
    for i in range(5):
        env.ehr.write({"resourceType": "Appointment", "id": f"a{i}", "status": "booked", "participant": []})
    got = [r["id"] async for r in env.client.search("Appointment", {"_count": "2"})]
    assert sorted(got) == [f"a{i}" for i in range(5)]
    assert sum(1 for r in env.ehr.requests if r.startswith("GET Appointment?")) == 3


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "error"),
    [(429, TransientError), (503, TransientError), (500, TransientError), (403, PermanentError)],
)
async def test_http_failures_are_converted_at_the_boundary(status: int, error: type[Exception]) -> None:
    transport = httpx.MockTransport(
        lambda req: httpx.Response(status, json={"resourceType": "OperationOutcome"})
    )
    async with httpx.AsyncClient(transport=transport) as http:
        client = FhirClient("http://127.0.0.1:1/fhir", http, connector="ehr")
        with pytest.raises(error, match="connector ehr"):
            await client.read("Patient/p1")


@pytest.mark.anyio
async def test_timeout_is_transient() -> None:
    def hang(req: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=req)

    async with httpx.AsyncClient(transport=httpx.MockTransport(hang)) as http:
        with pytest.raises(TransientError, match="timed out"):
            await (
                FhirClient("http://127.0.0.1:1/fhir", http, connector="ehr").search("Patient", {}).__anext__()
            )


@pytest.mark.anyio
async def test_missing_events_operation_is_reported_as_absent() -> None:
    ehr = LocalFhirServer()
    ehr.has_events = False
    async with serve(ehr.app) as url, httpx.AsyncClient() as http:
        ehr.subscribe("http://127.0.0.1:1/hook", [])
        client = FhirClient(f"{url}/fhir", http, connector="ehr")
        assert await client.events("sub1", 1, 2) is None
        status = await client.status("sub1")
        assert status is not None and status["type"] == "searchset"
