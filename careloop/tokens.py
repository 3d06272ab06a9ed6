"""Bearer tokens for the HTTP APIs (auditor and staff roles): HS256 JWTs signed with a
local secret.

JOSE comes from joserfc, which authlib 1.x recommends in place of its deprecated
``authlib.jose`` (and installs as its dependency). The secret is 32 random bytes in a file
readable by the owner only; its default place is ``var/keys/audit-token.key`` unless
``audit.token_key`` names another.
"""

from __future__ import annotations

import base64
import os
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.errors import ExpiredTokenError, JoseError
from joserfc.jwk import OctKey
from joserfc.jwt import JWTClaimsRegistry

from audit.checkpoint import DEFAULT_SIGNING_KEY
from careloop.config import AppConfig
from careloop.errors import ConfigError

ISSUER = "careloop"
AUDIENCE = "careloop-audit"
ALGORITHM = "HS256"
DEFAULT_TOKEN_KEY = Path("var/keys/audit-token.key")


class AuthFailure(Exception):
    """Why a token was refused: ``missing``, ``invalid``, ``expired`` or ``role``."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    roles: frozenset[str]


def token_key_path(cfg: AppConfig | None) -> Path:
    return Path(cfg.audit.token_key) if cfg and cfg.audit.token_key else DEFAULT_TOKEN_KEY


def signing_key_path(cfg: AppConfig | None) -> Path:
    return Path(cfg.audit.signing_key) if cfg and cfg.audit.signing_key else DEFAULT_SIGNING_KEY


def generate_token_key(out: Path, *, overwrite: bool = False) -> None:
    """Write a new 256-bit secret (base64url) with mode 0600."""
    out.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(out, flags, 0o600)
    with os.fdopen(fd, "w") as fp:
        fp.write(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode("ascii") + "\n")
    os.chmod(out, 0o600)


def load_token_key(path: Path) -> OctKey:
    try:
        raw = base64.urlsafe_b64decode(path.read_text(encoding="ascii").strip())
    except FileNotFoundError:
        raise ConfigError(
            [f"audit.token_key: {path} not found (create it with `careloop token keygen`)"]
        ) from None
    except (ValueError, UnicodeDecodeError):
        raise ConfigError([f"audit.token_key: {path} is not a base64url secret"]) from None
    if len(raw) < 32:
        raise ConfigError([f"audit.token_key: {path} holds fewer than 256 bits"])
    return OctKey.import_key(raw)


def file_key_source(path: Path) -> Callable[[], OctKey]:
    """A key source that reads ``path`` on first use and again whenever the file changes."""
    cache: dict[str, Any] = {}

    def source() -> OctKey:
        mtime = path.stat().st_mtime_ns if path.exists() else None
        if cache.get("mtime") != mtime or "key" not in cache:
            cache["key"], cache["mtime"] = load_token_key(path), mtime
        key: OctKey = cache["key"]
        return key

    return source


# The roles the HTTP APIs check: ``auditor`` (/audit) and ``staff`` (/escalations).
ROLES = ("auditor", "staff")


def issue(key: OctKey, *, subject: str, roles: list[str], ttl: int = 3600, now: float | None = None) -> str:
    """A signed token for ``subject`` with ``roles``, valid for ``ttl`` seconds."""
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ConfigError([f"--role: unknown role(s) {', '.join(unknown)} (known: {', '.join(ROLES)})"])
    iat = int(now if now is not None else time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": subject,
        "roles": roles,
        "iat": iat,
        "nbf": iat,
        "exp": iat + ttl,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode({"alg": ALGORITHM, "typ": "JWT"}, claims, key, algorithms=[ALGORITHM])


def authenticate(token: str | None, key: OctKey, *, role: str, now: float | None = None) -> Principal:
    """The token's principal if it is well signed, current and carries ``role``; else AuthFailure."""
    if not token:
        raise AuthFailure("missing")
    try:
        decoded = jwt.decode(token, key, algorithms=[ALGORITHM])
    except (JoseError, ValueError):
        raise AuthFailure("invalid") from None
    registry = JWTClaimsRegistry(
        now=int(now if now is not None else time.time()),
        leeway=30,
        iss={"essential": True, "value": ISSUER},
        aud={"essential": True, "value": AUDIENCE},
        sub={"essential": True},
        exp={"essential": True},
    )
    try:
        registry.validate(decoded.claims)
    except ExpiredTokenError:
        raise AuthFailure("expired") from None
    except JoseError:
        raise AuthFailure("invalid") from None
    roles = decoded.claims.get("roles")
    if not isinstance(roles, list) or role not in roles:
        raise AuthFailure("role")
    return Principal(str(decoded.claims["sub"]), frozenset(str(r) for r in roles))
