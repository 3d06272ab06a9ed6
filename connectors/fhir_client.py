"""A FHIR R4 REST client on an injected ``httpx.AsyncClient``, with SMART Backend Services auth.

SMART Backend Services (client_credentials grant, ``private_key_jwt`` client authentication,
``careloop.smart_auth``, shared with the FHIR write-back channel): the client signs a
short-lived assertion (RS384 or ES384, ``exp`` at most five minutes ahead, a fresh ``jti``
each time) with authlib's RFC 7523 helper and trades it for an access token, which is cached
until shortly before it expires. A 401 from the FHIR server drops the cached
token and retries once with a new one; a second 401 is a ``PermanentError`` asking the operator
for credentials, because retrying forever with a rejected key helps no one.

Errors are converted here, at the boundary: 429, 5xx and transport failures are
``TransientError``; other 4xx are ``PermanentError``. Messages name the connector, the
interaction and the status, never a resource's content.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urljoin

import httpx
from pydantic import Field

from careloop.errors import PermanentError, TransientError
from careloop.plugins import MapperChoice, PluginConfig
from careloop.smart_auth import SmartAuthConfig, SmartBackendAuth

__all__ = ["FhirClient", "FhirServerConfig", "SmartAuthConfig", "SmartBackendAuth"]

FHIR_JSON = "application/fhir+json"


class FhirServerConfig(PluginConfig):
    """What every FHIR connector says about its server: where it is, how to authenticate,
    and how its Appointments are read (the ``fhir`` mapper's options)."""

    base_url: str
    auth: SmartAuthConfig | None = None
    timeout_s: float = Field(15.0, gt=0)
    patient_accepted_confirms: bool = Field(
        True,
        description="a booked Appointment with the patient 'accepted' is a confirmation; turn off for"
        " EHRs that mark patients accepted by default",
    )

    def mapper_choice(self) -> MapperChoice:
        """The ``fhir`` mapper with this server's base URL and its confirmation rule."""
        return MapperChoice(
            "fhir", {"base_url": self.base_url, "accepted_confirms": self.patient_accepted_confirms}
        )


class FhirClient:
    """The FHIR interactions the connectors need: read, paged search, create/update,
    ``Subscription/$status`` and ``Subscription/$events``."""

    def __init__(
        self,
        base_url: str,
        http: httpx.AsyncClient,
        *,
        connector: str,
        auth: SmartBackendAuth | None = None,
        timeout_s: float = 15.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base = base_url.rstrip("/")
        self.http, self.connector, self.auth, self.timeout = http, connector, auth, timeout_s
        self.headers = dict(headers or {})

    # ------------------------------------------------------------------ plumbing

    def url(self, path_or_url: str) -> str:
        if path_or_url.startswith(("http://", "https://")):
            return path_or_url
        return f"{self.base}/{path_or_url.lstrip('/')}"

    async def request(
        self,
        method: str,
        path_or_url: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        what: str = "request",
    ) -> httpx.Response:
        """One interaction; a 401 refreshes the token once. Returns 2xx and 404/400/405/501
        responses (callers decide what "not there" means); raises for the rest."""
        url = self.url(path_or_url)
        headers = {"Accept": FHIR_JSON, **self.headers}
        if json is not None:
            headers["Content-Type"] = FHIR_JSON

        async def send(authorization: str | None) -> httpx.Response:
            h = headers if authorization is None else {**headers, "Authorization": authorization}
            try:
                return await self.http.request(
                    method, url, params=params, json=json, headers=h, timeout=self.timeout
                )
            except httpx.TimeoutException:
                raise TransientError(f"connector {self.connector}: {what} timed out") from None
            except httpx.HTTPError as exc:
                raise TransientError(
                    f"connector {self.connector}: {what} failed ({type(exc).__name__})"
                ) from None

        r = await (self.auth.authorized(send) if self.auth is not None else send(None))
        if r.status_code == 401:
            raise PermanentError(
                f"connector {self.connector}: the FHIR server refused our credentials for {what} "
                f"(HTTP 401); please provide valid credentials for this connector"
            )
        if r.status_code == 429 or (r.status_code >= 500 and r.status_code != 501):
            raise TransientError(f"connector {self.connector}: {what} answered {r.status_code}")
        if r.status_code >= 400 and r.status_code not in (400, 404, 405, 410, 501):
            raise PermanentError(f"connector {self.connector}: {what} answered {r.status_code}")
        return r

    @staticmethod
    def _json(r: httpx.Response, connector: str, what: str) -> dict[str, Any]:
        try:
            doc = r.json()
        except ValueError:
            raise PermanentError(f"connector {connector}: {what} did not answer JSON") from None
        if not isinstance(doc, dict):
            raise PermanentError(f"connector {connector}: {what} did not answer a JSON object")
        return doc

    def _ok(self, r: httpx.Response, what: str) -> dict[str, Any]:
        if r.status_code >= 400:
            raise PermanentError(f"connector {self.connector}: {what} answered {r.status_code}")
        return self._json(r, self.connector, what)

    # ------------------------------------------------------------------ interactions

    async def read(self, reference: str) -> dict[str, Any] | None:
        """Read ``Type/id`` (or an absolute URL on this server); None when it is gone."""
        ref = reference
        if ref.startswith(("http://", "https://")) and not ref.startswith(self.base + "/"):
            raise PermanentError(f"connector {self.connector}: reference is not on this server's base URL")
        parts = ref.removeprefix(self.base + "/").split("/")
        if len(parts) >= 4 and parts[2] == "_history":
            parts = parts[:2]  # read the current version: events are about the latest state
        if len(parts) != 2:
            raise PermanentError(f"connector {self.connector}: cannot read a reference of that shape")
        what = f"read {parts[0]}"
        r = await self.request("GET", "/".join(parts), what=what)
        if r.status_code in (404, 410):
            return None
        return self._ok(r, what)

    async def search(self, resource_type: str, params: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Every matching resource across pages (follows ``Bundle.link[next]``)."""
        what = f"search {resource_type}"
        url: str | None = resource_type
        query: Mapping[str, Any] | None = params
        pages = 0
        while url is not None:
            bundle = self._ok(await self.request("GET", url, params=query, what=what), what)
            pages += 1
            for entry in bundle.get("entry") or []:
                res = entry.get("resource")
                if isinstance(res, dict) and (entry.get("search") or {}).get("mode", "match") == "match":
                    yield res
            nxt = next(
                (link.get("url") for link in bundle.get("link") or [] if link.get("relation") == "next"), None
            )
            # A next link is an opaque URL from the server; resolve relative ones against the base.
            url, query = (urljoin(self.base + "/", nxt) if nxt else None), None
            if pages > 10_000:
                raise PermanentError(f"connector {self.connector}: {what} does not end (paging loop)")

    async def create(self, resource: dict[str, Any]) -> dict[str, Any]:
        what = f"create {resource.get('resourceType')}"
        r = await self.request("POST", str(resource["resourceType"]), json=resource, what=what)
        doc = self._ok(r, what)
        if doc.get("resourceType") != resource["resourceType"]:  # return=minimal: read it back
            loc = r.headers.get("Location") or r.headers.get("Content-Location") or ""
            parts = loc.removeprefix(self.base + "/").split("/")
            if len(parts) >= 2:
                got = await self.read("/".join(parts[:2]))
                if got is not None:
                    return got
            raise PermanentError(f"connector {self.connector}: {what} returned no resource")
        return doc

    async def update(self, resource: dict[str, Any]) -> dict[str, Any]:
        what = f"update {resource.get('resourceType')}"
        r = await self.request(
            "PUT", f"{resource['resourceType']}/{resource['id']}", json=resource, what=what
        )
        doc = self._ok(r, what)
        return doc if doc.get("resourceType") == resource["resourceType"] else resource

    async def status(self, subscription_id: str) -> dict[str, Any] | None:
        """``Subscription/<id>/$status``; None when the server does not support it."""
        r = await self.request("GET", f"Subscription/{subscription_id}/$status", what="Subscription $status")
        if r.status_code in (400, 404, 405, 501):
            return None
        return self._json(r, self.connector, "Subscription $status")

    async def events(
        self, subscription_id: str, since: int, until: int | None = None, content: str = "full-resource"
    ) -> dict[str, Any] | None:
        """``Subscription/<id>/$events`` for event numbers ``since..until``; None when the server
        has no ``$events`` (most do not), so the caller falls back to searching."""
        params: dict[str, Any] = {"eventsSinceNumber": since, "content": content}
        if until is not None:
            params["eventsUntilNumber"] = until
        r = await self.request(
            "GET", f"Subscription/{subscription_id}/$events", params=params, what="Subscription $events"
        )
        if r.status_code in (400, 404, 405, 501):
            return None
        return self._json(r, self.connector, "Subscription $events")
