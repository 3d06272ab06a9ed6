"""A local Twilio-compatible Messages API on 127.0.0.1: the loopback capture server of the
example deployment (``careloop channels twilio-loopback``) and the test double of the
twilio_sms tests and the crash test.

Implements the documented endpoints of Programmable Messaging (REST API 2010-04-01):

- ``POST /2010-04-01/Accounts/{AccountSid}/Messages.json`` (form: To, From or
  MessagingServiceSid, Body, StatusCallback) -> 201 Message resource, status queued
  (accepted with a Messaging Service);
- ``GET  /2010-04-01/Accounts/{AccountSid}/Messages/{Sid}.json`` -> the Message, or 404;
- ``GET  /2010-04-01/Accounts/{AccountSid}/Messages.json`` with ``To``, ``From``,
  ``DateSent``/``DateSent>``/``DateSent<`` filters, ``PageSize`` and paging through
  ``next_page_uri``, newest first;

with HTTP basic auth (account SID / auth token; ``auth_token=None`` accepts any token for
the account) and Twilio's error bodies (``{"code", "message", "more_info", "status"}``).
Every accepted message is kept in memory, including its StatusCallback, so a test can
count deliveries per outbox key. Nothing is sent anywhere and nothing is logged but sids.

An account the API refuses: ``account_refusal`` set to one of ``ACCOUNT_ERRORS``' codes
(20403 for a suspended or closed account, 20005 or 10001 for one not active) answers every
request that authenticates with that error, as Twilio answers an account that may not use the
API, until it is set back to None (the account reactivated).

Test controls: ``fail_with`` (status codes answered to the next POSTs), ``delay``
(seconds to wait after recording, before answering), ``hang_at`` (the Nth POST is
recorded and then never answered until ``release()``), ``garble_next`` (the next N accepted
POSTs are recorded and answered 201 with a body that is not JSON, as a proxy's error page
or a truncated response would be).
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import socket
import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

ACCOUNT_SID = "AC" + "0" * 31 + "1"
AUTH_TOKEN = "fake-auth-token-0001"

# Twilio's REST API errors for an account that may not use the API at all, with the HTTP
# status and message the loopback answers them with (Twilio's error body: code, message,
# more_info, status). 20403 is "403 Forbidden" (the account suspended or closed); the pages of
# 20005 and 10001 (the account not active) name no HTTP status, so the loopback answers them
# with 403 as well, the status of the same refusal: the channel matches the code alone.
# https://www.twilio.com/docs/api/errors/20403
# https://www.twilio.com/docs/api/errors/20005
# https://www.twilio.com/docs/api/errors/10001
ACCOUNT_ERRORS: dict[int, tuple[int, str]] = {
    20403: (403, "403 Forbidden"),
    20005: (403, "Account not active"),
    10001: (403, "Account is not active"),
}


class FakeTwilio:
    """The server; ``start()`` runs it on a daemon thread and returns its base URL."""

    def __init__(self, account_sid: str = ACCOUNT_SID, auth_token: str | None = AUTH_TOKEN) -> None:
        self.account_sid, self.auth_token = account_sid, auth_token
        self.lock = threading.Lock()
        self.messages: list[dict[str, Any]] = []
        self.by_sid: dict[str, dict[str, Any]] = {}
        self.posts = 0
        self.fail_with: list[int] = []
        self.delay = 0.0
        self.hang_at: int | None = None
        self.garble_next = 0
        self.account_refusal: int | None = None  # a code of ACCOUNT_ERRORS: the account refused
        self.hung = threading.Event()  # set once the hanging request was recorded
        self._release = threading.Event()
        self.now: Callable[[], datetime] = lambda: datetime.now(UTC)
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle
    def start(self, port: int = 0) -> str:
        fake = self

        class Handler(_Handler):
            owner = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self.base_url

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def release(self) -> None:
        self._release.set()

    # -- inspection
    def keys(self) -> Counter[str]:
        """How many accepted messages carried each outbox key (from StatusCallback)."""
        with self.lock:
            out: Counter[str] = Counter()
            for m in self.messages:
                cb = m.get("_status_callback") or ""
                key = parse_qs(urlsplit(cb).query).get("key", [None])[0]
                if key:
                    out[key] += 1
            return out

    def set_status(self, sid: str, status: str) -> None:
        with self.lock:
            msg = self.by_sid[sid]
            msg["status"] = status
            if status in ("sent", "delivered", "read") and msg["date_sent"] is None:
                msg["date_sent"] = format_datetime(self.now())

    # -- the API
    def create(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        to, body = form.get("To", ""), form.get("Body", "")
        if not to.startswith("+") or not to[1:].isdigit():
            return 400, _error(21211, "The 'To' number is not a valid phone number.", 400)
        if not body:
            return 400, _error(21602, "Message body is required.", 400)
        if not form.get("From") and not form.get("MessagingServiceSid"):
            return 400, _error(21603, "A 'From' or 'MessagingServiceSid' parameter is required", 400)
        with self.lock:
            self.posts += 1
            n = self.posts
            if self.fail_with:
                code = self.fail_with.pop(0)
                twilio_code = 20429 if code == 429 else 20500 if code >= 500 else 21610
                return code, _error(twilio_code, "failure", code)
            now = self.now()
            sid = "SM" + secrets.token_hex(16)
            msg = {
                "sid": sid,
                "account_sid": self.account_sid,
                "to": to,
                "from": form.get("From"),
                "messaging_service_sid": form.get("MessagingServiceSid"),
                "body": body,
                "status": "accepted" if form.get("MessagingServiceSid") else "queued",
                "num_segments": "1",
                "direction": "outbound-api",
                "api_version": "2010-04-01",
                "date_created": format_datetime(now, usegmt=False),
                "date_updated": format_datetime(now),
                "date_sent": None,
                "error_code": None,
                "error_message": None,
                "price": None,
                "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
                "_status_callback": form.get("StatusCallback"),
                "_seq": n,
            }
            self.messages.append(msg)
            self.by_sid[sid] = msg
        if self.hang_at is not None and n == self.hang_at:
            self.hung.set()
            self._release.wait()
        return 201, _public(msg)

    def list(self, query: dict[str, str]) -> dict[str, Any]:
        size = max(1, min(1000, int(query.get("PageSize", "50"))))
        page = int(query.get("Page", "0"))
        with self.lock:
            rows = [m for m in self.messages if _matches(m, query)]
        rows.sort(key=lambda m: m["_seq"], reverse=True)  # newest first
        chunk = rows[page * size : (page + 1) * size]
        base = f"/2010-04-01/Accounts/{self.account_sid}/Messages.json"
        keep = {k: v for k, v in query.items() if k not in ("Page", "PageToken")}
        nxt = None
        if (page + 1) * size < len(rows):
            nxt = f"{base}?{urlencode({**keep, 'Page': page + 1, 'PageToken': f'PA{page + 1}'})}"
        return {
            "messages": [_public(m) for m in chunk],
            "page": page,
            "page_size": size,
            "first_page_uri": f"{base}?{urlencode({**keep, 'Page': 0})}",
            "next_page_uri": nxt,
            "previous_page_uri": None,
            "uri": f"{base}?{urlencode(query)}",
            "start": page * size,
            "end": page * size + len(chunk) - 1,
        }


def _error(code: int, message: str, status: int) -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def _public(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if not k.startswith("_")}


def _matches(m: dict[str, Any], q: dict[str, str]) -> bool:
    if "To" in q and m["to"] != q["To"]:
        return False
    if "From" in q and m["from"] != q["From"]:
        return False
    for op in ("DateSent", "DateSent>", "DateSent<"):
        if op in q:
            if m["date_sent"] is None:  # unsent messages have no DateSent to compare
                return False
            day = parsedate_to_datetime(m["date_sent"]).date().isoformat()
            want = q[op][:10]
            if (
                (op == "DateSent" and day != want)
                or (op == "DateSent>" and day < want)
                or (op == "DateSent<" and day > want)
            ):
                return False
    return True


class _Handler(BaseHTTPRequestHandler):
    owner: FakeTwilio
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        return None

    def setup(self) -> None:
        super().setup()
        # headers and body are separate writes: without this, Nagle + delayed ACK add 40 ms
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send(self, status: int, doc: dict[str, Any]) -> None:
        self._send_raw(status, json.dumps(doc).encode(), "application/json")

    def _send_raw(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        got = self.headers.get("Authorization") or ""
        try:
            user, _, token = base64.b64decode(got.removeprefix("Basic ")).decode().partition(":")
        except ValueError:
            user, token = "", ""
        if user != self.owner.account_sid or self.owner.auth_token not in (None, token):
            self._send(401, _error(20003, "Authenticate", 401))
            return False
        refusal = self.owner.account_refusal
        if refusal is not None:
            status, message = ACCOUNT_ERRORS[refusal]
            self._send(status, _error(refusal, message, status))
            return False
        return True

    def _route(self) -> tuple[str, str] | None:
        path = urlsplit(self.path).path
        prefix = f"/2010-04-01/Accounts/{self.owner.account_sid}/Messages"
        if path == f"{prefix}.json":
            return ("collection", "")
        if path.startswith(prefix + "/") and path.endswith(".json"):
            return ("instance", path[len(prefix) + 1 : -5])
        return None

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode()
        if not self._authorized():
            return
        if self._route() != ("collection", ""):
            self._send(404, _error(20404, "The requested resource was not found", 404))
            return
        status, doc = self.owner.create(dict(parse_qsl(raw, keep_blank_values=True)))
        with self.owner.lock:
            garble = status == 201 and self.owner.garble_next > 0
            if garble:
                self.owner.garble_next -= 1
        if garble:
            self._send_raw(201, b"<html><body>upstream reset</body></html>", "text/html")
            return
        if self.owner.delay:
            threading.Event().wait(self.owner.delay)
        # the client may have been killed while we held its request: that is the crash test
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._send(status, doc)

    def do_GET(self) -> None:
        if not self._authorized():
            return
        route = self._route()
        query = dict(parse_qsl(urlsplit(self.path).query, keep_blank_values=True))
        if route == ("collection", ""):
            self._send(200, self.owner.list(query))
        elif route is not None and route[1] in self.owner.by_sid:
            self._send(200, _public(self.owner.by_sid[route[1]]))
        else:
            self._send(404, _error(20404, "The requested resource was not found", 404))


TwilioLoopback = FakeTwilio
