"""Compliance review of the gate, time zones, templates and playbooks: what a careful
coordinator would not send. Pure functions with plain values, and the real pipeline
through replay (SQLite, and PostgreSQL when CARELOOP_TEST_DATABASE_URL is set).
Synthetic people only."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from jinja2 import TemplateError
from sqlalchemy.engine import Engine

from careloop import config as cfgmod
from careloop.replay import FeedLine, Replayer, build_report
from orchestrator import templates, timezones
from orchestrator.gate import (
    ChannelFacts,
    GateInput,
    PersonFacts,
    evaluate,
    next_allowed,
    parse_quiet_hours,
)
from orchestrator.templates import TemplateConfig
from tests.conftest import FIXTURES
from tests.kernel_plugins import register

register()
NY = ZoneInfo("America/New_York")
WINDOW = (time(8), time(21))
PHONE = "+12125550147"  # a New York number (555-01xx: fictional)


# ------------------------------------------------------------------------- the pure gate


def _person(**kw: Any) -> PersonFacts:
    base: dict[str, Any] = {
        "deceased": False,
        "timezone": "America/New_York",
        "addresses": {"phone": [PHONE], "email": ["pat@example.test"]},
        "opted_out": frozenset(),
    }
    return PersonFacts(**{**base, **kw})


def _gate(channels: list[ChannelFacts], **kw: Any) -> GateInput:
    base: dict[str, Any] = {
        "now": datetime(2026, 3, 2, 17, 0, tzinfo=UTC),  # noon in New York
        "person": _person(),
        "template_kinds": frozenset({"sms", "email", "text"}),
        "phi_class": "none",
        "purpose": "appointment-reminder",
        "channels": channels,
    }
    return GateInput(**{**base, **kw})


def test_a_stop_for_sms_holds_whatever_the_sms_channel_is_called() -> None:
    # Twilio STOP, FHIR Consent and CRM opt-outs record the channel kind ("sms"); a site
    # may call its SMS channel anything.
    texts = ChannelFacts("texts", "phone", "sms", "none")
    v = evaluate(_gate([texts], person=_person(opted_out=frozenset({("sms", "*")}))))
    assert (v.outcome, v.reason) == ("suppress", "opted-out")
    v = evaluate(_gate([texts], person=_person(opted_out=frozenset({("sms", "appointment-reminder")}))))
    assert (v.outcome, v.reason) == ("suppress", "opted-out")
    # ... and only that kind: the email channel still passes.
    mail = ChannelFacts("mail", "email", "email", "limited")
    v = evaluate(_gate([texts, mail], person=_person(opted_out=frozenset({("sms", "*")}))))
    assert (v.outcome, v.channel, v.tried) == ("send", "mail", (("texts", "opted-out"),))


def test_a_marketing_opt_in_for_sms_counts_for_the_sms_channel_by_any_name() -> None:
    texts = ChannelFacts("texts", "phone", "sms", "none")
    given = datetime(2026, 3, 1, tzinfo=UTC)
    v = evaluate(_gate([texts], purpose="marketing", person=_person(opted_in={("sms", "marketing"): given})))
    assert (v.outcome, v.channel) == ("send", "texts")
    v = evaluate(
        _gate([texts], purpose="marketing", person=_person(opted_in={("email", "marketing"): given}))
    )
    assert (v.outcome, v.reason) == ("suppress", "no-consent")


@pytest.mark.parametrize("text", ["21:00-08:00", "20:00-02:00", "09:00-09:00"])
def test_a_window_that_crosses_midnight_or_is_empty_is_refused(text: str) -> None:
    # Read literally, "21:00-08:00" sends all night; as it was handled, nothing was ever sent.
    with pytest.raises(ValueError, match="allowed sending window"):
        parse_quiet_hours(text)
    start, end = (time(int(x[:2]), int(x[3:])) for x in text.split("-"))
    with pytest.raises(ValueError):
        next_allowed(datetime(2026, 3, 2, 17, tzinfo=UTC), "America/New_York", (start, end))


def test_whole_day_window_still_parses() -> None:
    assert parse_quiet_hours("00:00-24:00") == (time(0), time(23, 59, 59))
    assert parse_quiet_hours("08:00-21:00") == WINDOW


@pytest.mark.parametrize("day", ["2026-03-08", "2026-11-01"])  # spring forward, fall back
def test_next_allowed_is_the_first_local_minute_inside_the_window_across_dst(day: str) -> None:
    start = datetime.fromisoformat(f"{day}T00:00:00").replace(tzinfo=NY) - timedelta(hours=6)
    for step in range(0, 48 * 12):  # every 5 minutes over two days around the change
        now = (start + timedelta(minutes=5 * step)).astimezone(UTC)
        at = next_allowed(now, "America/New_York", WINDOW)
        local = at.astimezone(NY)
        assert at >= now
        assert time(8) <= local.time() < time(21), f"{now} -> {local}"
        if at > now:  # deferred: nothing earlier was allowed
            assert local.time() == time(8)
            probe = at - timedelta(minutes=5)
            while probe > now:
                assert not time(8) <= probe.astimezone(NY).time() < time(21)
                probe -= timedelta(minutes=5)


# ------------------------------------------------------------------------- time zones


@pytest.mark.parametrize(
    "address,zone",
    [
        ({"state": "TX", "postalCode": "79901"}, "America/Denver"),  # El Paso
        ({"state": "TX", "postalCode": "75201"}, "America/Chicago"),  # Dallas
        ({"state": "FL", "postalCode": "32501"}, "America/Chicago"),  # Pensacola
        ({"state": "FL", "postalCode": "33101"}, "America/New_York"),  # Miami
        ({"state": "TN", "postalCode": "37902"}, "America/New_York"),  # Knoxville
        ({"state": "TN", "postalCode": "37203"}, "America/Chicago"),  # Nashville
        ({"state": "KY", "postalCode": "42101"}, "America/Chicago"),  # Bowling Green
        ({"state": "IN", "postalCode": "46402"}, "America/Chicago"),  # Gary
        ({"state": "ID", "postalCode": "83814"}, "America/Los_Angeles"),  # Coeur d'Alene
        ({"state": "Texas", "postalCode": "79901-1234"}, "America/Denver"),
        ({"state": "new york", "country": "United States"}, "America/New_York"),
        ({"state": "GU"}, "Pacific/Guam"),
        ({"state": "ON", "country": "CA"}, None),
    ],
)
def test_time_zone_from_state_refined_by_zip(address: dict[str, str], zone: str | None) -> None:
    assert timezones.from_patient({"address": [address]}) == zone


def test_an_old_or_billing_address_does_not_place_the_person() -> None:
    patient = {
        "address": [
            {"use": "old", "state": "CA"},
            {"use": "billing", "state": "AZ"},
            {"use": "home", "state": "NY"},
        ]
    }
    assert timezones.resolve(patient, ["+13105550100"], "UTC") == "America/New_York"
    assert timezones.resolve({"address": [{"use": "old", "state": "CA"}]}, [], "UTC") == "UTC"


# ------------------------------------------------------------------------- templates


def _tpl(body: str) -> TemplateConfig:
    return TemplateConfig.model_validate({"sms": {"en": body}})


@pytest.mark.parametrize(
    "body,fragment",
    [
        ("Hi {{ person.name }}", "unknown field person.name"),
        ("At {{ appointment.locaton }}", "unknown field appointment.locaton"),
        ("At {{ appointment['where'] }}", "unknown field appointment.where"),
        ("{{ event.kind }}", "unknown field event.kind"),
        ("{{ person.items }}", "unknown field person.items"),
        ("{% include 'other' %}", "include is not available"),
        ("{% import 'macros' as m %}", "import is not available"),
    ],
)
def test_fields_and_tags_that_would_fail_at_send_time_fail_config_check(body: str, fragment: str) -> None:
    problems = templates.check("t", _tpl(body))
    assert len(problems) == 1 and problems[0].startswith("templates.t.sms.en: ")
    assert fragment in problems[0]


def test_the_fields_the_engine_provides_pass_config_check() -> None:
    body = (
        "{{ person.language }} {{ person.timezone }} {{ site.timezone }} {{ product }} "
        "{{ appointment.start | local_date }} {{ appointment.end | local_time }} {{ appointment.location }} "
        "{{ appointment.type }} {{ appointment.status }} {{ encounter.discharged_at | local_date }} "
        "{{ encounter.status }} {{ appointment['location'] }}"
    )
    tpl = TemplateConfig.model_validate({"phi_class": "full", "sms": {"en": body}})
    assert templates.check("t", tpl) == []


@pytest.mark.parametrize(
    "body,declared,problem",
    [
        (
            "At {{ appointment.location }}",
            "none",
            "shows appointment.location, so the template's phi_class "
            "must be at least 'limited' (it is 'none')",
        ),
        (
            "Your {{ appointment['type'] }} visit",
            "limited",
            "shows appointment.type, so the template's phi_class must be at least 'full' (it is 'limited')",
        ),
        ("At {{ appointment.location }}", "limited", None),
        ("Visit {{ appointment.start | local_date }}", "none", None),
    ],
)
def test_a_template_cannot_declare_less_phi_than_it_shows(
    body: str, declared: str, problem: str | None
) -> None:
    # Minimum necessary: the gate trusts the declared class to keep clinical detail off SMS.
    tpl = TemplateConfig.model_validate({"phi_class": declared, "sms": {"en": body}})
    assert templates.check("t", tpl) == ([f"templates.t.sms.en: {problem}"] if problem else [])


def test_engine_context_has_exactly_the_checked_fields() -> None:
    # The check is only as good as its list: it must match what the engine hands templates.
    from types import SimpleNamespace

    from careloop.tables import Person
    from orchestrator.core import EngineCore
    from orchestrator.playbooks import Send
    from orchestrator.state import JourneyState, apply

    at = datetime(2026, 3, 2, 15, tzinfo=UTC)
    state = apply(JourneyState(), "appointment.booked", at, "Appointment/q", {"start": at.isoformat()}, {})
    state = apply(state, "encounter.discharged", at, "Encounter/q", {"period": {"end": at.isoformat()}}, {})
    engine = SimpleNamespace(config=cfgmod.load(FIXTURES / "config" / "example.yaml"))
    for ref, var in (("Appointment/q", "appointment"), ("Encounter/q", "encounter")):
        send = Send("p", 1, 0, "t", None, ref, None, "care-coordination", False)
        ctx = EngineCore._context(engine, Person(id=1, language="en"), state, send, "UTC")  # type: ignore[arg-type]
        assert set(ctx) == set(templates.FIELDS)
        for name, fields in templates.FIELDS.items():
            if isinstance(ctx[name], dict) and (ctx[name] or name == var):
                assert fields is not None and frozenset(ctx[name]) == fields, name


@pytest.mark.parametrize(
    "body,ctx",
    [
        ("An offer on {{ product }}", {"product": None}),
        ("Visit {{ appointment.start | local_date }}", {"appointment": {"start": None}}),
        ("Visit {{ appointment.start | local_time }}", {"appointment": {"start": "soon"}}),
        ("At {{ appointment.location }}", {"appointment": {"location": None}}),
    ],
)
def test_a_missing_value_is_a_template_error_not_none_in_the_message(body: str, ctx: dict[str, Any]) -> None:
    # TemplateError is what the engine turns into "template-error" for that one message;
    # anything else would fail the whole event.
    with pytest.raises(TemplateError):
        templates.render(_tpl(body), "sms", "en", ctx)


@pytest.mark.parametrize("language", ["es", "es-MX", "ES", "spa", "es_US"])
def test_spanish_speakers_get_the_spanish_body_however_the_feed_spells_it(language: str) -> None:
    tpl = TemplateConfig.model_validate(
        {
            "sms": {
                "en": "Visit {{ appointment.start | local_date }}",
                "es": "Cita {{ appointment.start | local_date }}",
            }
        }
    )
    start = datetime(2026, 3, 13, 18, 0, tzinfo=UTC).astimezone(NY)
    out = templates.render(tpl, "sms", language, {"appointment": {"start": start}, "person": {}})
    assert out == {"text": "Cita viernes 13 de marzo"}


@pytest.mark.parametrize(
    "body",
    [
        "{{ person.__class__.__mro__ }}",
        "{{ person|attr('__class__') }}",
        "{{ '{0.__class__}'.format(person) }}",
        "{% set f = '{0.__class__}'.format %}{{ f(person) }}",
        "{{ lipsum.__globals__ }}",
        "{{ cycler.__init__.__globals__ }}",
    ],
)
def test_template_injection_stays_in_the_sandbox(body: str) -> None:
    from jinja2.exceptions import SecurityError

    with pytest.raises(SecurityError):
        templates.render(_tpl(body), "sms", "en", {"person": {"language": "en"}})


# ------------------------------------------------------------------------- replay


def _line(at: datetime, **body: Any) -> FeedLine:
    body["at"] = at.isoformat()
    body.setdefault("mrn", "QA-1")
    body.setdefault("phone", PHONE)
    return FeedLine(at.astimezone(UTC), "feed", json.dumps(body).encode(), {})


def _replay(
    engine: Engine,
    tmp_path: Path,
    lines: list[FeedLine],
    change: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    raw = cfgmod.load_raw(FIXTURES / "config" / "kernel-test.yaml")
    if change is not None:
        change(raw)
    path = tmp_path / "qa.yaml"
    path.write_text(yaml.safe_dump(raw))
    for i, ln in enumerate(lines):  # unique message ids
        doc = json.loads(ln.body)
        doc["id"] = f"qa{i}"
        lines[i] = FeedLine(ln.at, ln.connector, json.dumps(doc).encode(), ln.headers)
    rp = Replayer(cfgmod.load(path), engine=engine, start=lines[0].at - timedelta(minutes=1))
    try:
        asyncio.run(rp.feed(lines, horizon=timedelta(days=12)))
        return build_report(rp.store)
    finally:
        rp.close()


APPT = {"id": "qa-a1", "start": "2026-03-09T15:00:00-04:00"}


def test_replay_stop_for_sms_stops_a_channel_named_otherwise(engine: Engine, tmp_path: Path) -> None:
    def rename(raw: dict[str, Any]) -> None:
        raw["channels"] = {"texts": raw["channels"]["sms"], "email": raw["channels"]["email"]}
        raw["site"]["channels"] = ["texts"]

    rep = _replay(
        engine,
        tmp_path,
        [
            _line(datetime(2026, 3, 2, 10, tzinfo=NY), type="appointment.booked", appointment=APPT),
            _line(
                datetime(2026, 3, 2, 10, 5, tzinfo=NY),
                type="consent.revoked",
                attributes={"channel": "sms", "purpose": "*", "keyword": "stop"},
            ),
        ],
        rename,
    )
    assert rep["deliveries"] == []
    assert [s["reason"] for s in rep["suppressed"]] == ["opted-out", "opted-out"]


def test_replay_shadow_playbook_opens_no_escalation_and_pauses_nothing(
    engine: Engine, tmp_path: Path
) -> None:
    def shadow(raw: dict[str, Any]) -> None:
        raw["playbooks"]["discharge-survey"]["shadow"] = True

    encounter = {
        "id": "qa-e1",
        "status": "finished",
        "period": {"start": "2026-03-01T10:00:00-05:00", "end": "2026-03-02T10:00:00-05:00"},
    }
    rep = _replay(
        engine,
        tmp_path,
        [
            _line(datetime(2026, 3, 2, 10, tzinfo=NY), type="encounter.discharged", encounter=encounter),
            _line(datetime(2026, 3, 2, 11, tzinfo=NY), type="appointment.booked", appointment=APPT),
        ],
        shadow,
    )
    assert rep["escalations"] == []
    assert [(s["playbook"], s["reason"]) for s in rep["suppressed"]] == [
        ("discharge-survey", "shadow-escalation")
    ]
    assert [d["template"] for d in rep["deliveries"]] == ["appointment-reminder", "appointment-reminder"]


def test_replay_refund_while_an_offer_waits_for_morning_stops_it(engine: Engine, tmp_path: Path) -> None:
    marketing = {"channel": "*", "purpose": "marketing"}
    rep = _replay(
        engine,
        tmp_path,
        [
            _line(datetime(2026, 3, 3, 9, tzinfo=NY), type="consent.granted", attributes=marketing),
            _line(
                datetime(2026, 3, 3, 22, tzinfo=NY), type="crm.offer.eligible", attributes={"product": "QA-P"}
            ),
            _line(
                datetime(2026, 3, 3, 23, tzinfo=NY),
                type="crm.refund.initiated",
                attributes={"product": "QA-P"},
            ),
        ],
    )
    assert [d["reason"] for d in rep["deferred"]] == ["quiet-hours"]
    assert rep["deliveries"] == []
    assert [s["reason"] for s in rep["suppressed"]] == ["refund-in-progress"]


def test_replay_offer_for_another_product_still_goes(engine: Engine, tmp_path: Path) -> None:
    marketing = {"channel": "*", "purpose": "marketing"}
    rep = _replay(
        engine,
        tmp_path,
        [
            _line(datetime(2026, 3, 3, 9, tzinfo=NY), type="consent.granted", attributes=marketing),
            _line(
                datetime(2026, 3, 3, 9, 5, tzinfo=NY),
                type="crm.refund.initiated",
                attributes={"product": "QA-P"},
            ),
            _line(
                datetime(2026, 3, 3, 10, tzinfo=NY), type="crm.offer.eligible", attributes={"product": "QA-Q"}
            ),
        ],
    )
    assert [d["template"] for d in rep["deliveries"]] == ["discount-offer"]


def test_replay_death_or_stop_during_a_quiet_hours_deferral_stops_the_message(
    engine: Engine, tmp_path: Path
) -> None:
    # The reminder's 72-hour mark falls at 06:30 local: deferred to 08:00, and the gate asks again then.
    early = {"id": "qa-a2", "start": "2026-03-12T06:30:00-04:00"}
    rep = _replay(
        engine,
        tmp_path,
        [
            _line(datetime(2026, 3, 2, 10, tzinfo=NY), type="appointment.booked", appointment=early),
            _line(
                datetime(2026, 3, 2, 11, tzinfo=NY),
                mrn="QA-2",
                phone="+12125550148",
                type="appointment.booked",
                appointment={**early, "id": "qa-a3"},
            ),
            _line(
                datetime(2026, 3, 9, 7, tzinfo=NY),
                type="patient.updated",
                patient={"deceasedDateTime": "2026-03-09T05:00:00-04:00"},
            ),
            _line(
                datetime(2026, 3, 9, 7, 1, tzinfo=NY),
                mrn="QA-2",
                phone="+12125550148",
                type="consent.revoked",
                attributes={"channel": "*", "purpose": "*", "keyword": "stop"},
            ),
        ],
    )
    assert {d["reason"] for d in rep["deferred"]} == {"quiet-hours"}
    assert rep["deliveries"] == []
    reasons = {(s["person"], s["reason"]) for s in rep["suppressed"]}
    assert reasons == {("1", "deceased"), ("2", "opted-out")}


def test_a_person_without_a_language_gets_the_site_language() -> None:
    # The engine puts the site's language in the context for a person who has none.
    tpl = TemplateConfig.model_validate({"sms": {"en": "Hello", "es": "Hola"}})
    assert templates.render(tpl, "sms", None, {"person": {"language": "es"}}) == {"text": "Hola"}
    assert templates.render(tpl, "sms", "en", {"person": {"language": "es"}}) == {"text": "Hello"}


def test_an_email_subject_stays_one_line_whatever_the_data_holds() -> None:
    tpl = TemplateConfig.model_validate(
        {
            "phi_class": "limited",
            "email": {"en": {"subject": "Visit at {{ appointment.location }}", "text": "x"}},
        }
    )
    out = templates.render(tpl, "email", "en", {"appointment": {"location": "Clinic\r\nBcc: x@example.test"}})
    assert out is not None and out["subject"] == "Visit at Clinic Bcc: x@example.test"


def test_replay_a_spanish_site_writes_in_spanish_to_people_without_a_language(
    engine: Engine, tmp_path: Path
) -> None:
    def spanish(raw: dict[str, Any]) -> None:
        raw["site"]["language"] = "es"
        raw["templates"]["appointment-reminder"]["sms"]["es"] = "Cita el {{ appointment.start | local_date }}"

    rep = _replay(
        engine,
        tmp_path,
        [_line(datetime(2026, 3, 2, 10, tzinfo=NY), type="appointment.booked", appointment=APPT)],
        spanish,
    )
    assert len(rep["deliveries"]) == 2
    from sqlmodel import Session, select

    from careloop.tables import OutboxItem

    with Session(engine) as s:
        texts = [o.content["text"] for o in s.exec(select(OutboxItem)).all()]
    assert texts == ["Cita el lunes 9 de marzo", "Cita el lunes 9 de marzo"]
