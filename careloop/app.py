"""The HTTP app: health, readiness, and the routes that connectors and the audit API add."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from careloop.hub import Hub


def operation_outcome(status: int, code: str, diagnostics: str) -> JSONResponse:
    """A FHIR OperationOutcome explaining a 4xx/5xx (no PHI in ``diagnostics``)."""
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }
    return JSONResponse(body, status_code=status, media_type="application/fhir+json")


_CODES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
          409: "conflict", 413: "too-costly", 415: "not-supported", 422: "invalid", 429: "throttled"}


def create_app(hub: Hub) -> FastAPI:
    app = FastAPI(title="careloop", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.hub = hub

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return operation_outcome(exc.status_code, _CODES.get(exc.status_code, "exception"), str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors())
        return operation_outcome(422, "invalid", f"invalid request at {where}")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> Any:
        ok, detail = hub.ready()
        return JSONResponse({"ready": ok, **detail}, status_code=200 if ok else 503)

    for conn in hub.connectors.values():
        router = conn.router() if hasattr(conn, "router") else None
        if router is not None:
            app.include_router(router)
    return app
