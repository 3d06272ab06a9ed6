"""End-to-end kernel behaviour through replay, with the small JSON test plugins."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from careloop import config as cfgmod
from careloop.replay import Replayer, build_report, read_feed
from tests.conftest import FIXTURES
from tests.kernel_plugins import register

register()
CONFIG = FIXTURES / "config" / "kernel-test.yaml"


def line(at: str, **body: Any) -> str:
    return json.dumps({"at": at, "connector": "feed", "body": {"at": at, **body}})


@pytest.fixture(autouse=True)
def _engine(engine: Engine) -> None:
    global ENGINE
    ENGINE = engine


ENGINE: Engine | None = None


def run_feed(
    tmp_path: Path, lines: list[str], config: Path = CONFIG, engine: Engine | None = None
) -> dict[str, Any]:
    """Replay ``lines`` on the test's engine (SQLite, and PostgreSQL when configured)."""
    feed = tmp_path / "feed.jsonl"
    feed.write_text("\n".join(lines) + "\n")
    parsed = read_feed(feed)
    rp = Replayer(cfgmod.load(config), start=parsed[0].at, engine=engine or ENGINE)
    try:
        asyncio.run(rp.feed(parsed))
        return build_report(rp.store)
    finally:
        rp.close()


APPT = {"id": "a1", "start": "2026-03-10T15:00:00+00:00", "end": "2026-03-10T15:30:00+00:00"}
WHO = {"mrn": "MRN001", "phone": "+15555550101"}


def test_silent_booking_gets_both_reminders(tmp_path: Path) -> None:
    rep = run_feed(
        tmp_path,
        [line("2026-03-01T14:00:00+00:00", id="m1", type="appointment.booked", appointment=APPT, **WHO)],
    )
    sent = [(d["template"], d["at"]) for d in rep["deliveries"]]
    assert sent == [
        ("appointment-reminder", "2026-03-07T15:00:00+00:00"),
        ("appointment-reminder", "2026-03-09T15:00:00+00:00"),
    ]
    assert rep["people"] == {"1": ["urn:test:mrn|MRN001", "phone|+15555550101"]}


def test_confirmation_gets_prep_instead_of_second_reminder(tmp_path: Path) -> None:
    rep = run_feed(
        tmp_path,
        [
            line("2026-03-01T14:00:00+00:00", id="m1", type="appointment.booked", appointment=APPT, **WHO),
            line("2026-03-08T16:00:00+00:00", id="m2", type="appointment.confirmed", appointment=APPT, **WHO),
        ],
    )
    assert [d["template"] for d in rep["deliveries"]] == ["appointment-reminder", "appointment-prep"]
    # The prep SMS would break the 1-a-day SMS cap? No: the reminder went 25 h earlier.
    reasons = {(s["template"], s["reason"]) for s in rep["suppressed"]}
    assert ("appointment-reminder", "appointment-confirmed") in reasons


def test_cancellation_seconds_before_send_stops_reminder(tmp_path: Path) -> None:
    rep = run_feed(
        tmp_path,
        [
            line("2026-03-01T14:00:00+00:00", id="m1", type="appointment.booked", appointment=APPT, **WHO),
            line(
                "2026-03-07T14:59:58+00:00",
                id="m2",
                type="appointment.cancelled",
                appointment={**APPT, "status": "cancelled"},
                **WHO,
            ),
        ],
    )
    assert rep["deliveries"] == []
    assert {s["reason"] for s in rep["suppressed"]} == {"appointment-cancelled"}


def test_quiet_hours_defer_to_local_morning(tmp_path: Path) -> None:
    # Booked at 02:00 New York time for an appointment 40 h later: the 72 h reminder is
    # due at once but deferred to 08:00 local (13:00 UTC).
    appt = {"id": "a2", "start": "2026-03-03T22:00:00+00:00"}
    rep = run_feed(
        tmp_path,
        [line("2026-03-02T07:00:00+00:00", id="m1", type="appointment.booked", appointment=appt, **WHO)],
    )
    assert rep["deferred"][0]["until"] == "2026-03-02T13:00:00+00:00"
    assert rep["deliveries"][0]["at"] == "2026-03-02T13:00:00+00:00"


