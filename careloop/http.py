"""HTTP helpers shared by the app and every HTTP-speaking connector (no heavy imports)."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi.responses import JSONResponse


def operation_outcome(
    status: int, code: str, diagnostics: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """A FHIR OperationOutcome explaining a 4xx/5xx (no PHI in ``diagnostics``)."""
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }
    return JSONResponse(body, status_code=status, media_type="application/fhir+json", headers=headers)


CODES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    409: "conflict",
    413: "too-costly",
    415: "not-supported",
    422: "invalid",
    429: "throttled",
}
