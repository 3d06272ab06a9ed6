"""Audit trail speed on SQLite: append cost per record (against a plain insert of the same
row without the chain, in the same run) and verification speed in records per second.

    .venv/bin/python bench/audit_bench.py [--records 100000] [--batch 100]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.engine import Engine
from sqlmodel import Session

from audit import checkpoint
from audit.records import iter_db, write_jsonl
from audit.verify import verify_database, verify_export
from careloop import audit_log
from careloop.db import make_engine, upgrade

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


def _fields(i: int) -> dict[str, object]:
    return {
        "at": T0 + timedelta(milliseconds=i),
        "actor": "connector:adt",
        "action": "message.receive",
        "outcome": "success",
        "person_id": i % 977 or None,
        "entity": f"raw_message/{i}",
        "purpose": None,
        "detail": {"kind": "hl7v2:SIU^S12", "control_id": f"CTL{i:08d}", "bytes": 812},
    }


def _engine(folder: Path, name: str) -> Engine:
    eng = make_engine(f"sqlite:///{folder}/{name}.db")
    upgrade(eng)
    return eng


def bench_append(folder: Path, n: int, batch: int) -> tuple[float, float]:
    """(chained µs/record, plain µs/record), ``batch`` records per transaction. The two run
    interleaved, one transaction each in turn, so both see the same machine load."""
    from careloop.tables import AuditRecord

    chained, plain = _engine(folder, "chained"), _engine(folder, "plain")
    t_chained = t_plain = 0.0
    for start in range(0, n, batch):
        rows = range(start, min(n, start + batch))
        t = time.perf_counter()
        with Session(chained) as s:
            for i in rows:
                audit_log.append(s, **_fields(i))  # type: ignore[arg-type]
            s.commit()
        t_chained += time.perf_counter() - t
        t = time.perf_counter()
        with Session(plain) as s:
            for i in rows:
                s.add(AuditRecord(seq=i + 1, prev_hash="0" * 64, hash="0" * 64, **_fields(i)))  # type: ignore[arg-type]
            s.commit()
        t_plain += time.perf_counter() - t
    plain.dispose()
    chained.dispose()
    return t_chained / n * 1e6, t_plain / n * 1e6


def bench_scan(eng: Engine) -> float:
    """Baseline for verify: records/s to read the same rows into records, hashing nothing."""
    t = time.perf_counter()
    with eng.connect() as conn:
        n = sum(1 for _ in iter_db(conn))
    return n / (time.perf_counter() - t)


def main() -> None:
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=100, help="records per transaction")
    ap.add_argument("--single", type=int, default=2_000, help="records for the one-per-transaction run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        c, p = bench_append(folder, args.records, args.batch)
        print(
            f"audit append ({args.records} records, {args.batch}/transaction): {c:.1f} us/record; "
            f"plain insert {p:.1f} us/record; ratio {c / p:.2f}x"
        )
        single = folder / "single"
        single.mkdir()
        c1, p1 = bench_append(single, args.single, 1)
        print(
            f"audit append ({args.single} records, 1/transaction, fsync each): {c1:.1f} us/record; "
            f"plain insert {p1:.1f} us/record; ratio {c1 / p1:.2f}x"
        )
        eng = make_engine(f"sqlite:///{folder}/chained.db")
        key = Ed25519PrivateKey.generate()
        t = time.perf_counter()
        with Session(eng, expire_on_commit=False) as s:
            cp = checkpoint.make_checkpoint(s, key, at=T0)
            s.commit()
        assert cp is not None
        print(f"checkpoint over {cp.tree_size} records (verify+Merkle+sign): {time.perf_counter() - t:.2f} s")
        scan = bench_scan(eng)
        t = time.perf_counter()
        rep = verify_database(eng, public_keys=[key.public_key()])
        dt = time.perf_counter() - t
        assert rep.ok and rep.records == args.records, rep.faults
        print(
            f"verify database: {rep.records} records in {dt:.2f} s = {rep.records / dt:,.0f} records/s "
            f"(plain read of the rows: {scan:,.0f} records/s; verify/read {scan * dt / rep.records:.2f}x)"
        )
        export = folder / "export.jsonl"
        with eng.connect() as conn, export.open("w") as fp:
            write_jsonl(iter_db(conn), fp)
        saved = [checkpoint.SignedCheckpoint.from_row(cp)]
        t = time.perf_counter()
        rep = verify_export(export, saved=saved, public_keys=[key.public_key()])
        dt = time.perf_counter() - t
        assert rep.ok and rep.records == args.records, rep.faults
        print(
            f"verify export (+ consistency proof): {rep.records} records in {dt:.2f} s = "
            f"{rep.records / dt:,.0f} records/s"
        )
        eng.dispose()


if __name__ == "__main__":
    main()
