"""Signed checkpoints: RFC 6962 tree heads over the audit log, signed with Ed25519.

A checkpoint commits to the first ``tree_size`` records (Merkle root) and to the chain tip
at that size (``head_hash``). It is made every ``audit.checkpoint_every`` records (or after
``max_age``) by ``run_checkpoint_job``, which the runtime schedules, or on demand with
``careloop audit checkpoint``. Auditors keep exported copies outside the hub; a later
rewrite of history, even a fully re-hashed one, then no longer matches their copy.

The signed message is plain text (so any Ed25519 tool can check it)::

    careloop-audit-checkpoint/v1
    size <tree_size>
    root <hex>
    head <hex>
    at <YYYY-MM-DDTHH:MM:SS.ffffffZ>
    key <key id>

Before signing, the records added since the previous checkpoint are re-verified, so a
checkpoint never launders a record that was tampered with in between.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlmodel import Session, col, select

from audit import merkle
from audit.records import format_time, iter_db, parse_time
from careloop import audit_log
from careloop.clock import SystemClock, utc
from careloop.config import AppConfig
from careloop.errors import ConfigError, PermanentError
from careloop.store import Store
from careloop.tables import AuditCheckpoint, AuditHead

EXPORT_FORMAT = "careloop-audit-checkpoints/1"
DEFAULT_SIGNING_KEY = Path("var/keys/audit-signing.pem")
_MAGIC = "careloop-audit-checkpoint/v1"


# --------------------------------------------------------------------------- keys


def key_id(public: Ed25519PublicKey) -> str:
    """The first 8 bytes of SHA-256 over the raw public key, in hex."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def generate_key(out: Path, *, overwrite: bool = False) -> Ed25519PrivateKey:
    """Write a new Ed25519 private key as PKCS#8 PEM, readable by the owner only (0600)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(out, flags, 0o600)
    with os.fdopen(fd, "wb") as fp:
        fp.write(pem)
    os.chmod(out, 0o600)  # O_CREAT's mode does not apply to an existing file we truncate
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(
            [f"audit.signing_key: {path} not found (create it with `careloop audit keygen`)"]
        ) from None
    except (ValueError, TypeError):
        raise ConfigError([f"audit.signing_key: {path} is not an unencrypted PEM private key"]) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError([f"audit.signing_key: {path} is not an Ed25519 key"])
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM public key file (or, for convenience, a private key file)."""
    data = path.read_bytes()
    try:
        pub = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            priv = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise ConfigError([f"{path}: not a PEM public key"]) from None
        pub = priv.public_key()
    if not isinstance(pub, Ed25519PublicKey):
        raise ConfigError([f"{path}: not an Ed25519 key"])
    return pub


# --------------------------------------------------------------------------- signed heads


