"""A SMART Backend Services authorization server for tests, built on authlib's server side:
``AuthorizationServer`` with the client_credentials grant, clients authenticated by
``private_key_jwt`` (RFC 7523 ``JWTBearerClientAssertion``), served by FastAPI on 127.0.0.1.

Every issued token and every verified assertion (header + claims) is recorded so tests can
check alg, exp, aud and jti uniqueness. ``on_issue`` lets a test hand the token to the
resource server it protects.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any, ClassVar
from urllib.parse import parse_qsl

from authlib.oauth2.rfc6749 import AuthorizationServer, ClientMixin, OAuth2Payload, OAuth2Request
from authlib.oauth2.rfc6749.errors import InvalidClientError
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from fastapi import FastAPI, Request, Response
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import Key


class _Client(ClientMixin):  # type: ignore[misc]
    def __init__(self, client_id: str, public_key: Key) -> None:
        self.client_id, self.public_key = client_id, public_key

    def get_client_id(self) -> str:
        return self.client_id

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        expected: str = JWTBearerClientAssertion.CLIENT_AUTH_METHOD
        return method == expected

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "client_credentials"

    def get_allowed_scope(self, scope: str) -> str:
        return scope


class _Payload(OAuth2Payload):  # type: ignore[misc]
    def __init__(self, form: dict[str, str]) -> None:
        self._form = form

    @property
    def data(self) -> dict[str, str]:
        return self._form

    @property
    def datalist(self) -> dict[str, list[str]]:
        return {k: [v] for k, v in self._form.items()}


class _Request(OAuth2Request):  # type: ignore[misc]
    def __init__(self, uri: str, form: dict[str, str], headers: dict[str, str]) -> None:
        super().__init__("POST", uri, headers=headers)
        self._form = form
        self.payload = _Payload(form)

    @property
    def args(self) -> dict[str, str]:
        return {}

    @property
    def form(self) -> dict[str, str]:
        return self._form


class SmartAuthServer:
    def __init__(self, expires_in: int = 3600) -> None:
        self.clients: dict[str, _Client] = {}
        self.token_url = ""  # set once served
        self.issued: list[str] = []
        self.assertions: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.on_issue: Callable[[str], None] = lambda token: None
        self.expires_in = expires_in
        self._jti: set[str] = set()
        self.app = self._build()

    def register(self, client_id: str, public_key: Key) -> None:
        self.clients[client_id] = _Client(client_id, public_key)

    def _build(self) -> FastAPI:
        owner = self

        class Assertion(JWTBearerClientAssertion):  # type: ignore[misc]
            def get_audiences(self) -> list[str]:
                return [owner.token_url]

            def validate_jti(self, claims: dict[str, Any], jti: str) -> bool:
                if jti in owner._jti:
                    return False
                owner._jti.add(jti)
                return True

            def resolve_client_public_key(self, client: _Client) -> Key:
                return client.public_key

            def process_assertion_claims(self, assertion: str, resolve_key: Any) -> Any:
                # SMART Backend Services signs with RS384 or ES384; joserfc's default set
                # ("recommended" algorithms) does not include them, so name them here.
                try:
                    token = jwt.decode(assertion, resolve_key, algorithms=["RS384", "ES384"])
                except JoseError as exc:
                    raise InvalidClientError(description=exc.description) from exc
                self.verify_claims(token.claims)
                owner.assertions.append((dict(token.header), dict(token.claims)))
                return token.claims

        class Grant(ClientCredentialsGrant):  # type: ignore[misc]
            TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = [JWTBearerClientAssertion.CLIENT_AUTH_METHOD]

        class Server(AuthorizationServer):  # type: ignore[misc]
            def query_client(self, client_id: str) -> _Client | None:
                return owner.clients.get(client_id)

            def save_token(self, token: dict[str, Any], request: Any) -> None:
                owner.issued.append(token["access_token"])
                owner.on_issue(token["access_token"])

            def create_oauth2_request(self, request: Any) -> Any:
                return request

            def handle_response(self, status: int, body: Any, headers: Any) -> tuple[int, Any, Any]:
                return status, body, headers

            def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
                return None

        server = Server()
        server.register_grant(Grant)
        server.register_client_auth_method(JWTBearerClientAssertion.CLIENT_AUTH_METHOD, Assertion())
        server.register_token_generator(
            "default",
            BearerTokenGenerator(
                access_token_generator=lambda **_: secrets.token_urlsafe(24),
                expires_generator=lambda client, grant_type: owner.expires_in,
            ),
        )

        app = FastAPI()

        @app.post("/token")
        async def token(request: Request) -> Response:
            form = dict(parse_qsl((await request.body()).decode()))
            status, body, headers = server.create_token_response(
                _Request(owner.token_url, form, dict(request.headers))
            )
            return Response(
                json.dumps(body), status_code=status, headers=dict(headers), media_type="application/json"
            )

        return app
