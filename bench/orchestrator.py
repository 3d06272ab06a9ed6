"""Pipeline throughput: raw HL7 messages already stored -> mapping -> orchestrator ->
outbox -> (capture) channel, with audit records, on SQLite.

Prints events/s (with the heap settled as ``careloop run`` settles it at start, and
before that) and p50/p99 decision latency, and the ratio against a baseline measured in
the same run: inserting the same number of rows into a bare SQLite table, one transaction
per batch (what the pipeline would cost if it did nothing but write).

    .venv/bin/python bench/orchestrator.py [--messages 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlmodel import Session, col, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from careloop.clock import SystemClock, utc  # noqa: E402
from careloop.config import AppConfig  # noqa: E402
from careloop.db import make_engine  # noqa: E402
from careloop.hub import Hub  # noqa: E402
from careloop.runtime import settle_heap  # noqa: E402
from careloop.store import Store  # noqa: E402
from careloop.tables import Decision, JourneyEvent, OutboxItem, RawMessage  # noqa: E402

CONFIG = {
    "site": {"timezone": "UTC", "quiet_hours": "00:00-24:00", "channels": ["out"]},
    "compliance": {"frequency_caps": {}},
    "connectors": {"adt": {"plugin": "hl7v2_mllp", "port": 2599}},
    "channels": {"out": {"plugin": "capture"}},
    "templates": {
        "appointment-reminder": {"phi_class": "none", "text": {"en": "Visit {{ appointment.start }}"}}
    },
    "playbooks": {
        "appointment-reminders": {
            "on": ["appointment.booked"],
            "cancel_on": ["appointment.cancelled"],
            "steps": [
                {"send": "appointment-reminder"},
                {"send": "appointment-reminder", "at": "appointment.start - 24h"},
            ],
        }
    },
}


def siu(i: int, start: datetime) -> bytes:
    ts = start.strftime("%Y%m%d%H%M%S+0000")
    return (
        f"MSH|^~\\&|BENCH|HOSP|CARELOOP|CARELOOP|20260101000000+0000||SIU^S12^SIU_S12|B{i:07d}|P|2.5.1\r"
        f"SCH|A{i}^BENCH|A{i}F^BENCH|||||FOLLOWUP^Follow-up^HL70276||30|min|^^30^{ts}||||||||||||||Booked\r"
        f"TQ1|1||||||{ts}\r"
        f"PID|1||M{i:07d}^^^HOSP^MR||Bench^Pat{i}||19800101|F|||1 Main St^^Boston^MA^02101^USA"
        f"||^PRN^PH^^1^617^555{i % 10000:04d}\r"
        f"AIS|1|A|99213^Visit^C4|{ts}\r"
    ).encode()


def pipeline_run(n: int, tmp: Path, name: str = "pipe") -> tuple[float, list[float]]:
    engine = make_engine(f"sqlite:///{tmp}/{name}.db")
    hub = Hub(AppConfig.model_validate(CONFIG), store=Store(engine, SystemClock()), capture=True)
    conn = hub.connectors["adt"]
    start = datetime.now(UTC) + timedelta(days=3)
    items = [it for i in range(n) for it in conn.accept(siu(i, start), {})]
    for k in range(0, len(items), 500):
        hub.sink.put_sync(items[k : k + 500])
    t0 = time.perf_counter()
    asyncio.run(hub.drain())
    elapsed = time.perf_counter() - t0
    with Session(engine) as s:
        events = s.exec(select(JourneyEvent).where(JourneyEvent.status == "processed")).all()
        assert len(events) == n, f"expected {n} processed events, got {len(events)}"
        sent = s.exec(select(OutboxItem).where(OutboxItem.status == "captured")).all()
        assert len(sent) == n, f"expected {n} captured deliveries, got {len(sent)}"
    return elapsed, []


def latency_run(n: int, rate: float, tmp: Path) -> list[float]:
    """Paced arrivals with the stage workers running: decided_at - received_at per event."""
    engine = make_engine(f"sqlite:///{tmp}/lat.db")
    hub = Hub(AppConfig.model_validate(CONFIG), store=Store(engine, SystemClock()), capture=True)
    conn = hub.connectors["adt"]
    start = datetime.now(UTC) + timedelta(days=3)

    async def main() -> None:
        await hub.start()
        for i in range(n):
            await hub.sink.put(conn.accept(siu(100_000 + i, start), {}))
            await asyncio.sleep(1 / rate)
        for _ in range(600):
            with Session(engine) as s:
                left = s.exec(select(JourneyEvent).where(JourneyEvent.status == "pending")).first()
                raw_left = s.exec(select(RawMessage).where(RawMessage.status == "pending")).first()
            if left is None and raw_left is None:
                break
            await asyncio.sleep(0.1)
        await hub.stop()

    asyncio.run(main())
    out = []
    with Session(engine) as s:
        q = (
            select(RawMessage.received_at, Decision.decided_at)
            .join(JourneyEvent, col(JourneyEvent.raw_message_id) == col(RawMessage.id))
            .join(Decision, col(Decision.event_id) == col(JourneyEvent.id))
            .where(Decision.action == "send")
        )
        for received, decided in s.exec(q).all():
            out.append((utc(decided) - utc(received)).total_seconds() * 1000)
    return out


def baseline(n: int, tmp: Path) -> float:
    db = sqlite3.connect(tmp / "base.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT, body BLOB)")
    t0 = time.perf_counter()
    # The pipeline writes ~10 rows per event (event, state, decisions, outbox, receipt, audit x4).
    for k in range(0, n, 200):
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO t (k, body) VALUES (?, ?)",
            [(f"k{j}", b"x" * 200) for j in range(k * 10, min(n, k + 200) * 10)],
        )
        db.execute("COMMIT")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--latency-messages", type=int, default=300)
    ap.add_argument(
        "--rate",
        type=float,
        default=None,
        help="arrivals/s for the latency run (default: half the throughput just measured, so the "
        "latency is that of a hub keeping up, not of a growing queue)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base = baseline(args.messages, tmp)
        # A warm-up (imports, compiled SQL, templates: a running hub has them), then the
        # pipeline with CPython's default collector settings, then with the heap settled as
        # ``careloop run`` settles it once started (careloop.runtime.settle_heap): the last
        # figure is the service's, the one before shows what the collector costs.
        pipeline_run(200, tmp, "warmup")
        unsettled, _ = pipeline_run(args.messages, tmp, "unsettled")
        settle_heap()
        elapsed, _ = pipeline_run(args.messages, tmp)
        eps = args.messages / elapsed
        args.rate = args.rate or max(1.0, round(eps / 2))
        lat = latency_run(args.latency_messages, args.rate, tmp)
    base_eps = args.messages / base
    print(
        f"pipeline: {args.messages} SIU^S12 -> {args.messages} events, decisions, deliveries "
        f"in {elapsed:.2f} s "
        f"= {eps:,.0f} events/s (target >= 1,000)"
    )
    fresh = args.messages / unsettled
    print(f"  (before careloop.runtime.settle_heap, default collector settings: {fresh:,.0f} events/s)")
    print(
        f"baseline: bare SQLite inserts of 10 rows/event: {base_eps:,.0f} events/s; pipeline/baseline = "
        f"{eps / base_eps:.3f}"
    )
    if lat:
        lat.sort()
        p50 = statistics.median(lat)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        print(
            f"decision latency at {args.rate:.0f} arrivals/s ({len(lat)} events, stage workers running): "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        )


if __name__ == "__main__":
    main()
