"""A small FHIR R4 server for tests (FastAPI on 127.0.0.1), speaking the Subscriptions
Backport IG as a publisher.

It keeps versioned resources (``meta.versionId``, ``meta.lastUpdated``) and one topic-based
Subscription per ``subscribe()`` call, numbers events from 1, and POSTs backport R4
notification Bundles (history; entry[0] a Parameters with kebab-case names and string
counters) to the subscriber's endpoint with the subscription's channel headers.

Implements: ``GET /fhir/{Type}/{id}``, ``GET /fhir/{Type}?_lastUpdated=geX&_count=N`` (paged
via ``Bundle.link[next]`` with ``_offset``), ``POST /fhir/{Type}``, ``PUT /fhir/{Type}/{id}``,
``GET /fhir/Subscription/{id}/$status`` and ``GET /fhir/Subscription/{id}/$events``
(``eventsSinceNumber``/``eventsUntilNumber``). Test controls: ``drop`` (event numbers not
delivered), ``has_events`` (False: ``$events`` answers 404 like most servers),
``status_override`` (e.g. "error"), ``require_token`` (bearer token the FHIR API demands).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response

BP = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
FHIR_JSON = "application/fhir+json"


@dataclass
class Event:
    number: int
    timestamp: str
    focus: str
    snapshot: dict[str, Any]


@dataclass
class Sub:
    resource: dict[str, Any]
    events: list[Event] = field(default_factory=list)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LocalFhirServer:
    def __init__(self) -> None:
        self.base = ""  # set when served
        self.store: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.subs: dict[str, Sub] = {}
        self.drop: set[int] = set()
        self.has_events = True
        self.status_override: str | None = None
        self.require_token: str | None = None
        self.deliveries: list[tuple[str, int | None]] = []  # (type, event number)
        self.requests: list[str] = []
        self.app = self._build()

    # ------------------------------------------------------------------ data

    def current(self, rtype: str, rid: str) -> dict[str, Any] | None:
        versions = self.store.get((rtype, rid))
        return copy.deepcopy(versions[-1]) if versions else None

    def write(self, resource: dict[str, Any]) -> dict[str, Any]:
        res = copy.deepcopy(resource)
        res.setdefault("id", uuid.uuid4().hex[:12])
        versions = self.store.setdefault((res["resourceType"], res["id"]), [])
        res["meta"] = {**res.get("meta", {}), "versionId": str(len(versions) + 1), "lastUpdated": _now()}
        versions.append(res)
        return copy.deepcopy(res)

    def subscribe(
        self,
        endpoint: str,
        headers: list[str],
        content: str = "full-resource",
        types: tuple[str, ...] = ("Appointment",),
        sid: str = "sub1",
    ) -> str:
        self.subs[sid] = Sub(
            {
                "resourceType": "Subscription",
                "id": sid,
                "status": "active",
                "criteria": "http://example.org/SubscriptionTopic/appointments",
                "channel": {
                    "type": "rest-hook",
                    "endpoint": endpoint,
                    "header": headers,
                    "payload": FHIR_JSON,
                    "_payload": {
                        "extension": [{"url": f"{BP}/backport-payload-content", "valueCode": content}]
                    },
                },
                "_types": list(types),
            }
        )
        return sid

    async def change(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Write a resource version and notify every subscription covering its type."""
        saved = self.write(resource)
        for sid, sub in self.subs.items():
            if saved["resourceType"] not in sub.resource["_types"]:
                continue
            ev = Event(
                len(sub.events) + 1, _now(), f"{saved['resourceType']}/{saved['id']}", copy.deepcopy(saved)
            )
            sub.events.append(ev)
            if ev.number in self.drop:
                continue  # lost in transit
            await self.post(sid, self.bundle(sid, "event-notification", [ev]))
        return saved

    async def post(self, sid: str, bundle: dict[str, Any]) -> httpx.Response:
        sub = self.subs[sid]
        headers = {"Content-Type": FHIR_JSON}
        for h in sub.resource["channel"].get("header", []):
            k, _, v = h.partition(":")
            headers[k.strip()] = v.strip()
        async with httpx.AsyncClient() as c:
            r = await c.post(sub.resource["channel"]["endpoint"], content=json.dumps(bundle), headers=headers)
        params = bundle["entry"][0]["resource"]["parameter"]
        ntype = next(p["valueCode"] for p in params if p["name"] == "type")
        numbers = [
            int(pp["valueString"])
            for p in params
            if p["name"] == "notification-event"
            for pp in p["part"]
            if pp["name"] == "event-number"
        ]
        self.deliveries.append((ntype, numbers[0] if numbers else None))
        return r

    async def handshake(self, sid: str) -> httpx.Response:
        return await self.post(sid, self.bundle(sid, "handshake", [], status="requested"))

    async def heartbeat(self, sid: str) -> httpx.Response:
        return await self.post(sid, self.bundle(sid, "heartbeat", []))

    def content(self, sid: str) -> str:
        ext = self.subs[sid].resource["channel"]["_payload"]["extension"][0]
        return str(ext["valueCode"])

    def status_params(
        self, sid: str, ntype: str, events: list[Event], status: str | None = None
    ) -> dict[str, Any]:
        sub = self.subs[sid]
        params: list[dict[str, Any]] = [
            {"name": "subscription", "valueReference": {"reference": f"{self.base}/Subscription/{sid}"}},
            {"name": "topic", "valueCanonical": sub.resource["criteria"]},
            {"name": "status", "valueCode": status or self.status_override or sub.resource["status"]},
            {"name": "type", "valueCode": ntype},
            {"name": "events-since-subscription-start", "valueString": str(len(sub.events))},
        ]
        if self.status_override == "error":
            params.append(
                {
                    "name": "error",
                    "valueCodeableConcept": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/subscription-error",
                                "code": "no-response",
                            }
                        ]
                    },
                }
            )
        content = self.content(sid)
        for ev in events:
            parts: list[dict[str, Any]] = [
                {"name": "event-number", "valueString": str(ev.number)},
                {"name": "timestamp", "valueInstant": ev.timestamp},
            ]
            if content != "empty":
                parts.append({"name": "focus", "valueReference": {"reference": f"{self.base}/{ev.focus}"}})
            params.append({"name": "notification-event", "part": parts})
        return {
            "resourceType": "Parameters",
            "id": uuid.uuid4().hex,
            "meta": {"profile": [f"{BP}/backport-subscription-status-r4"]},
            "parameter": params,
        }

    def bundle(self, sid: str, ntype: str, events: list[Event], status: str | None = None) -> dict[str, Any]:
        p = self.status_params(sid, ntype, events, status)
        entries: list[dict[str, Any]] = [
            {
                "fullUrl": f"urn:uuid:{p['id']}",
                "resource": p,
                "request": {"method": "GET", "url": f"{self.base}/Subscription/{sid}/$status"},
                "response": {"status": "200"},
            }
        ]
        if self.content(sid) == "full-resource":
            for ev in events:
                entries.append(
                    {
                        "fullUrl": f"{self.base}/{ev.focus}",
                        "resource": ev.snapshot,
                        "request": {"method": "PUT", "url": ev.focus},
                        "response": {"status": "200"},
                    }
                )
        return {
            "resourceType": "Bundle",
            "id": uuid.uuid4().hex,
            "type": "history",
            "timestamp": _now(),
            "meta": {"profile": [f"{BP}/backport-subscription-notification-r4"]},
            "entry": entries,
        }

    # ------------------------------------------------------------------ HTTP

    def _build(self) -> FastAPI:
        app = FastAPI()
        srv = self

        def fhir(body: Any, status: int = 200) -> Response:
            return Response(json.dumps(body), status_code=status, media_type=FHIR_JSON)

        def oo(status: int, text: str) -> Response:
            return fhir(
                {
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": "processing", "diagnostics": text}],
                },
                status,
            )

        def authorized(request: Request) -> bool:
            return (
                srv.require_token is None
                or request.headers.get("authorization") == f"Bearer {srv.require_token}"
            )

        @app.get("/fhir/Subscription/{sid}/$status")
        async def status(sid: str, request: Request) -> Response:
            srv.requests.append(f"GET Subscription/{sid}/$status")
            if not authorized(request):
                return oo(401, "unauthorized")
            if sid not in srv.subs:
                return oo(404, "no such subscription")
            p = srv.status_params(sid, "query-status", [])
            return fhir(
                {
                    "resourceType": "Bundle",
                    "type": "searchset",
                    "total": 1,
                    "entry": [{"fullUrl": f"urn:uuid:{p['id']}", "resource": p, "search": {"mode": "match"}}],
                }
            )

        @app.get("/fhir/Subscription/{sid}/$events")
        async def events(sid: str, request: Request) -> Response:
            srv.requests.append(f"GET Subscription/{sid}/$events?{request.url.query}")
            if not authorized(request):
                return oo(401, "unauthorized")
            if not srv.has_events:
                return oo(404, "operation $events is not supported")
            if sid not in srv.subs:
                return oo(404, "no such subscription")
            lo = int(request.query_params.get("eventsSinceNumber", "1"))
            hi = int(request.query_params.get("eventsUntilNumber", str(len(srv.subs[sid].events))))
            evs = [e for e in srv.subs[sid].events if lo <= e.number <= hi]
            return fhir(srv.bundle(sid, "query-event", evs))

        @app.get("/fhir/{rtype}/{rid}")
        async def read(rtype: str, rid: str, request: Request) -> Response:
            srv.requests.append(f"GET {rtype}/{rid}")
            if not authorized(request):
                return oo(401, "unauthorized")
            if rtype == "Subscription" and rid in srv.subs:
                res = {k: v for k, v in srv.subs[rid].resource.items() if not k.startswith("_t")}
                return fhir(res)
            cur = srv.current(rtype, rid)
            return fhir(cur) if cur else oo(404, "not found")

        @app.put("/fhir/{rtype}/{rid}")
        async def update(rtype: str, rid: str, request: Request) -> Response:
            srv.requests.append(f"PUT {rtype}/{rid}")
            if not authorized(request):
                return oo(401, "unauthorized")
            doc = json.loads(await request.body())
            if rtype == "Subscription" and rid in srv.subs:
                srv.subs[rid].resource.update({k: v for k, v in doc.items() if k != "_types"})
                return fhir(doc)
            return fhir(srv.write(doc))

        @app.post("/fhir/{rtype}")
        async def create(rtype: str, request: Request) -> Response:
            srv.requests.append(f"POST {rtype}")
            if not authorized(request):
                return oo(401, "unauthorized")
            doc = json.loads(await request.body())
            doc.pop("id", None)
            return fhir(srv.write(doc), 201)

        @app.get("/fhir/{rtype}")
        async def search(rtype: str, request: Request) -> Response:
            srv.requests.append(f"GET {rtype}?{request.url.query}")
            if not authorized(request):
                return oo(401, "unauthorized")
            q = request.query_params
            since = q.get("_lastUpdated", "ge0000")[2:]
            count, offset = int(q.get("_count", "2")), int(q.get("_offset", "0"))
            matches = sorted(
                (
                    v[-1]
                    for (t, _), v in srv.store.items()
                    if t == rtype and v[-1]["meta"]["lastUpdated"] >= since.replace("Z", "")
                ),
                key=lambda r: r["meta"]["lastUpdated"],
            )
            for k, val in q.items():
                if not k.startswith("_"):
                    matches = [m for m in matches if str(m.get(k)) == val]
            page = matches[offset : offset + count]
            links = [{"relation": "self", "url": str(request.url)}]
            if offset + count < len(matches):
                nxt = httpx.URL(str(request.url)).copy_merge_params({"_offset": str(offset + count)})
                links.append({"relation": "next", "url": str(nxt)})
            return fhir(
                {
                    "resourceType": "Bundle",
                    "type": "searchset",
                    "total": len(matches),
                    "link": links,
                    "entry": [
                        {
                            "fullUrl": f"{srv.base}/{rtype}/{r['id']}",
                            "resource": r,
                            "search": {"mode": "match"},
                        }
                        for r in page
                    ],
                }
            )

        return app


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 (a free port); yields the root URL."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.01)
    assert server.started, "test server did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
