"""The crash test's worker process: the deliver stage over a SQLite file, sending SMS to a
local Twilio-compatible server until the outbox is empty (or until it is killed).

Usage: python tests/outbox_crash_worker.py DB_URL BASE_URL (run|recover) [resend_if_absent]
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import timedelta

from careloop.clock import SystemClock
from careloop.db import make_engine
from careloop.store import Store
from channels.outbox import DeliverStage
from channels.twilio_loopback import ACCOUNT_SID, AUTH_TOKEN
from channels.twilio_sms import TwilioSmsChannel, TwilioSmsConfig


async def main(db_url: str, base_url: str, mode: str, resend_if_absent: bool) -> None:
    store = Store(make_engine(db_url), SystemClock())
    cfg = TwilioSmsConfig(
        plugin="twilio_sms",
        base_url=base_url,
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        from_number="+15550109999",
        status_callback_url="http://127.0.0.1:8080/channels/sms",
        resend_if_absent=resend_if_absent,
    )
    channel = TwilioSmsChannel("sms", cfg)
    stage = DeliverStage(store, {"sms": channel}, batch=100, sending_lease=timedelta(minutes=5))
    if mode == "recover":
        report = await stage.recover(stale_after=timedelta(0))
        print(
            json.dumps({k: v for k, v in vars(report).items() if k != "keys"} | {"keys": report.keys}),
            flush=True,
        )
    while await stage.run_once():
        pass
    await channel.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], len(sys.argv) > 4 and sys.argv[4] == "resend"))
