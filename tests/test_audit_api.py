"""The auditor API: bearer JWT with the auditor role, every refusal and every read audited."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from joserfc.jwk import OctKey

from audit import query
from audit.api import make_router
from audit.records import Rec
from audit.testing import seed
from careloop import tokens
from careloop.store import Store

START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


class _Client:
    """Drives the ASGI app in-process through httpx (starlette's TestClient wants httpx2)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def get(self, path: str, **kw: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
                return await c.get(path, **kw)

        return asyncio.run(go())


def _client(store: Store, key: OctKey) -> _Client:
    app = FastAPI()
    app.include_router(make_router(store, key))
    return _Client(app)


def _audits(store: Store, action: str) -> list[Rec]:
    with store.session() as s:
        return query.search(s, query.AuditQuery(action=action)).records


def test_requests_without_a_valid_auditor_token_are_refused_and_audited(store: Store, tmp_path: Path) -> None:
    tokens.generate_token_key(tmp_path / "t.key")
    key = tokens.load_token_key(tmp_path / "t.key")
    seed(store, START)
    before = len(_audits(store, "auth.failure"))
    c = _client(store, key)
    expired = tokens.issue(key, subject="old", roles=["auditor"], ttl=60, now=time.time() - 3600)
    wrong_role = tokens.issue(key, subject="ops", roles=["staff"])  # a real role, not this API's
    other_key = tokens.issue(OctKey.generate_key(256), subject="x", roles=["auditor"])
    cases = [
        ({}, 401, "missing"),
        ({"Authorization": "Bearer not.a.jwt"}, 401, "invalid"),
        ({"Authorization": f"Bearer {expired}"}, 401, "expired"),
        ({"Authorization": f"Bearer {other_key}"}, 401, "invalid"),
        ({"Authorization": f"Bearer {wrong_role}"}, 403, "role"),
    ]
    for headers, status, _ in cases:
        r = c.get("/audit/records", params={"person": 1}, headers=headers)
        assert r.status_code == status, (headers, r.text)
    failures = _audits(store, "auth.failure")[before:]
    assert [f.detail["reason"] for f in failures] == [reason for *_, reason in cases]
    for f in failures:
        assert f.detail["route"] == "/audit/records" and f.actor == "api"
        assert wrong_role not in str(f.to_json()) and "ops" not in str(f.detail)
    assert _audits(store, "audit.query") == []


def test_an_auditor_is_served_and_each_query_is_audited_with_the_subject(store: Store) -> None:
    key = OctKey.generate_key(256)
    sd = seed(store, START)
    c = _client(store, key)
    h = {"Authorization": f"Bearer {tokens.issue(key, subject='jane-auditor', roles=['auditor'])}"}
    r = c.get("/audit/records", params={"person": sd.alice}, headers=h)
    assert r.status_code == 200
    assert {x["seq"] for x in r.json()["records"]} == sd.about_alice
    r = c.get("/audit/records", params={"action": "disclosure", "format": "csv", "limit": 2}, headers=h)
    assert r.status_code == 200 and r.text.startswith("seq,at,actor") and r.headers["X-Next-After"]
    r = c.get(f"/audit/persons/{sd.alice}/disclosures", headers=h)
    assert {e["audit_seq"] for e in r.json()["entries"]} == sd.disclosures_alice
    r = c.get("/audit/export/fhir", params={"person": sd.alice}, headers=h)
    assert r.status_code == 200 and r.json()["resourceType"] == "Bundle"
    assert c.get("/audit/checkpoints", headers=h).status_code == 200
    assert c.get("/audit/verify", headers=h).json()["ok"] is True
    audits = _audits(store, "audit.query")
    assert len(audits) == 6
    assert all(a.actor == "jane-auditor" for a in audits)
    assert audits[0].person_id == sd.alice and audits[0].detail["returned"] == len(sd.about_alice)


def test_disclosures_for_an_id_that_names_no_one_is_404_and_tied_to_no_one(store: Store) -> None:
    key = OctKey.generate_key(256)
    seed(store, START)
    c = _client(store, key)
    h = {"Authorization": f"Bearer {tokens.issue(key, subject='jane-auditor', roles=['auditor'])}"}
    r = c.get("/audit/persons/999/disclosures", headers=h)
    assert r.status_code == 404 and "999" in r.text
    [q] = _audits(store, "audit.query")
    assert q.person_id is None and q.detail["filters"]["person"] == 999 and q.detail["returned"] == 0
