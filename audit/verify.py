"""Offline verification of the audit log: the hash chain, Merkle roots, signatures, consistency.

Input is either the database or a JSON Lines export; checkpoints come from the database and/or
checkpoint files an auditor kept. The walk stops at the first record that does not fit and
names it by its position in the sequence 1..n:

- ``modified``     the record's content no longer hashes to its ``hash``;
- ``broken_link``  its ``prev_hash`` is not the previous record's hash (swapped or forged);
- ``inserted``     it links to an earlier record, so the records in between were inserted;
- ``sequence``     its seq is not the next one (deleted, reordered or duplicated);
- ``unreadable``   the export line does not parse;
- ``truncated`` / ``extra``  the records end before or after the chain head / a checkpoint.

Checkpoints themselves can be ``bad_signature``, ``unknown_key`` (signed by a key not given),
or ``bad_frontier`` (the unsigned frontier stored with them does not fold to the signed root).

Rewriting history *and* re-hashing everything after it passes the chain check; it is caught by
``root_mismatch`` against a signed checkpoint, which names the range of records it covers, and
by ``inconsistent`` when an earlier checkpoint the auditor kept is not a prefix of the log.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, select
from sqlalchemy.engine import Connection, Engine
from sqlmodel import col

from audit import merkle
from audit.checkpoint import SignedCheckpoint, key_id
from audit.records import Rec, UnreadableRecord, iter_db, read_jsonl
from careloop.audit_log import GENESIS
from careloop.tables import AuditCheckpoint, AuditHead, AuditRecord

# How far back an ``inserted`` run is recognised; older links are reported as ``broken_link``.
_LINK_WINDOW = 200_000


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    seq: int | None  # the first bad record, when the fault is about records
    message: str  # ids and hashes only
    last: int | None = None  # set when the fault only bounds the bad record to seq..last

    def __str__(self) -> str:
        if self.seq is None:
            where = ""
        elif self.last is not None:
            where = f"records {self.seq}..{self.last}: "
        else:
            where = f"record {self.seq}: "
        return f"{self.kind}: {where}{self.message}"


@dataclass
class Report:
    records: int = 0
    first_seq: int = 1
    checkpoints_checked: int = 0
    signatures_checked: int = 0
    consistency_proofs: int = 0
    faults: list[Fault] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.faults

    @property
    def first_bad(self) -> Fault | None:
        """The earliest bad record. A precise fault (one record) wins over a checkpoint's range
        that contains it, since it explains the range's mismatch and says exactly where."""
        precise = [f for f in self.faults if f.seq is not None and f.last is None]
        ranges = [
            f
            for f in self.faults
            if f.seq is not None
            and f.last is not None
            and not any(f.seq <= (p.seq or 0) <= f.last for p in precise)
        ]
        cands = precise + ranges
        return min(cands, key=lambda f: f.seq or 0) if cands else None

    def to_json(self) -> dict[str, Any]:
        fb = self.first_bad
        return {
            "ok": self.ok,
            "records": self.records,
            "first_seq": self.first_seq,
            "checkpoints_checked": self.checkpoints_checked,
            "signatures_checked": self.signatures_checked,
            "consistency_proofs": self.consistency_proofs,
            "first_bad": None
            if fb is None
            else {"seq": fb.seq, "last": fb.last, "kind": fb.kind, "message": fb.message},
            "faults": [
                {"kind": f.kind, "seq": f.seq, "last": f.last, "message": f.message} for f in self.faults
            ],
            "warnings": self.warnings,
        }


@dataclass(frozen=True, slots=True)
class _Anchor:
    """Where the walk starts: genesis, or a checkpoint whose records were pruned."""

    size: int
    head_hash: str
    frontier: tuple[bytes, ...]