def test_bad_message_is_dead_lettered_and_next_still_flows(tmp_path: Path) -> None:
    rep = run_feed(
        tmp_path,
        [
            line("2026-03-01T14:00:00+00:00", id="m0", type="boom", **WHO),
            line("2026-03-01T14:00:01+00:00", id="m1", type="appointment.booked", appointment=APPT, **WHO),
        ],
    )
    assert len(rep["deliveries"]) == 2


def test_replaying_same_feed_twice_gives_same_report(tmp_path: Path) -> None:
    lines = [
        line("2026-03-01T14:00:00+00:00", id="m1", type="appointment.booked", appointment=APPT, **WHO),
        line(
            "2026-03-01T15:00:00+00:00",
            id="m2",
            type="appointment.booked",
            appointment={**APPT, "id": "b1"},
            mrn="MRN002",
            phone="+15555550102",
        ),
        line("2026-03-08T16:00:00+00:00", id="m3", type="appointment.confirmed", appointment=APPT, **WHO),
    ]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    from careloop.db import make_engine, upgrade

    other = make_engine(f"sqlite:///{tmp_path}/b/other.db")
    upgrade(other)
    assert run_feed(tmp_path / "a", lines) == run_feed(tmp_path / "b", lines, engine=other)


def test_refund_suppresses_offer_for_that_product_only(tmp_path: Path) -> None:
    rep = run_feed(
        tmp_path,
        [
            line(  # offers are marketing: they go only with an opt-in on record
                "2026-03-01T13:00:00+00:00",
                id="c0",
                type="consent.granted",
                attributes={"channel": "sms", "purpose": "marketing"},
                **WHO,
            ),
            line(
                "2026-03-01T14:00:00+00:00",
                id="c1",
                type="crm.refund.initiated",
                attributes={"product": "p-1"},
                **WHO,
            ),
            line(
                "2026-03-02T14:00:00+00:00",
                id="c2",
                type="crm.offer.eligible",
                attributes={"product": "p-1"},
                **WHO,
            ),
            line(
                "2026-03-05T14:00:00+00:00",
                id="c3",
                type="crm.offer.eligible",
                attributes={"product": "p-2"},
                **WHO,
            ),
        ],
    )
    assert [(d["template"]) for d in rep["deliveries"]] == ["discount-offer"]
    assert [s["reason"] for s in rep["suppressed"]] == ["refund-in-progress"]


def test_discharge_survey_waits_for_instructions_and_48h(tmp_path: Path) -> None:
    enc = {"id": "e1", "period": {"start": "2026-03-01T10:00:00+00:00", "end": "2026-03-03T15:00:00+00:00"}}
    rep = run_feed(
        tmp_path,
        [
            line("2026-03-01T10:00:00+00:00", id="x1", type="encounter.admitted", encounter=enc, **WHO),
            line("2026-03-03T15:00:00+00:00", id="x2", type="encounter.discharged", encounter=enc, **WHO),
            line(
                "2026-03-04T12:00:00+00:00",
                id="x3",
                type="discharge_instructions.delivered",
                attributes={"encounter": "Encounter/e1"},
                **WHO,
            ),
        ],
    )
    assert [(d["template"], d["at"]) for d in rep["deliveries"]] == [
        ("discharge-survey", "2026-03-05T15:00:00+00:00")
    ]
    assert rep["escalations"] == []


def test_undelivered_instructions_escalate_and_no_survey(tmp_path: Path) -> None:
    enc = {"id": "e1", "period": {"start": "2026-03-01T10:00:00+00:00", "end": "2026-03-03T15:00:00+00:00"}}
    rep = run_feed(
        tmp_path,
        [
            line("2026-03-03T15:00:00+00:00", id="x2", type="encounter.discharged", encounter=enc, **WHO),
        ],
    )
    assert rep["deliveries"] == []
    assert [(e["reason"], e["severity"]) for e in rep["escalations"]] == [
        ("discharge-instructions-not-delivered", "routine")
    ]


def test_sms_daily_cap_falls_back_to_email(tmp_path: Path) -> None:
    who = {**WHO, "email": "pat@example.test"}
    rep = run_feed(
        tmp_path,
        [
            line("2026-03-01T14:00:00+00:00", id="m1", type="appointment.booked", appointment=APPT, **who),
            line(
                "2026-03-07T16:00:00+00:00",
                id="m2",
                type="appointment.booked",
                appointment={**APPT, "id": "a9", "start": "2026-03-09T18:00:00+00:00"},
                **who,
            ),
        ],
    )
    channels = Counter((d["channel"], d["at"][:10]) for d in rep["deliveries"])
    assert all(n == 1 for (ch, _), n in channels.items() if ch == "sms")
    assert any(ch == "email" for ch, _ in channels)