@dataclass(frozen=True, slots=True)
class SignedCheckpoint:
    """A checkpoint detached from the store: what exports hold and verify checks."""

    tree_size: int
    root_hash: str
    head_hash: str
    at: datetime
    key_id: str
    signature: str
    # The right-edge subtree hashes; unsigned but checkable (they must fold to root_hash).
    # A verifier needs them only to continue the tree after pruned records.
    frontier: tuple[str, ...] = ()

    def message(self) -> bytes:
        return message(self.tree_size, self.root_hash, self.head_hash, self.at, self.key_id)

    def signature_ok(self, public: Ed25519PublicKey) -> bool:
        if self.key_id != key_id(public):
            return False
        try:
            public.verify(base64.b64decode(self.signature, validate=True), self.message())
        except (InvalidSignature, ValueError):
            return False
        return True

    def frontier_ok(self) -> bool:
        try:
            acc = merkle.Accumulator(self.tree_size, (bytes.fromhex(h) for h in self.frontier))
        except ValueError:
            return False
        return acc.root().hex() == self.root_hash

    def to_json(self) -> dict[str, Any]:
        return {
            "tree_size": self.tree_size,
            "root_hash": self.root_hash,
            "head_hash": self.head_hash,
            "at": format_time(self.at),
            "key_id": self.key_id,
            "signature": self.signature,
            "frontier": list(self.frontier),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SignedCheckpoint:
        try:
            return cls(
                int(doc["tree_size"]),
                str(doc["root_hash"]),
                str(doc["head_hash"]),
                parse_time(str(doc["at"])),
                str(doc["key_id"]),
                str(doc["signature"]),
                tuple(str(h) for h in doc.get("frontier", ())),
            )
        except (KeyError, TypeError, ValueError):
            raise ValueError("not a careloop checkpoint") from None

    @classmethod
    def from_row(cls, row: AuditCheckpoint) -> SignedCheckpoint:
        return cls(
            row.tree_size,
            row.root_hash,
            row.head_hash,
            utc(row.created_at),
            row.key_id,
            row.signature,
            tuple(row.frontier),
        )


def message(tree_size: int, root_hex: str, head_hex: str, at: datetime, kid: str) -> bytes:
    return (
        f"{_MAGIC}\nsize {tree_size}\nroot {root_hex}\nhead {head_hex}\nat {format_time(at)}\nkey {kid}\n"
    ).encode("ascii")


def latest(session: Session) -> AuditCheckpoint | None:
    return session.exec(
        select(AuditCheckpoint).order_by(col(AuditCheckpoint.tree_size).desc()).limit(1)
    ).first()


def make_checkpoint(
    session: Session, key: Ed25519PrivateKey, *, at: datetime | None = None
) -> AuditCheckpoint | None:
    """Sign the tree head over every record so far, in ``session``'s transaction.

    Returns the new checkpoint, the latest one if no record was added since, or None for an
    empty log. Raises PermanentError if the records since the last checkpoint do not verify.
    """
    at = utc(at or SystemClock().now())
    head = audit_log.head(session)  # row lock: appenders wait while we read a stable tree
    session.flush()
    prev = latest(session)
    if head.seq == 0:
        return None
    if prev is not None and prev.tree_size == head.seq:
        return prev
    if prev is not None and prev.tree_size > head.seq:
        raise PermanentError("audit checkpoint is ahead of the chain head")
    if prev is not None and not SignedCheckpoint.from_row(prev).frontier_ok():
        # The frontier is not under the signature; building on a forged one would have us
        # sign a wrong root over intact records.
        raise PermanentError(
            f"audit checkpoint {prev.tree_size}: its frontier does not match its root; "
            "run `careloop audit verify`"
        )
    acc = (
        merkle.Accumulator(prev.tree_size, (bytes.fromhex(h) for h in prev.frontier))
        if prev
        else merkle.Accumulator()
    )
    last_hash = prev.head_hash if prev else audit_log.GENESIS
    expected = acc.size + 1
    for rec in iter_db(session.connection(), after_seq=acc.size, upto_seq=head.seq):
        if rec.seq != expected or rec.prev_hash != last_hash or rec.computed_hash() != rec.hash:
            raise PermanentError(f"audit record {expected} does not verify; run `careloop audit verify`")
        acc.append(merkle.leaf_hash(bytes.fromhex(rec.hash)))
        last_hash, expected = rec.hash, expected + 1
    if acc.size != head.seq or last_hash != head.hash:
        raise PermanentError(f"audit records end at {acc.size}, the chain head says {head.seq}")
    public = key.public_key()
    kid = key_id(public)
    root_hex = acc.root().hex()
    sig = key.sign(message(acc.size, root_hex, last_hash, at, kid))
    cp = AuditCheckpoint(
        tree_size=acc.size,
        root_hash=root_hex,
        head_hash=last_hash,
        created_at=at,
        key_id=kid,
        signature=base64.b64encode(sig).decode("ascii"),
        frontier=[h.hex() for h in acc.frontier],
    )
    session.add(cp)
    session.flush()
    return cp


def checkpoint_due(session: Session, *, every: int, now: datetime, max_age: timedelta | None = None) -> bool:
    """Whether ``every`` records were added since the last checkpoint, or ``max_age`` passed
    with at least one record added."""
    seq = session.exec(select(AuditHead.seq).where(AuditHead.id == 1)).first() or 0
    prev = latest(session)
    done = prev.tree_size if prev else 0
    if seq - done >= every:
        return True
    return bool(
        max_age is not None and seq > done and prev is not None and utc(prev.created_at) + max_age <= now
    )


def run_checkpoint_job(
    store: Store, key: Ed25519PrivateKey, *, every: int, max_age: timedelta | None = None
) -> AuditCheckpoint | None:
    """The periodic job: make a checkpoint when one is due (else None). Cheap when not due:
    no lock is taken on the chain head."""
    now = store.clock.now()
    with store.session() as s:
        if not checkpoint_due(s, every=every, now=now, max_age=max_age):
            return None
    with store.session() as s:
        return make_checkpoint(s, key, at=now)


def job_from_config(store: Store, cfg: AppConfig) -> Callable[[], AuditCheckpoint | None]:
    """The scheduler's checkpoint job for this deployment: key from ``audit.signing_key``
    (default var/keys/audit-signing.pem), every ``audit.checkpoint_every`` records or
    ``audit.checkpoint_minutes``. The key is loaded now, so a missing key fails at start."""
    path = Path(cfg.audit.signing_key) if cfg.audit.signing_key else DEFAULT_SIGNING_KEY
    key = load_private_key(path)
    every, max_age = cfg.audit.checkpoint_every, timedelta(minutes=cfg.audit.checkpoint_minutes)
    return lambda: run_checkpoint_job(store, key, every=every, max_age=max_age)


# --------------------------------------------------------------------------- export


def export(session: Session, public: Ed25519PublicKey | None = None) -> dict[str, Any]:
    """Every checkpoint as a JSON document for auditors to keep outside the hub."""
    rows = session.exec(select(AuditCheckpoint).order_by(col(AuditCheckpoint.tree_size))).all()
    doc: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "checkpoints": [SignedCheckpoint.from_row(r).to_json() for r in rows],
    }
    if public is not None:
        # For reference only: verify with a key obtained out of band, never this copy.
        doc["public_key"] = public_pem(public)
    return doc


def load_file(path: Path) -> list[SignedCheckpoint]:
    """Checkpoints from an export (``{"checkpoints": [...]}``) or a single checkpoint object."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except json.JSONDecodeError:
        raise ConfigError([f"{path}: not valid JSON"]) from None
    items = doc.get("checkpoints") if isinstance(doc, dict) and "checkpoints" in doc else [doc]
    if not isinstance(items, list):
        raise ConfigError([f"{path}: checkpoints must be a list"])
    try:
        return [SignedCheckpoint.from_json(i) for i in items]
    except ValueError:
        raise ConfigError([f"{path}: not a careloop checkpoint file"]) from None
