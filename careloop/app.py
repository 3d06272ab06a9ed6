"""The HTTP app: health, readiness, and the routes that connectors and the audit API add."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from audit import api as audit_api
from careloop.http import CODES as _CODES
from careloop.http import operation_outcome
from careloop.hub import Hub
from careloop.metrics import render as render_metrics
from orchestrator import escalation_api


def create_app(hub: Hub) -> FastAPI:
    app = FastAPI(title="careloop", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.hub = hub

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return operation_outcome(
            exc.status_code, _CODES.get(exc.status_code, "exception"), str(exc.detail), headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors())
        return operation_outcome(422, "invalid", f"invalid request at {where}")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = await asyncio.to_thread(render_metrics, hub.store.engine)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/readyz")
    async def readyz() -> Any:
        ok, detail = hub.ready()
        return JSONResponse({"ready": ok, **detail}, status_code=200 if ok else 503)

    for conn in hub.connectors.values():
        router = conn.router() if hasattr(conn, "router") else None
        if router is not None:
            app.include_router(router)
    app.include_router(audit_api.router_from_config(hub.store, hub.config))
    app.include_router(escalation_api.router_from_config(hub.store, hub.config))
    return app