def verify_records(
    items: Iterable[Rec | UnreadableRecord],
    *,
    checkpoints: Sequence[SignedCheckpoint] = (),
    saved: Sequence[SignedCheckpoint] = (),
    public_keys: Sequence[Ed25519PublicKey] = (),
    head: tuple[int, str] | None = None,
    start: SignedCheckpoint | None = None,
) -> Report:
    """Verify a stream of records in stored order.

    ``checkpoints`` are the hub's own; ``saved`` are copies kept outside the hub (checked for
    consistency too); ``head`` is the chain tip (seq, hash) when known; ``start`` is the
    checkpoint the log continues from after its oldest records were pruned.
    """
    rep = Report()
    all_cps = [*checkpoints, *saved]
    forged = _check_signatures(rep, all_cps, public_keys)
    # A checkpoint whose signature fails is reported as forged; its root says nothing about the records.
    all_cps = [c for c in all_cps if id(c) not in forged]
    _check_frontiers(rep, all_cps)
    checkpoints = [c for c in checkpoints if id(c) not in forged]
    saved = [c for c in saved if id(c) not in forged]
    anchor = _Anchor(0, GENESIS, ())
    if start is not None:
        if id(start) in forged:
            return rep  # its signature fault is reported; nothing after it can be anchored
        if not start.frontier_ok():
            rep.faults.append(
                Fault(
                    "root_mismatch",
                    start.tree_size + 1,
                    f"the checkpoint at size {start.tree_size} that the log starts from "
                    "has a frontier that does not match its root",
                )
            )
            return rep
        anchor = _Anchor(start.tree_size, start.head_hash, tuple(bytes.fromhex(h) for h in start.frontier))
    rep.first_seq = anchor.size + 1
    acc = merkle.Accumulator(anchor.size, anchor.frontier)
    targets: dict[int, list[SignedCheckpoint]] = {}
    for cp in all_cps:
        if cp.tree_size > anchor.size:
            targets.setdefault(cp.tree_size, []).append(cp)
        elif cp.tree_size < anchor.size:
            rep.warnings.append(f"checkpoint at size {cp.tree_size} covers pruned records; not re-checked")
    leaves: list[bytes] | None = [] if saved and anchor.size == 0 else None
    verified_upto = anchor.size  # the end of the last range a checkpoint vouched for
    prev_hash, expected = anchor.head_hash, anchor.size + 1
    seen: dict[str, int] = {anchor.head_hash: anchor.size}  # a link back to the start counts too
    order: deque[str] = deque()
    chain_ok = True
    for item in items:
        fault = _check_one(item, expected, prev_hash, seen)
        if fault is not None:
            rep.faults.append(fault)
            chain_ok = False
            break
        assert isinstance(item, Rec)
        leaf = merkle.leaf_hash(bytes.fromhex(item.hash))
        acc.append(leaf)
        if leaves is not None:
            leaves.append(leaf)
        seen[item.hash] = item.seq
        order.append(item.hash)
        if len(order) > _LINK_WINDOW:
            seen.pop(order.popleft(), None)
        prev_hash, expected = item.hash, expected + 1
        rep.records += 1
        for cp in targets.pop(acc.size, ()):
            rep.checkpoints_checked += 1
            if cp.root_hash != acc.root().hex() or cp.head_hash != item.hash:
                rep.faults.append(
                    Fault(
                        "root_mismatch",
                        verified_upto + 1,
                        last=cp.tree_size,
                        message=f"records {verified_upto + 1}..{cp.tree_size} do not match the signed "
                        f"checkpoint at size {cp.tree_size} (rewritten history)",
                    )
                )
            elif not any(f.kind == "root_mismatch" for f in rep.faults):
                verified_upto = cp.tree_size
    last = expected - 1
    if chain_ok:
        if head is not None and head[0] != last:
            kind = "truncated" if head[0] > last else "extra"
            rep.faults.append(
                Fault(
                    kind, min(head[0], last) + 1, f"the records end at {last} but the chain head is {head[0]}"
                )
            )
        elif head is not None and head[1] != prev_hash:
            rep.faults.append(Fault("modified", last, "the last record's hash differs from the chain head"))
        if targets:
            size = min(targets)
            rep.faults.append(
                Fault("truncated", last + 1, f"the records end at {last} but a checkpoint covers {size}")
            )
        covered = max([verified_upto, *(c.tree_size for c in all_cps)])
        if last > covered:
            rep.warnings.append(f"records {covered + 1}..{last} are not covered by a checkpoint yet")
    elif targets:
        rep.warnings.append(
            f"{sum(map(len, targets.values()))} checkpoint(s) beyond the first fault not checked"
        )
    if leaves is not None and chain_ok:
        _check_consistency(rep, saved, checkpoints, leaves)
    return rep


