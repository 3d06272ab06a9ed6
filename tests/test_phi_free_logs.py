"""PHI never reaches the logs: a known synthetic name, phone, email and MRN go through the
whole pipeline (HL7, FHIR, SMS replies, a message that fails mapping) at DEBUG level, and
none of them appears in any log record, extras included."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

from audit.testing import capture_all_logs
from careloop import config as cfgmod
from careloop.logs import JsonFormatter
from careloop.replay import FeedLine, Replayer, read_feed
from tests.conftest import FIXTURES

NEEDLES = ("Testperson", "5550101", "ana.testperson@example.org", "NW100001", "Fictivo")


def test_pipeline_logs_hold_no_phi() -> None:
    lines = read_feed(FIXTURES / "feeds" / "demo.jsonl")
    # The booking without its SCH segment cannot be mapped: it is dead-lettered, and logged.
    broken = b"\r".join(seg for seg in lines[1].body.split(b"\r") if not seg.startswith(b"SCH"))
    extra = [
        FeedLine(
            lines[1].at + timedelta(seconds=1), "adt", broken.replace(b"NW-SIU-0001", b"NW-SIU-BAD"), {}
        ),
        FeedLine(
            lines[-1].at + timedelta(minutes=5),
            "sms",
            json.dumps(
                {
                    "From": "+15555550101",
                    "To": "+15555550199",
                    "Body": "STOP Testperson here",
                    "MessageSid": "SM00000000000000000000000000000002",
                }
            ).encode(),
            {},
        ),
    ]
    feed = sorted([*lines, *extra], key=lambda f: f.at)
    rp = Replayer(cfgmod.load(FIXTURES / "config" / "example.yaml"), start=feed[0].at)
    with capture_all_logs() as logs:
        logs.setFormatter(JsonFormatter())
        try:
            asyncio.run(rp.feed(feed, horizon=timedelta(days=10)))
        finally:
            rp.close()
    assert any("dead-lettered" in line for line in logs.lines), "the failure path was not exercised"
    logs.assert_free_of(*NEEDLES)
