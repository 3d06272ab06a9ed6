"""A small local FHIR R4 server for tests (127.0.0.1 only): create with conditional create
(``If-None-Exist``, per the FHIR REST spec: 201 new, 200 existing, 412 several matches),
search by ``identifier=system|value``, read by id, optional bearer token check."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


def _unescape(v: str) -> str:
    return re.sub(r"\\(.)", r"\1", v)


def _split_token(token: str) -> tuple[str, str]:
    m = re.match(r"^((?:[^|\\]|\\.)*)\|(.*)$", token)
    if not m:
        return "", _unescape(token)
    return _unescape(m.group(1)), _unescape(m.group(2))


class FakeFhir:
    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.lock = threading.Lock()
        self.resources: dict[str, dict[str, dict[str, Any]]] = {}
        self.creates = 0
        self.posts = 0
        self.fail_with: list[int] = []
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> str:
        fake = self

        class Handler(_Handler):
            owner = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self.base_url

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/fhir"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def search(self, rtype: str, token: str) -> list[dict[str, Any]]:
        system, value = _split_token(token)
        with self.lock:
            return [
                r
                for r in self.resources.get(rtype, {}).values()
                if any(i.get("system") == system and i.get("value") == value for i in r.get("identifier", []))
            ]

    def put(self, rtype: str, res: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            store = self.resources.setdefault(rtype, {})
            rid = str(len(store) + 1)
            res = {**res, "id": rid, "meta": {"versionId": "1"}}
            store[rid] = res
            self.creates += 1
            return res


def outcome(code: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }


class _Handler(BaseHTTPRequestHandler):
    owner: FakeFhir
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def setup(self) -> None:
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send(self, status: int, doc: dict[str, Any] | None, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(doc).encode() if doc is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def _authorized(self) -> bool:
        if self.owner.token is None or self.headers.get("Authorization") == f"Bearer {self.owner.token}":
            return True
        self._send(401, outcome("login", "unauthorized"))
        return False

    def _path(self) -> list[str]:
        parts = urlsplit(self.path).path.strip("/").split("/")
        return parts[1:] if parts and parts[0] == "fhir" else []

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self._authorized():
            return
        parts = self._path()
        if len(parts) != 1:
            self._send(404, outcome("not-found", "unknown path"))
            return
        rtype = parts[0]
        with self.owner.lock:
            self.owner.posts += 1
            fail = self.owner.fail_with.pop(0) if self.owner.fail_with else None
        if fail:
            self._send(fail, outcome("transient" if fail >= 429 else "invalid", "scripted failure"))
            return
        try:
            res = json.loads(raw)
        except ValueError:
            self._send(400, outcome("structure", "not JSON"))
            return
        if not isinstance(res, dict) or res.get("resourceType") != rtype:
            self._send(400, outcome("invalid", "resourceType does not match the URL"))
            return
        cond = self.headers.get("If-None-Exist")
        if cond:
            token = parse_qs(cond).get("identifier", [""])[0]
            found = self.owner.search(rtype, token)
            if len(found) > 1:
                self._send(412, outcome("duplicate", "multiple matches"))
                return
            if found:
                self._send(200, found[0])
                return
        created = self.owner.put(rtype, res)
        base = f"http://{self.headers.get('Host')}/fhir"
        self._send(201, created, {"Location": f"{base}/{rtype}/{created['id']}/_history/1"})

    def do_GET(self) -> None:
        if not self._authorized():
            return
        parts = self._path()
        query = parse_qs(urlsplit(self.path).query)
        if len(parts) == 1:
            hits = self.owner.search(parts[0], query.get("identifier", [""])[0])
            self._send(
                200,
                {
                    "resourceType": "Bundle",
                    "type": "searchset",
                    "total": len(hits),
                    "entry": [{"resource": r} for r in hits],
                },
            )
        elif len(parts) == 2 and parts[1] in self.owner.resources.get(parts[0], {}):
            self._send(200, self.owner.resources[parts[0]][parts[1]])
        else:
            self._send(404, outcome("not-found", "no such resource"))