@pytest.mark.parametrize(
    "field,bad,msg",
    [
        ("site.timezone", "Mars/Base", "site.timezone: is not a known IANA time zone"),
    ],
)
def test_config_errors_name_the_field(tmp_path: Path, field: str, bad: str, msg: str) -> None:
    from careloop.errors import ConfigError

    p = tmp_path / "c.yaml"
    p.write_text(f"site: {{timezone: {bad}}}\n")
    with pytest.raises(ConfigError) as exc:
        cfgmod.load(p)
    assert msg in exc.value.problems


def test_deceased_patient_gets_nothing(tmp_path: Path) -> None:
    rep = run_feed(
        tmp_path,
        [
            line("2026-03-01T14:00:00+00:00", id="m1", type="appointment.booked", appointment=APPT, **WHO),
            line(
                "2026-03-02T14:00:00+00:00",
                id="m2",
                type="patient.updated",
                patient={"deceasedDateTime": "2026-03-02T10:00:00+00:00"},
                **WHO,
            ),
        ],
    )
    assert rep["deliveries"] == []
    assert {s["reason"] for s in rep["suppressed"]} == {"deceased"}


def test_shadow_playbook_decides_and_explains_but_sends_nothing(tmp_path: Path) -> None:
    cfg = cfgmod.load_raw(CONFIG)
    cfg["playbooks"]["appointment-reminders"]["shadow"] = True
    path = tmp_path / "shadow.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    rep = run_feed(
        tmp_path,
        [line("2026-03-01T14:00:00+00:00", id="m1", type="appointment.booked", appointment=APPT, **WHO)],
        config=path,
    )
    assert rep["deliveries"] == []
    assert [s["reason"] for s in rep["suppressed"]] == ["shadow-allowed", "shadow-allowed"]


def test_clinical_detail_never_goes_by_sms(tmp_path: Path) -> None:
    cfg = cfgmod.load_raw(CONFIG)
    cfg["templates"]["appointment-reminder"]["phi_class"] = "limited"
    path = tmp_path / "phi.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    rep = run_feed(
        tmp_path,
        [
            line(
                "2026-03-01T14:00:00+00:00",
                id="m1",
                type="appointment.booked",
                appointment=APPT,
                email="pat@example.test",
                **WHO,
            )
        ],
        config=path,
    )
    assert {d["channel"] for d in rep["deliveries"]} == {"email"}
    from careloop.db import make_engine, upgrade

    fresh = make_engine(f"sqlite:///{tmp_path}/fresh.db")  # a person with no email address
    upgrade(fresh)
    rep = run_feed(
        tmp_path,
        [line("2026-03-01T14:00:00+00:00", id="m1", type="appointment.booked", appointment=APPT, **WHO)],
        config=path,
        engine=fresh,
    )
    assert rep["deliveries"] == [] and {s["reason"] for s in rep["suppressed"]} == {"phi-exceeds-channel"}


def test_event_for_a_shared_phone_is_held_not_guessed(tmp_path: Path) -> None:
    rep = run_feed(
        tmp_path,
        [
            line(
                "2026-03-01T14:00:00+00:00",
                id="m1",
                type="appointment.booked",
                appointment=APPT,
                mrn="A1",
                phone="+15555550150",
            ),
            line(
                "2026-03-01T14:01:00+00:00",
                id="m2",
                type="appointment.booked",
                appointment={**APPT, "id": "a2"},
                mrn="A2",
                phone="+15555550150",
            ),
            line(
                "2026-03-02T14:00:00+00:00",
                id="m3",
                type="message.inbound",
                phone="+15555550150",
                attributes={"channel": "sms", "body": "C", "keyword": "confirm"},
            ),
        ],
    )
    held = [e for e in rep["events"] if e["type"] == "message.inbound"]
    assert held == [
        {"at": "2026-03-02T14:00:00+00:00", "person": None, "type": "message.inbound", "status": "held"}
    ]
    assert not any(e["type"] == "appointment.confirmed" for e in rep["events"])
