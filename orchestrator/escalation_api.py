"""The escalation work queue over HTTP (``/escalations``), for staff.

Every request needs a bearer JWT carrying the ``staff`` role, checked with the
kernel's token code (careloop/tokens.py, the same HS256 key as the auditor API). A refused
request is audited as ``auth.failure`` (reason and route only); reading an escalation's
evidence (the patient's message) is audited as ``escalation.view``; every state change is
audited by orchestrator/escalation.py with the token's subject as actor.

Mount with ``app.include_router(router_from_config(store, cfg))`` or
``make_router(store, key_source)``.
"""

# No ``from __future__ import annotations``: FastAPI must see the route signatures' real types.
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from careloop import audit_log
from careloop.config import AppConfig
from careloop.errors import ConfigError
from careloop.store import Store
from orchestrator import escalation

ROLE = "staff"
_bearer = HTTPBearer(auto_error=False)


class FeedbackBody(BaseModel):
    feedback: Literal["needed", "not_needed"]


def router_from_config(store: Store, cfg: AppConfig) -> APIRouter:
    from careloop import tokens

    return make_router(store, tokens.file_key_source(tokens.token_key_path(cfg)))


def make_router(store: Store, key_source: Any) -> APIRouter:
    """The ``/escalations`` router; ``key_source`` is a joserfc OctKey or a callable giving one."""
    from careloop import tokens  # the one token scheme of the deployment (bearer JWT, roles)

    get_key: Callable[[], Any] = key_source if callable(key_source) else (lambda: key_source)
    router = APIRouter(prefix="/escalations", tags=["escalations"])

    def staff(
        request: Request, cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> str:
        try:
            key = get_key()
        except ConfigError:
            raise HTTPException(503, "the token key is not configured") from None
        try:
            who = tokens.authenticate(cred.credentials if cred else None, key, role=ROLE)
        except tokens.AuthFailure as exc:
            route = request.scope.get("route")
            with store.session() as s:
                audit_log.append(
                    s,
                    at=store.clock.now(),
                    actor="api",
                    action="auth.failure",
                    outcome="denied",
                    entity="escalations/api",
                    detail={
                        "reason": exc.reason,
                        "method": request.method,
                        "route": getattr(route, "path", "?"),
                    },
                )
            if exc.reason == "role":
                raise HTTPException(403, "the staff role is required") from None
            raise HTTPException(
                401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
            ) from None
        return f"staff:{who.subject}"

    Staff = Annotated[str, Depends(staff)]

    def refused(exc: escalation.EscalationError) -> HTTPException:
        return HTTPException(404 if "not found" in str(exc) else 409, str(exc))

    @router.get("")
    def list_(
        who: Staff,
        status: Annotated[list[str] | None, Query()] = None,
        severity: str | None = None,
        person: int | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        with store.session() as s:
            rows = escalation.list_escalations(
                s, status=status or list(escalation.OPEN), severity=severity, person_id=person, limit=limit
            )
            return {"escalations": [escalation.to_json(e, evidence=False) for e in rows]}

    @router.get("/report")
    def report(who: Staff) -> dict[str, Any]:
        with store.session() as s:
            rows = escalation.precision_report(s)
        return {
            "rules": [
                {
                    "rule": r.rule,
                    "escalations": r.escalations,
                    "needed": r.needed,
                    "not_needed": r.not_needed,
                    "precision": r.precision,
                }
                for r in rows
            ]
        }

    @router.get("/{esc_id}")
    def show(who: Staff, esc_id: int) -> dict[str, Any]:
        with store.session() as s:
            try:
                esc = escalation.get(s, esc_id)
            except escalation.EscalationError as exc:
                raise refused(exc) from None
            audit_log.append(
                s,
                at=store.clock.now(),
                actor=who,
                action="escalation.view",
                person_id=esc.person_id,
                entity=f"escalation/{esc.id}",
                detail={"via": "api"},
            )
            return escalation.to_json(esc)

    @router.post("/{esc_id}/acknowledge")
    def acknowledge(who: Staff, esc_id: int) -> dict[str, Any]:
        with store.session() as s:
            try:
                esc = escalation.acknowledge(s, esc_id, actor=who, now=store.clock.now())
            except escalation.EscalationError as exc:
                raise refused(exc) from None
            return escalation.to_json(esc, evidence=False)

    @router.post("/{esc_id}/resolve")
    def resolve(who: Staff, esc_id: int, body: FeedbackBody) -> dict[str, Any]:
        with store.session() as s:
            try:
                esc = escalation.resolve(s, esc_id, actor=who, now=store.clock.now(), feedback=body.feedback)
            except escalation.EscalationError as exc:
                raise refused(exc) from None
            return escalation.to_json(esc, evidence=False)

    @router.post("/{esc_id}/feedback")
    def feedback(who: Staff, esc_id: int, body: FeedbackBody) -> dict[str, Any]:
        with store.session() as s:
            try:
                esc = escalation.set_feedback(
                    s, esc_id, actor=who, now=store.clock.now(), feedback=body.feedback
                )
            except escalation.EscalationError as exc:
                raise refused(exc) from None
            return escalation.to_json(esc, evidence=False)

    return router