def _check_one(
    item: Rec | UnreadableRecord, expected: int, prev_hash: str, seen: dict[str, int]
) -> Fault | None:
    if isinstance(item, UnreadableRecord):
        return Fault("unreadable", expected, f"the record in position {expected} is unreadable: {item}")
    if item.prev_hash != prev_hash:
        earlier = seen.get(item.prev_hash)
        if earlier is not None and earlier < expected - 1:
            return Fault(
                "inserted",
                earlier + 1,
                f"record {expected} links to record {earlier}: records {earlier + 1}..{expected - 1} "
                "were inserted",
            )
        if item.seq != expected:
            return Fault(
                "sequence",
                expected,
                f"expected record {expected}, found seq {item.seq} (deleted, reordered or inserted)",
            )
        return Fault("broken_link", expected, "prev_hash is not the previous record's hash")
    if item.seq != expected:
        return Fault("sequence", expected, f"expected record {expected}, found seq {item.seq}")
    if item.computed_hash() != item.hash:
        return Fault("modified", expected, "the content does not hash to the stored hash")
    return None


def _check_signatures(
    rep: Report, cps: Sequence[SignedCheckpoint], keys: Sequence[Ed25519PublicKey]
) -> set[int]:
    """Check every signature; return the ids of the checkpoints that failed."""
    bad: set[int] = set()
    if not cps:
        return bad
    if not keys:
        rep.warnings.append("checkpoint signatures not checked: no public key given")
        return bad
    by_id = {key_id(k): k for k in keys}
    for cp in cps:
        pub = by_id.get(cp.key_id)
        if pub is None:
            rep.faults.append(
                Fault(
                    "unknown_key",
                    None,
                    f"checkpoint at size {cp.tree_size} is signed by "
                    f"key {cp.key_id}, which is not a given public key",
                )
            )
            bad.add(id(cp))
            continue
        rep.signatures_checked += 1
        if not cp.signature_ok(pub):
            rep.faults.append(
                Fault(
                    "bad_signature", None, f"checkpoint at size {cp.tree_size}: the signature does not verify"
                )
            )
            bad.add(id(cp))
    return bad


def _check_frontiers(rep: Report, cps: Sequence[SignedCheckpoint]) -> None:
    """The frontier is stored beside the signature, not under it, and the next checkpoint is
    built on it: one that does not fold to the signed root would have the hub sign a wrong
    tree over intact records."""
    for cp in cps:
        if cp.frontier and not cp.frontier_ok():
            rep.faults.append(
                Fault(
                    "bad_frontier",
                    None,
                    f"checkpoint at size {cp.tree_size}: the stored frontier does not match the signed root",
                )
            )


