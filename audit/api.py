"""The auditor HTTP API (``/audit``): queries, disclosures, exports, checkpoints, verification.

Every request needs a bearer JWT with the ``auditor`` role (careloop/tokens.py). A refused
request is audited as ``auth.failure`` (the reason and the route only: nothing from the
token, which may be someone's stolen credential); every served request is audited as
``audit.query`` with the token's subject as actor, in the same transaction as the read.

Mount with ``app.include_router(make_router(store, key_source))``; ``router_from_config``
builds the key source from ``audit.token_key``.
"""

# No ``from __future__ import annotations``: FastAPI must see the route signatures' real types,
# and ``Auditor`` is local to make_router, out of reach of string-annotation resolution.
import io
import json
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from joserfc.jwk import OctKey

from audit import checkpoint, disclosures, fhir_export, query
from audit.records import format_time
from audit.verify import verify_database
from careloop import audit_log, tokens
from careloop.clock import utc
from careloop.config import AppConfig
from careloop.errors import ConfigError
from careloop.store import Store

ROLE = "auditor"
KeySource = Callable[[], OctKey]
_bearer = HTTPBearer(auto_error=False)


def router_from_config(store: Store, cfg: AppConfig) -> APIRouter:
    return make_router(store, tokens.file_key_source(tokens.token_key_path(cfg)))


def make_router(store: Store, key_source: KeySource | OctKey) -> APIRouter:
    """The ``/audit`` router over ``store``; tokens are checked with ``key_source()``."""
    get_key: KeySource = (lambda: key_source) if isinstance(key_source, OctKey) else key_source
    router = APIRouter(prefix="/audit", tags=["audit"])

    def refuse(request: Request, reason: str) -> HTTPException:
        route = request.scope.get("route")
        with store.session() as s:
            audit_log.append(
                s,
                at=store.clock.now(),
                actor="api",
                action="auth.failure",
                outcome="denied",
                entity="audit/api",
                detail={"reason": reason, "method": request.method, "route": getattr(route, "path", "?")},
            )
        if reason == "role":
            return HTTPException(403, "the auditor role is required")
        return HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})

    def auditor(
        request: Request, cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> tokens.Principal:
        try:
            key = get_key()
        except ConfigError:
            raise HTTPException(503, "the token key is not configured") from None
        try:
            return tokens.authenticate(cred.credentials if cred else None, key, role=ROLE)
        except tokens.AuthFailure as exc:
            raise refuse(request, exc.reason) from None

    Auditor = Annotated[tokens.Principal, Depends(auditor)]

    def audited(
        who: tokens.Principal, kind: str, person: int | None, filters: dict[str, Any], n: int, s: Any
    ) -> None:
        query.record_query(
            s,
            actor=who.subject,
            at=store.clock.now(),
            via="api",
            kind=kind,
            person_id=person,
            filters=filters,
            returned=n,
        )

    @router.get("/records")
    def records(
        who: Auditor,
        person: int | None = None,
        actor: str | None = None,
        action: str | None = None,
        outcome: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=query.MAX_LIMIT)] = 100,
        format: Literal["json", "csv"] = "json",
    ) -> Response:
        q = query.AuditQuery(person, actor, action, outcome, _t(since), _t(until), after, limit)
        with store.session() as s:
            page = query.run_query(s, q, actor=who.subject, at=store.clock.now(), via="api")
        headers = {"X-Next-After": str(page.next_after)} if page.next_after is not None else {}
        if format == "csv":
            buf = io.StringIO()
            query.write_csv(page.records, buf)
            return Response(buf.getvalue(), media_type="text/csv", headers=headers)
        return _json(query.to_json(page), headers)

    @router.get("/persons/{person_id}/disclosures")
    def person_disclosures(
        who: Auditor,
        person_id: int,
        since: datetime | None = None,
        until: datetime | None = None,
        format: Literal["json", "csv"] = "json",
    ) -> Response:
        with store.session() as s:
            rep = disclosures.accounting(
                s, person_id, since=_t(since), until=_t(until), now=store.clock.now()
            )
            # As the CLI: an id that names no one (and has no disclosures on record) is a
            # mistyped id, not an empty accounting; the query is audited, tied to no one.
            known = bool(rep.entries) or disclosures.person_exists(s, person_id)
            filters: dict[str, Any] = {"since": _iso(rep.since), "until": _iso(rep.until)}
            audited(
                who,
                "disclosures",
                person_id if known else None,
                filters if known else {"person": person_id, **filters},
                len(rep.entries),
                s,
            )
        if not known:
            raise HTTPException(404, f"no person with id {person_id}")
        if format == "csv":
            buf = io.StringIO()
            disclosures.write_csv(rep, buf)
            return Response(buf.getvalue(), media_type="text/csv")
        return _json(rep.to_json())

    @router.get("/export/fhir")
    def export_fhir(
        who: Auditor,
        person: int | None = None,
        action: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=query.MAX_LIMIT)] = 100,
    ) -> Response:
        q = query.AuditQuery(
            person_id=person, action=action, since=_t(since), until=_t(until), after=after, limit=limit
        )
        with store.session() as s:
            page = query.run_query(s, q, actor=who.subject, at=store.clock.now(), via="api", kind="fhir")
        doc = fhir_export.bundle(page.records, at=store.clock.now(), person_id=person)
        if page.next_after is not None:
            # The next page must keep the filters, or it would go on with everyone's records.
            given = {"person": person, "action": action, "since": _q(since), "until": _q(until)}
            params = {k: v for k, v in given.items() if v is not None}
            params.update(after=page.next_after, limit=limit)
            doc["link"] = [{"relation": "next", "url": f"audit/export/fhir?{urlencode(params)}"}]
        return _json(doc, media_type="application/fhir+json")

    @router.get("/checkpoints")
    def checkpoints(who: Auditor) -> Response:
        with store.session() as s:
            doc = checkpoint.export(s)
            audited(who, "checkpoints", None, {}, len(doc["checkpoints"]), s)
        return _json(doc)

    @router.get("/verify")
    def verify(who: Auditor) -> Response:
        # The hub verifying itself proves little to an outsider (use the CLI offline with your own
        # checkpoint copies); it is here as a quick health check for the auditor.
        rep = verify_database(store.engine)
        with store.session() as s:
            audited(who, "verify", None, {}, rep.records, s)
        return _json(rep.to_json())

    return router


def _t(dt: datetime | None) -> datetime | None:
    return None if dt is None else utc(dt)


def _q(dt: datetime | None) -> str | None:
    return None if dt is None else format_time(dt)


def _iso(dt: datetime) -> str:
    return utc(dt).isoformat()


def _json(doc: Any, headers: dict[str, str] | None = None, media_type: str = "application/json") -> Response:
    return Response(json.dumps(doc, separators=(",", ":")), media_type=media_type, headers=headers)
