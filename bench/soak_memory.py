"""Memory under sustained load: the whole hub (MLLP listener, mapping, orchestrator, outbox,
capture channel, audit) running as ``careloop run`` runs it, fed SIU^S12 messages over four
MLLP connections by a client in another process, with the resident set size sampled as the
messages go through.

Prints RSS after a warm-up and after every further block of messages, the ratio of the last
sample to the first, and the growth per 10,000 messages in the first and second half of the
run: bounded caches and SQLite's page cache fill and level off (the second half grows less),
while state kept per message would grow as fast in both halves.

Run: .venv/bin/python bench/soak_memory.py [--messages 20000] [--blocks 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VT, FS_CR = b"\x0b", b"\x1c\r"


def orchestrator_bench() -> dict[str, Any]:
    """The orchestrator bench's messages (``siu``) and configuration (``CONFIG``): a reminder
    now and one 24 h before the visit."""
    return runpy.run_path(str(ROOT / "bench" / "orchestrator.py"), run_name="soak")


def client_main(port: int, first: int, count: int, conns: int) -> None:
    siu = orchestrator_bench()["siu"]
    start = datetime.now(UTC) + timedelta(days=3)

    async def one(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(first + k, first + count, conns):
            writer.write(VT + siu(i, start) + FS_CR)
            ack = await reader.readuntil(FS_CR)
            if b"MSA|AA|" not in ack:
                raise SystemExit("not AA")
        writer.close()

    async def all_() -> None:
        await asyncio.gather(*(one(k) for k in range(conns)))

    asyncio.run(all_())
    print(json.dumps({"sent": count}))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20000, help="messages after the warm-up")
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2000)
    args = ap.parse_args()

    import gc

    from sqlmodel import Session, func, select

    from careloop.clock import SystemClock
    from careloop.config import AppConfig
    from careloop.db import make_engine
    from careloop.hub import Hub
    from careloop.store import Store
    from careloop.tables import JourneyEvent, OutboxItem

    bench = orchestrator_bench()
    port = free_port()
    config: dict[str, Any] = json.loads(json.dumps(bench["CONFIG"]))
    config["connectors"]["adt"]["port"] = port

    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{tmp}/soak.db")
        hub = Hub(AppConfig.model_validate(config), store=Store(engine, SystemClock()), capture=True)

        def settled(total: int) -> None:
            # Every message decided and delivered: the pipeline holds nothing back.
            for _ in range(6000):
                with Session(engine) as s:
                    processed = JourneyEvent.status == "processed"
                    captured = OutboxItem.status == "captured"
                    done = s.exec(select(func.count()).select_from(JourneyEvent).where(processed)).one()
                    sent = s.exec(select(func.count()).select_from(OutboxItem).where(captured)).one()
                if done >= total and sent >= total:
                    return
                time.sleep(0.1)
            raise SystemExit(f"pipeline did not settle: {done}/{total} events, {sent} sent")

        def feed(first: int, count: int) -> None:
            subprocess.run(
                [sys.executable, __file__, "--client", str(port), str(first), str(count), "4"],
                check=True,
                capture_output=True,
                timeout=3600,
            )

        def forget_captured() -> None:
            # The capture channel keeps every message it "sent" (replay reports read them);
            # a real channel keeps nothing. Everything here is delivered and settled.
            for channel in hub.channels.values():
                getattr(channel, "captured", {}).clear()

        samples: list[tuple[int, float]] = []
        block = args.messages // args.blocks

        async def run() -> None:
            await hub.start()
            try:
                sent = 0
                await asyncio.to_thread(feed, 0, args.warmup)
                sent += args.warmup
                await asyncio.to_thread(settled, sent)
                forget_captured()
                gc.collect()
                samples.append((sent, rss_mib()))
                for _ in range(args.blocks):
                    await asyncio.to_thread(feed, sent, block)
                    sent += block
                    await asyncio.to_thread(settled, sent)
                    forget_captured()
                    gc.collect()
                    samples.append((sent, rss_mib()))
            finally:
                await hub.stop()

        t0 = time.perf_counter()
        asyncio.run(run())
        elapsed = time.perf_counter() - t0
        engine.dispose()

    print(
        f"soak: {samples[-1][0]} SIU^S12 over 4 MLLP connections through the whole hub "
        f"(map, orchestrate, deliver, audit) in {elapsed:.0f} s"
    )
    print(f"{'messages':>10} {'RSS MiB':>9}")
    for n, mib in samples:
        print(f"{n:>10} {mib:9.1f}")

    def slope(a: tuple[int, float], b: tuple[int, float]) -> float:
        return (b[1] - a[1]) / max(1, b[0] - a[0]) * 10_000

    first, mid, last = samples[0], samples[len(samples) // 2], samples[-1]
    print(
        f"RSS last / after warm-up: {last[1] / first[1]:.3f}; growth per 10,000 messages: "
        f"{slope(first, mid):+.1f} MiB in the first half, {slope(mid, last):+.1f} MiB in the second "
        "(caches and SQLite's page cache fill, then level off; state kept per message would grow "
        "at the same rate in both halves)"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