def _check_consistency(
    rep: Report, saved: Sequence[SignedCheckpoint], hub: Sequence[SignedCheckpoint], leaves: list[bytes]
) -> None:
    """Each saved checkpoint must be a prefix of the hub's newest checkpoint (or of the
    current log): an RFC 6962 consistency proof, built from the records, verified against
    both signed roots."""
    newest = max(hub, key=lambda c: c.tree_size, default=None)
    for old in saved:
        if old.tree_size > len(leaves) or old.tree_size < 1:
            continue  # already reported as truncated
        if newest is not None and newest.tree_size >= old.tree_size:
            new_size, new_root = newest.tree_size, bytes.fromhex(newest.root_hash)
            if new_size > len(leaves):
                continue
        else:
            new_size, new_root = len(leaves), merkle.root(leaves)
        proof = merkle.consistency_proof(old.tree_size, leaves[:new_size])
        rep.consistency_proofs += 1
        if not merkle.verify_consistency(
            old.tree_size, new_size, bytes.fromhex(old.root_hash), new_root, proof
        ):
            rep.faults.append(
                Fault(
                    "inconsistent",
                    None,
                    f"the saved checkpoint at size {old.tree_size} is not "
                    f"a prefix of the log at size {new_size}",
                )
            )


# --------------------------------------------------------------------------- sources


def verify_database(
    bind: Engine | Connection,
    *,
    saved: Sequence[SignedCheckpoint] = (),
    public_keys: Sequence[Ed25519PublicKey] = (),
) -> Report:
    """Verify the store's audit log and checkpoints (read-only)."""
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return verify_database(conn, saved=saved, public_keys=public_keys)
    conn = bind
    # Read the checkpoints first: a checkpoint is signed only over records whose head row is
    # already committed, so every checkpoint seen here is at or below the head read next, and
    # one beyond the records means they were cut off (even if the head row was moved back too).
    cp_t = AuditCheckpoint.__table__  # type: ignore[attr-defined]
    rows = conn.execute(select(cp_t).order_by(cp_t.c.tree_size)).all()
    cps = [SignedCheckpoint.from_row(AuditCheckpoint.model_validate(r._mapping)) for r in rows]
    # Read the newest seq before the head: an honest append commits both together, so any
    # record beyond the head seen here is an insertion, not a race with a writer.
    newest = conn.execute(select(func.max(col(AuditRecord.seq)))).scalar() or 0
    head_row = conn.execute(
        select(col(AuditHead.seq), col(AuditHead.hash)).where(col(AuditHead.id) == 1)
    ).first()
    head = (head_row[0], head_row[1]) if head_row else (0, GENESIS)
    first = conn.execute(select(func.min(col(AuditRecord.seq)))).scalar()
    start = None
    if first is not None and first > 1:
        start = next((c for c in cps if c.tree_size == first - 1), None)
        if start is None:
            return Report(
                faults=[
                    Fault(
                        "sequence",
                        1,
                        f"records 1..{first - 1} are missing and no checkpoint anchors the rest",
                    )
                ]
            )
    rep = verify_records(
        iter_db(conn, after_seq=(first or 1) - 1, upto_seq=max(head[0], newest)),
        checkpoints=cps,
        saved=saved,
        public_keys=public_keys,
        head=head,
        start=start,
    )
    if first is None and head[0] > 0:
        rep.faults.append(Fault("truncated", 1, f"no records, but the chain head is {head[0]}"))
    return rep


def verify_export(
    path: Path,
    *,
    saved: Sequence[SignedCheckpoint] = (),
    public_keys: Sequence[Ed25519PublicKey] = (),
) -> Report:
    """Verify a JSON Lines export against the checkpoints an auditor holds (``saved``)."""
    items = (item for _, item in read_jsonl(path))
    first: Rec | UnreadableRecord | None = next(items, None)
    if first is None:
        return Report(warnings=["the export holds no records"])
    start = None
    if isinstance(first, Rec) and first.seq > 1:
        start = next((c for c in saved if c.tree_size == first.seq - 1 and c.frontier), None)
        if start is None:
            return Report(
                faults=[
                    Fault(
                        "sequence",
                        1,
                        f"the export starts at record {first.seq} and no "
                        "checkpoint with a frontier anchors it",
                    )
                ]
            )

    def chained() -> Iterable[Rec | UnreadableRecord]:
        assert first is not None
        yield first
        yield from items

    return verify_records(chained(), saved=saved, public_keys=public_keys, start=start)
