"""Through replay, with the real SMS connector and channels of issue 5: STOP arriving
through the ``sms`` connector suppresses the very next scheduled SMS."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from careloop import config as cfgmod
from careloop import wiring
from careloop.replay import Replayer, build_report, read_feed
from tests.conftest import FIXTURES
from tests.kernel_plugins import register

register()
CONFIG = FIXTURES / "config" / "channels-test.yaml"
PHONE = "+15555550101"
APPT = {"id": "a1", "start": "2026-03-10T15:00:00+00:00", "end": "2026-03-10T15:30:00+00:00"}


def feed_line(at: str, connector: str, body: dict[str, Any]) -> str:
    return json.dumps({"at": at, "connector": connector, "body": body})


def run_feed(tmp_path: Path, engine: Engine, lines: list[str]) -> dict[str, Any]:
    feed = tmp_path / "feed.jsonl"
    feed.write_text("\n".join(lines) + "\n")
    parsed = read_feed(feed)
    rp = Replayer(cfgmod.load(CONFIG), start=parsed[0].at, engine=engine)
    try:
        asyncio.run(rp.feed(parsed))
        return build_report(rp.store)
    finally:
        rp.close()


def booking(at: str) -> str:
    return feed_line(
        at,
        "feed",
        {
            "at": at,
            "id": "m1",
            "type": "appointment.booked",
            "mrn": "MRN001",
            "phone": PHONE,
            "appointment": APPT,
        },
    )


def sms(at: str, text: str, sid: str) -> str:
    return feed_line(at, "sms", {"From": PHONE, "To": "+15550109999", "Body": text, "MessageSid": sid})


def test_the_example_channel_config_checks(tmp_path: Path) -> None:
    wiring.check(cfgmod.load(CONFIG))


def test_stop_through_the_sms_connector_suppresses_the_next_scheduled_sms(
    tmp_path: Path, engine: Engine
) -> None:
    rep = run_feed(
        tmp_path,
        engine,
        [
            booking("2026-03-01T14:00:00+00:00"),
            sms("2026-03-08T12:00:00+00:00", "STOP", "SM" + "a" * 32),
        ],
    )
    assert [(d["template"], d["at"]) for d in rep["deliveries"]] == [
        ("appointment-reminder", "2026-03-07T15:00:00+00:00")
    ]
    later = [s for s in rep["suppressed"] if s["at"] >= "2026-03-08"]
    assert later and later[0]["template"] == "appointment-reminder"
    assert {"consent.revoked", "message.inbound"} <= {e["type"] for e in rep["events"]}


def test_without_stop_both_reminders_go_out(tmp_path: Path, engine: Engine) -> None:
    rep = run_feed(tmp_path, engine, [booking("2026-03-01T14:00:00+00:00")])
    assert [d["at"] for d in rep["deliveries"]] == ["2026-03-07T15:00:00+00:00", "2026-03-09T15:00:00+00:00"]


def test_start_after_stop_opts_back_in(tmp_path: Path, engine: Engine) -> None:
    rep = run_feed(
        tmp_path,
        engine,
        [
            booking("2026-03-01T14:00:00+00:00"),
            sms("2026-03-06T12:00:00+00:00", "STOP", "SM" + "c" * 32),
            sms("2026-03-08T12:00:00+00:00", "START", "SM" + "d" * 32),
        ],
    )
    assert [d["at"] for d in rep["deliveries"]] == ["2026-03-09T15:00:00+00:00"]


def test_an_sms_template_too_long_for_the_channel_fails_config_check(tmp_path: Path) -> None:
    import pytest

    from careloop.errors import ConfigError

    text = CONFIG.read_text()
    long_es = "Recordatorio de su cita ✓ " + "x" * 300
    assert "    sms: {en: " in text
    path = tmp_path / "long.yaml"
    path.write_text(text.replace("    sms: {en: ", f'    sms: {{es: "{long_es}", en: ', 1))
    with pytest.raises(ConfigError) as err:
        wiring.check(cfgmod.load(path))
    [problem] = [p for p in err.value.problems if "segments" in p]
    assert problem.startswith("templates.appointment-reminder: sms.es is 5 SMS segments (UCS-2")
    assert "(channel sms)" in problem and "Recordatorio" not in problem
