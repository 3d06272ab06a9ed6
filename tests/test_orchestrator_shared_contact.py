"""A phone or email several people's records hold (a family phone) holds automated outreach
for staff (gate rule 6, ``identity-unresolved``) unless ``compliance.shared_contact: send``;
frequency caps keyed by kind count every channel of that kind; a STOP naming the kind
cancels what is queued on a channel called otherwise; the allowed window is checked when
the config is loaded. Synthetic people only."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from careloop import config as cfgmod
from careloop.clock import VirtualClock
from careloop.config import SiteConfig
from careloop.hub import Hub
from careloop.pipeline import MapStage
from careloop.replay import FeedLine
from careloop.store import Store
from careloop.tables import AuditRecord, Consent, Decision, OutboxItem
from orchestrator.gate import Cap, ChannelFacts, evaluate
from tests.conftest import FIXTURES
from tests.test_orchestrator_qa_gate import APPT, NY, PHONE, _gate, _line, _person, _replay

SMS = ChannelFacts("sms", "phone", "sms", "none")
MAIL = ChannelFacts("email", "email", "email", "limited")


def test_a_shared_phone_is_passed_over_for_an_address_the_person_holds_alone() -> None:
    v = evaluate(_gate([SMS, MAIL], person=_person(shared=frozenset({PHONE}))))
    assert (v.outcome, v.channel, v.recipient) == ("send", "email", "pat@example.test")
    assert v.tried == (("sms", "identity-unresolved"),)


def test_with_only_shared_addresses_the_item_is_held_for_staff() -> None:
    both = frozenset({PHONE, "pat@example.test"})
    v = evaluate(_gate([SMS, MAIL], person=_person(shared=both)))
    assert (v.outcome, v.reason) == ("suppress", "identity-unresolved")


def test_a_second_unshared_phone_is_used_instead_of_the_shared_one() -> None:
    person = _person(addresses={"phone": [PHONE, "+12125550148"]}, shared=frozenset({PHONE}))
    v = evaluate(_gate([SMS], person=person))
    assert (v.outcome, v.recipient) == ("send", "+12125550148")


def test_the_safety_reply_still_reaches_whoever_wrote_from_a_shared_phone() -> None:
    v = evaluate(_gate([SMS], person=_person(shared=frozenset({PHONE})), mode="safety"))
    assert (v.outcome, v.recipient) == ("send", PHONE)


def test_a_cap_keyed_by_kind_counts_every_channel_of_that_kind() -> None:
    texts = ChannelFacts("texts", "phone", "sms", "none")
    inp: dict[str, Any] = {
        "caps": {"sms": Cap(1, 3)},
        "sent_day": {"sms": 1},
        "sent_week": {"sms": 1},
        "kind_of": {"sms": "sms", "texts": "sms", "email": "email"},
    }
    v = evaluate(_gate([texts], **inp))
    assert (v.outcome, v.reason) == ("suppress", "frequency-cap")
    # A cap keyed by the channel's own id counts that channel only.
    v = evaluate(_gate([texts], **{**inp, "caps": {"texts": Cap(1, 3)}}))
    assert v.outcome == "send"
    # Email sends do not count against the SMS cap.
    v = evaluate(_gate([texts], **{**inp, "sent_day": {"email": 5}, "sent_week": {"email": 5}}))
    assert v.outcome == "send"


def _family(engine: Engine, tmp_path: Path, shared_contact: str | None) -> dict[str, Any]:
    def setting(raw: dict[str, Any]) -> None:
        if shared_contact is not None:
            raw.setdefault("compliance", {})["shared_contact"] = shared_contact

    other = {"id": "qa-a2", "start": "2026-03-09T16:00:00-04:00"}
    return _replay(
        engine,
        tmp_path,
        [
            _line(datetime(2026, 3, 2, 10, tzinfo=NY), type="appointment.booked", appointment=APPT),
            _line(
                datetime(2026, 3, 2, 10, 5, tzinfo=NY),
                mrn="QA-2",
                type="appointment.booked",
                appointment=other,
            ),
        ],
        setting,
    )


def test_replay_two_people_on_one_phone_are_held_for_staff(engine: Engine, tmp_path: Path) -> None:
    rep = _family(engine, tmp_path, None)
    # Both people's reminders (two each, due days later) find the phone shared: none goes;
    # each waits in the outbox for staff.
    assert rep["deliveries"] == [] and rep["suppressed"] == []
    assert [h["reason"] for h in rep["held"]] == ["identity-unresolved"] * 4
    assert {h["person"] for h in rep["held"]} == {"1", "2"}
    with Session(engine) as s:
        assert [o.status for o in s.exec(select(OutboxItem)).all()] == ["held"] * 4


def test_staff_release_a_held_message_and_it_goes_or_cancel_it_and_it_does_not(
    engine: Engine, tmp_path: Path, hubs: list[Hub]
) -> None:
    from typer.testing import CliRunner

    from channels.outbox_cli import app as outbox_app
    from tests.test_channels_outbox_cli import cli_url

    _family(engine, tmp_path, None)
    with Session(engine) as s:
        first, second, *_ = s.exec(select(OutboxItem).order_by(col(OutboxItem.id))).all()
    env = {"CARELOOP_DATABASE_URL": cli_url(engine)}
    runner = CliRunner()
    listed = runner.invoke(outbox_app, ["list", "--status", "held"], env=env)
    assert listed.exit_code == 0 and PHONE not in listed.output and len(listed.output.splitlines()) == 5
    assert runner.invoke(outbox_app, ["release", str(first.id)], env=env).exit_code == 0
    assert runner.invoke(outbox_app, ["cancel", str(second.id)], env=env).exit_code == 0
    again = runner.invoke(outbox_app, ["release", str(second.id)], env=env)
    assert again.exit_code == 1 and "only held items" in again.output
    with Session(engine) as s:
        released, cancelled = s.get(OutboxItem, first.id), s.get(OutboxItem, second.id)
        audits = [
            a.action for a in s.exec(select(AuditRecord).where(col(AuditRecord.action).like("outbox.%")))
        ]
    assert released is not None and cancelled is not None
    assert (released.status, cancelled.status) == ("pending", "cancelled")
    assert released.released_by is not None and released.released_by.startswith("cli:")
    assert released.released_at is not None and cancelled.released_at is None
    with Session(engine) as s:
        staff = [
            (d.action, d.reason) for d in s.exec(select(Decision).where(col(Decision.reason).like("staff-%")))
        ]
    assert staff == [("release", "staff-released"), ("cancel", "staff-cancelled")]
    assert audits == ["outbox.list", "outbox.release", "outbox.cancel", "outbox.release"]
    # The deliver stage sends the released one (the send-time gate does not hold it again
    # for the address staff confirmed) and leaves the cancelled one alone.
    clock = VirtualClock(datetime(2026, 3, 5, 12, tzinfo=NY))
    hub = Hub(cfgmod.load(FIXTURES / "config" / "kernel-test.yaml"), store=Store(engine, clock), capture=True)
    hubs.append(hub)
    asyncio.run(hub.deliver.run_once())
    with Session(engine) as s:
        statuses = {o.id: o.status for o in s.exec(select(OutboxItem)).all()}
    assert statuses[first.id] == "captured" and statuses[second.id] == "cancelled"
    assert list(statuses.values()).count("held") == 2


def test_replay_shared_contact_send_lets_a_family_phone_receive(engine: Engine, tmp_path: Path) -> None:
    rep = _family(engine, tmp_path, "send")
    assert not [s for s in rep["suppressed"] if s["reason"] == "identity-unresolved"]
    assert len(rep["deliveries"]) == 4


def test_a_stop_by_kind_cancels_what_is_queued_on_a_channel_called_otherwise(
    engine: Engine, tmp_path: Path, hubs: list[Hub]
) -> None:
    raw = cfgmod.load_raw(FIXTURES / "config" / "kernel-test.yaml")
    raw["channels"] = {"texts": raw["channels"]["sms"], "email": raw["channels"]["email"]}
    raw["site"]["channels"] = ["texts"]
    path = tmp_path / "texts.yaml"
    path.write_text(yaml.safe_dump(raw))
    clock = VirtualClock(datetime(2026, 3, 2, 10, tzinfo=NY))
    hub = Hub(cfgmod.load(path), store=Store(engine, clock), capture=True)
    hubs.append(hub)
    map_stage = hub.stages[0]
    assert isinstance(map_stage, MapStage)

    def arrive(i: int, **body: Any) -> None:
        line = _line(clock.now(), **body)
        doc = {**json.loads(line.body), "id": f"q{i}"}
        hub.sink.put_sync(hub.connectors["feed"].accept(json.dumps(doc).encode(), {}))
        map_stage.run_once_sync()
        hub.orchestrator.run_once_sync()  # the deliver stage does not run: sends stay queued

    arrive(1, type="appointment.booked", appointment=APPT)
    arrive(2, type="appointment.confirmed", appointment={**APPT, "status": "confirmed"})
    with Session(engine) as s:
        queued = s.exec(select(OutboxItem)).all()
    assert [(o.channel, o.template, o.status) for o in queued] == [("texts", "appointment-prep", "pending")]
    arrive(3, type="consent.revoked", attributes={"channel": "sms", "purpose": "*", "keyword": "stop"})
    with Session(engine) as s:
        after = s.exec(select(OutboxItem)).all()
    assert [(o.template, o.status) for o in after] == [("appointment-prep", "cancelled")]


@pytest.mark.parametrize("hours", ["21:00-08:00", "09:00-09:00"])
def test_an_allowed_window_that_is_empty_or_crosses_midnight_fails_config_loading(hours: str) -> None:
    with pytest.raises(ValidationError, match="quiet_hours"):
        SiteConfig(timezone="America/New_York", quiet_hours=hours, channels=["sms"])


def test_replay_an_offer_waiting_for_morning_keeps_its_product(engine: Engine, tmp_path: Path) -> None:
    # Offer for Q deferred at 22:00; a refund for another product (P) at 23:00 does not stop
    # it, and the morning message is still about Q though P was mentioned last.
    marketing = {"channel": "*", "purpose": "marketing"}
    rep = _replay(
        engine,
        tmp_path,
        [
            _line(datetime(2026, 3, 3, 9, tzinfo=NY), type="consent.granted", attributes=marketing),
            _line(
                datetime(2026, 3, 3, 22, tzinfo=NY), type="crm.offer.eligible", attributes={"product": "Q"}
            ),
            _line(
                datetime(2026, 3, 3, 23, tzinfo=NY),
                type="crm.refund.initiated",
                attributes={"product": "P"},
            ),
        ],
    )
    assert [d["reason"] for d in rep["deferred"]] == ["quiet-hours"]
    assert [d["template"] for d in rep["deliveries"]] == ["discount-offer"]
    with Session(engine) as s:
        [item] = s.exec(select(OutboxItem).where(OutboxItem.template == "discount-offer")).all()
    assert item.content["text"] == "An offer on Q for you. Reply STOP to opt out."


@pytest.mark.parametrize(
    ("zone", "language", "want"),
    [
        ("America/New_York", "en", "Visit at 10:30 AM"),  # the clinic's own clock: no label
        ("America/Phoenix", "en", "Visit at 7:30 AM MST"),
        ("America/Los_Angeles", "es", "Visit at 07:30 PDT"),
    ],
)
def test_a_time_says_its_zone_when_the_reader_lives_on_another_clock(
    zone: str, language: str, want: str
) -> None:
    from zoneinfo import ZoneInfo

    from orchestrator import templates
    from orchestrator.templates import TemplateConfig

    tpl = TemplateConfig.model_validate({"sms": {language: "Visit at {{ appointment.start | local_time }}"}})
    start = datetime(2026, 3, 9, 10, 30, tzinfo=NY).astimezone(ZoneInfo(zone))  # as the engine hands it
    ctx = {
        "site": {"timezone": "America/New_York"},
        "person": {"language": language, "timezone": zone},
        "appointment": {"start": start},
    }
    assert templates.render(tpl, "sms", language, ctx) == {"text": want}


def test_a_shared_phone_does_not_mask_a_cap_or_a_stop_so_only_sendable_messages_are_held() -> None:
    shared = _person(shared=frozenset({PHONE}))
    v = evaluate(
        _gate([SMS], person=shared, caps={"sms": Cap(1, 3)}, sent_day={"sms": 1}, sent_week={"sms": 1})
    )
    assert v.reason == "frequency-cap"
    stopped = _person(shared=frozenset({PHONE}), opted_out=frozenset({("sms", "*")}))
    assert evaluate(_gate([SMS], person=stopped)).reason == "opted-out"
    assert evaluate(_gate([SMS], person=shared)).reason == "identity-unresolved"


def _phone_only(line: FeedLine) -> FeedLine:
    doc = json.loads(line.body)
    del doc["mrn"]  # as an SMS reply: only the phone it came from
    return FeedLine(line.at, line.connector, json.dumps(doc).encode(), line.headers)


def test_replay_a_stop_from_a_shared_phone_stops_it_for_everyone_who_holds_it(
    engine: Engine, tmp_path: Path
) -> None:
    # Two people on one phone; a STOP arrives from the phone alone (it names no one).
    other = {"id": "qa-a2", "start": "2026-03-09T16:00:00-04:00"}
    stop = {"channel": "sms", "purpose": "*", "keyword": "stop"}
    rep = _replay(
        engine,
        tmp_path,
        [
            _line(datetime(2026, 3, 2, 10, tzinfo=NY), type="appointment.booked", appointment=APPT),
            _line(
                datetime(2026, 3, 2, 10, 5, tzinfo=NY),
                mrn="QA-2",
                type="appointment.booked",
                appointment=other,
            ),
            _phone_only(
                _line(datetime(2026, 3, 2, 10, 10, tzinfo=NY), type="consent.revoked", attributes=stop)
            ),
        ],
    )
    with Session(engine) as s:
        consents = sorted((c.person_id, c.channel, c.status) for c in s.exec(select(Consent)).all())
    assert consents == [(1, "sms", "opt_out"), (2, "sms", "opt_out")]
    # Their reminders, due days later, are refused for the STOP, not held for the phone.
    assert rep["held"] == [] and rep["deliveries"] == []
    assert sorted((x["person"], x["reason"]) for x in rep["suppressed"]) == [
        ("1", "opted-out"),
        ("1", "opted-out"),
        ("2", "opted-out"),
        ("2", "opted-out"),
    ]


def test_a_held_message_past_its_useful_life_is_cancelled_not_left_waiting(
    engine: Engine, tmp_path: Path, hubs: list[Hub]
) -> None:
    _family(engine, tmp_path, None)
    clock = VirtualClock(datetime(2026, 3, 20, 12, tzinfo=NY))  # the visits were on March 9
    hub = Hub(cfgmod.load(FIXTURES / "config" / "kernel-test.yaml"), store=Store(engine, clock), capture=True)
    hubs.append(hub)
    asyncio.run(hub.deliver.run_once())
    with Session(engine) as s:
        items = s.exec(select(OutboxItem)).all()
        expired = s.exec(select(AuditRecord).where(AuditRecord.action == "outbox.expire")).all()
    assert [o.status for o in items] == ["cancelled"] * 4 and len(expired) == 4
