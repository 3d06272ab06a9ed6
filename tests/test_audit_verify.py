"""Tamper evidence: any modified, deleted, inserted or swapped record is caught and named."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text, update
from sqlalchemy.engine import Connection

from audit import checkpoint
from audit.checkpoint import SignedCheckpoint
from audit.records import Rec, from_json, iter_db, write_jsonl
from audit.testing import seed
from audit.verify import verify_database, verify_export
from careloop import audit_log
from careloop.store import Store
from careloop.tables import AuditCheckpoint

KEY = Ed25519PrivateKey.generate()
PUB = KEY.public_key()
START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
FIELDS = ["actor", "action", "outcome", "entity", "purpose", "detail", "prev_hash", "hash", "at", "person_id"]


@pytest.fixture
def log(store: Store) -> tuple[Store, int, SignedCheckpoint]:
    """A seeded log with a hub checkpoint at 20 and a full-size checkpoint the auditor keeps."""
    sd = seed(store, START)
    with store.session() as s:
        cp_rows = [r for r in iter_db(s.connection(), upto_seq=20)]
        assert len(cp_rows) == 20
    # a checkpoint at 20 (made when the log was that long), then one at the end
    with store.session() as s:
        head = audit_log.head(s)
        saved_seq, saved_hash = head.seq, head.hash
        head.seq, head.hash = 20, cp_rows[-1].hash
        checkpoint.make_checkpoint(s, KEY, at=START)
        head.seq, head.hash = saved_seq, saved_hash
    with store.session() as s:
        cp = checkpoint.make_checkpoint(s, KEY, at=START + timedelta(days=1))
        assert cp is not None and cp.tree_size == sd.total
        full = SignedCheckpoint.from_row(cp)
    return store, sd.total, full


def _flip(s: str, pos: int) -> str:
    pos %= len(s)
    ch = s[pos]
    alt = "0" if ch != "0" else "1"
    if ch.isalpha():
        alt = "x" if ch != "x" else "y"
    return s[:pos] + alt + s[pos + 1 :]


def _flipped(row: dict[str, Any], field: str, pos: int) -> Any:
    v = row[field]
    if field == "at":
        return v + timedelta(microseconds=1 + pos % 999_999)
    if field == "person_id":
        return 1 if v is None else v + 1
    if field == "detail":
        text_ = json.dumps(v, sort_keys=True)
        for shift in range(len(text_)):
            cand = _flip(text_, pos + shift)
            try:
                parsed = json.loads(cand)
            except ValueError:
                continue
            if parsed != v and isinstance(parsed, dict):
                return parsed
        return {**v, "x": 1}
    if v is None:
        return "x"
    return _flip(v, pos)


TAMPER = st.one_of(
    st.tuples(st.just("flip"), st.integers(1, 10_000), st.sampled_from(FIELDS), st.integers(0, 10_000)),
    st.tuples(st.just("delete"), st.integers(1, 10_000)),
    st.tuples(st.just("insert"), st.integers(1, 10_000)),
    st.tuples(st.just("swap"), st.integers(1, 10_000), st.integers(1, 10_000)),
)


def _forged(prev: Rec | None, seq: int, at: datetime) -> Rec:
    prev_hash = prev.hash if prev else audit_log.GENESIS
    r = Rec(
        seq,
        at,
        "intruder",
        "message.receive",
        "success",
        None,
        "raw_message/1",
        None,
        {"kind": "x"},
        prev_hash,
        "",
    )
    return Rec(**{**{f: getattr(r, f) for f in Rec.__slots__}, "hash": r.computed_hash()})


def _tamper_db(conn: Connection, n: int, op: tuple[Any, ...]) -> int:
    """Apply ``op`` with plain SQL, as someone with database access would; return the first bad seq."""
    t = "audit_record"
    rows = {r.seq: r._asdict() for r in conn.execute(text(f"SELECT * FROM {t}")).all()}
    from careloop.tables import AuditRecord

    tbl = AuditRecord.__table__  # type: ignore[attr-defined]
    k: int
    if op[0] == "flip":
        k, field, pos = op[1] % n + 1, op[2], op[3]
        row = {
            c: v for c, v in next(iter(conn.execute(tbl.select().where(tbl.c.seq == k)).mappings())).items()
        }
        conn.execute(update(tbl).where(tbl.c.seq == k).values({field: _flipped(row, field, pos)}))
        return k
    if op[0] == "delete":
        k = op[1] % n + 1
        conn.execute(tbl.delete().where(tbl.c.seq == k))
        return k
    if op[0] == "insert":
        k = op[1] % (n + 1) + 1
        recs = {r.seq: r for r in iter_db(conn)}
        forged = _forged(recs.get(k - 1), k, START)
        # make room: renumber k..n to k+1..n+1 (two steps, so no unique check trips midway)
        conn.execute(update(tbl).where(tbl.c.seq >= k).values(seq=-tbl.c.seq))
        conn.execute(update(tbl).where(tbl.c.seq < 0).values(seq=-tbl.c.seq + 1))
        conn.execute(
            tbl.insert().values(
                seq=forged.seq,
                at=forged.at,
                actor=forged.actor,
                action=forged.action,
                outcome=forged.outcome,
                person_id=None,
                entity=forged.entity,
                purpose=None,
                detail=forged.detail,
                prev_hash=forged.prev_hash,
                hash=forged.hash,
            )
        )
        return k
    i: int
    j: int
    i, j = sorted((op[1] % n + 1, op[2] % n + 1))
    if i == j:
        j = i + 1 if i < n else i - 1
        i, j = sorted((i, j))
    cols = [c for c in rows[i] if c != "seq"]
    full = {r["seq"]: r for r in conn.execute(tbl.select()).mappings()}
    conn.execute(update(tbl).where(tbl.c.seq == i).values({c: full[j][c] for c in cols}))
    conn.execute(update(tbl).where(tbl.c.seq == j).values({c: full[i][c] for c in cols}))
    return i


def test_an_untouched_log_verifies_with_signatures(log: tuple[Store, int, SignedCheckpoint]) -> None:
    store, n, full = log
    rep = verify_database(store.engine, saved=[full], public_keys=[PUB])
    assert rep.ok, rep.faults
    assert rep.records == n
    assert rep.checkpoints_checked == 3  # hub's 20 and n, plus the saved copy of n
    assert rep.signatures_checked == 3
    assert rep.consistency_proofs == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=TAMPER)
def test_any_tampering_in_the_database_is_caught_and_the_first_bad_record_named(
    log: tuple[Store, int, SignedCheckpoint], op: tuple[Any, ...]
) -> None:
    store, n, _ = log
    with store.engine.connect() as conn:
        tx = conn.begin()
        try:
            expected = _tamper_db(conn, n, op)
            rep = verify_database(conn, public_keys=[PUB])
        finally:
            tx.rollback()
    assert not rep.ok
    assert rep.first_bad is not None
    assert rep.first_bad.seq == expected, (op, rep.faults)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=TAMPER)
def test_any_tampering_in_an_export_is_caught_and_the_first_bad_record_named(
    log: tuple[Store, int, SignedCheckpoint], op: tuple[Any, ...], tmp_path: Path
) -> None:
    store, n, full = log
    with store.engine.connect() as conn:
        lines = [r.to_json() for r in iter_db(conn)]
    if op[0] == "flip":
        k, field, pos = op[1] % n + 1, op[2], op[3]
        r = from_json(lines[k - 1])
        row = {f: getattr(r, f) for f in Rec.__slots__}
        row[field] = _flipped(row, field, pos)
        lines[k - 1] = Rec(**row).to_json()
        expected = k
    elif op[0] == "delete":
        expected = op[1] % n + 1
        del lines[expected - 1]
    elif op[0] == "insert":
        expected = (
            op[1] % n + 1
        )  # before an existing record: a forged tail is only caught by a later checkpoint
        prev = from_json(lines[expected - 2]) if expected > 1 else None
        lines.insert(expected - 1, _forged(prev, expected, START).to_json())
    else:
        i, j = sorted((op[1] % n, op[2] % n))
        if i == j:
            j = i + 1 if i < n - 1 else i - 1
            i, j = sorted((i, j))
        lines[i], lines[j] = lines[j], lines[i]
        expected = i + 1
    path = tmp_path / "export.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rep = verify_export(path, saved=[full], public_keys=[PUB])
    assert not rep.ok
    assert rep.first_bad is not None
    assert rep.first_bad.seq == expected, (op, rep.faults)


def test_an_untouched_export_verifies_and_a_flipped_byte_in_the_file_is_unreadable_or_caught(
    log: tuple[Store, int, SignedCheckpoint], tmp_path: Path
) -> None:
    store, n, full = log
    path = tmp_path / "export.jsonl"
    with store.engine.connect() as conn, path.open("w") as fp:
        write_jsonl(iter_db(conn), fp)
    rep = verify_export(path, saved=[full], public_keys=[PUB])
    assert rep.ok, rep.faults
    assert rep.records == n and rep.consistency_proofs == 1
    raw = bytearray(path.read_bytes())
    line3 = raw.index(b"\n", raw.index(b"\n") + 1) + 1  # first byte of record 3
    raw[line3 + 1] ^= 0x01  # inside the JSON syntax of record 3
    path.write_bytes(bytes(raw))
    rep = verify_export(path, saved=[full], public_keys=[PUB])
    assert rep.first_bad is not None and rep.first_bad.seq == 3


def test_rewritten_and_rehashed_history_is_caught_by_the_signed_checkpoints(
    log: tuple[Store, int, SignedCheckpoint],
) -> None:
    store, _n, full = log
    with store.engine.connect() as conn:
        tx = conn.begin()
        recs = list(iter_db(conn))
        # The attacker changes record 5 and re-chains everything after it, as a careful forger would.
        prev = recs[3].hash
        for r in recs[4:]:
            fields = {f: getattr(r, f) for f in Rec.__slots__}
            if r.seq == 5:
                fields["actor"] = "someone-else"
            fields["prev_hash"] = prev
            fields["hash"] = Rec(**fields).computed_hash()
            prev = fields["hash"]
            conn.execute(
                text("UPDATE audit_record SET actor=:actor, prev_hash=:prev_hash, hash=:hash WHERE seq=:seq"),
                {k: fields[k] for k in ("actor", "prev_hash", "hash", "seq")},
            )
        conn.execute(text("UPDATE audit_head SET hash=:h"), {"h": prev})
        rep = verify_database(conn, saved=[full], public_keys=[PUB])
        tx.rollback()
    # the chain itself is consistent again; only the signed roots (hub's and auditor's) expose it
    assert {f.kind for f in rep.faults} == {"root_mismatch"}
    assert rep.first_bad is not None and rep.first_bad.seq == 1  # somewhere in 1..20, the first signed range


def test_a_forged_checkpoint_fails_its_signature(log: tuple[Store, int, SignedCheckpoint]) -> None:
    store, n, _ = log
    other = Ed25519PrivateKey.generate()
    with store.engine.connect() as conn:
        tx = conn.begin()
        cp_t = AuditCheckpoint.__table__  # type: ignore[attr-defined]
        conn.execute(update(cp_t).where(cp_t.c.tree_size == 20).values(root_hash="ab" * 32))
        rep = verify_database(conn, public_keys=[PUB])
        tx.rollback()
    assert [f.kind for f in rep.faults] == ["bad_signature"]
    # a checkpoint signed by a key the auditor does not hold is refused too
    forged = SignedCheckpoint(n, "cd" * 32, "ef" * 32, START, checkpoint.key_id(other.public_key()), "")
    sig = other.sign(forged.message())
    import base64

    forged = SignedCheckpoint(
        **{
            **{f: getattr(forged, f) for f in SignedCheckpoint.__slots__},
            "signature": base64.b64encode(sig).decode(),
        }
    )
    assert forged.signature_ok(other.public_key())
    rep = verify_database(store.engine, saved=[forged], public_keys=[PUB])
    assert [f.kind for f in rep.faults] == ["unknown_key"]


def test_a_saved_checkpoint_from_a_forked_history_is_inconsistent(
    log: tuple[Store, int, SignedCheckpoint],
) -> None:
    store, _n, _full = log
    # What the hub signed for an auditor before someone rewrote record 2 and everything after it.
    with store.session() as s:
        recs = list(iter_db(s.connection()))
    from audit import merkle

    leaves = [merkle.leaf_hash(bytes.fromhex(r.hash)) for r in recs[:10]]
    leaves[1] = merkle.leaf_hash(b"\x00" * 32)
    root = merkle.root(leaves).hex()
    kid = checkpoint.key_id(PUB)
    msg = checkpoint.message(10, root, recs[9].hash, START, kid)
    import base64

    saved = SignedCheckpoint(10, root, recs[9].hash, START, kid, base64.b64encode(KEY.sign(msg)).decode())
    rep = verify_database(store.engine, saved=[saved], public_keys=[PUB])
    kinds = [f.kind for f in rep.faults]
    assert "root_mismatch" in kinds and "inconsistent" in kinds
