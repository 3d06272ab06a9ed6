"""Deliver-stage throughput: N SMS outbox rows on a SQLite file, sent (a) to the capture
channel (the baseline: the stage's own cost) and (b) through twilio_sms to the loopback
Twilio-compatible server over real HTTP. Prints items/s and the ratio; asserts nothing.

    .venv/bin/python bench/channels_outbox.py [N]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from careloop.clock import SystemClock
from careloop.db import make_engine, upgrade
from careloop.store import Store
from channels.base import ChannelConfig
from channels.capture import CaptureChannel
from channels.outbox import DeliverStage
from channels.testing import seed_sms_outbox
from channels.twilio_loopback import ACCOUNT_SID, AUTH_TOKEN, TwilioLoopback
from channels.twilio_sms import TwilioSmsChannel, TwilioSmsConfig


def seed(folder: Path, n: int) -> Store:
    engine = make_engine(f"sqlite:///{folder}/bench.db")
    upgrade(engine)
    seed_sms_outbox(engine, [f"bench-{i}" for i in range(n)])
    return Store(engine, SystemClock())


async def drain(stage: DeliverStage, channel: Any) -> float:
    t0 = time.perf_counter()
    while await stage.run_once():
        pass
    elapsed = time.perf_counter() - t0
    await channel.aclose()
    return elapsed


def main(n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="careloop-bench-") as d:
        (Path(d) / "capture").mkdir()
        store = seed(Path(d) / "capture", n)
        capture = CaptureChannel("sms", ChannelConfig(plugin="capture"))
        base = asyncio.run(drain(DeliverStage(store, {"sms": capture}), capture))
        store.engine.dispose()

        (Path(d) / "twilio").mkdir()
        store = seed(Path(d) / "twilio", n)
        server = TwilioLoopback()
        url = server.start()
        sms = TwilioSmsChannel(
            "sms",
            TwilioSmsConfig(
                plugin="twilio_sms",
                base_url=url,
                account_sid=ACCOUNT_SID,
                auth_token=AUTH_TOKEN,
                from_number="+15550109999",
            ),
        )
        real = asyncio.run(drain(DeliverStage(store, {"sms": sms}), sms))
        server.stop()
        store.engine.dispose()
        assert len(server.messages) == n
    print(f"deliver stage, {n} SMS, SQLite file (synchronous=FULL):")
    print(f"  capture channel (baseline): {n / base:8.1f} items/s  ({base:.2f} s)")
    print(f"  twilio_sms -> loopback HTTP: {n / real:8.1f} items/s  ({real:.2f} s)")
    print(f"  ratio twilio/baseline: {real / base:.2f}x the time")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
