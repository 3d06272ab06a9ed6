"""Time zones, templates and playbook validation as plain functions."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from orchestrator import templates, timezones
from orchestrator.playbooks import PlaybookConfig
from orchestrator.templates import TemplateConfig


def test_time_zone_from_address_then_phone_then_site() -> None:
    ca = {"address": [{"state": "CA", "country": "USA"}]}
    assert timezones.resolve(ca, ["+12125550100"], "America/New_York") == "America/Los_Angeles"
    assert timezones.resolve({}, ["+13125550100"], "UTC") == "America/Chicago"  # a Chicago number
    assert timezones.resolve({}, [], "America/Denver") == "America/Denver"


def test_template_renders_in_recipient_language_with_local_dates() -> None:
    tpl = TemplateConfig.model_validate(
        {
            "sms": {
                "en": "Visit {{ appointment.start | local_date }}",
                "es": "Cita {{ appointment.start | local_date }}",
            }
        }
    )
    start = datetime(2026, 3, 12, 3, 30, tzinfo=UTC).astimezone(timezones_zone("America/Los_Angeles"))
    out = templates.render(tpl, "sms", "es", {"appointment": {"start": start}})
    assert out == {"text": "Cita miércoles 11 de marzo"}  # 03:30 UTC is the evening before in California
    assert templates.render(tpl, "sms", "fr", {"appointment": {"start": start}}) == {
        "text": "Visit Wed Mar 11"
    }


def timezones_zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def test_template_sandbox_refuses_attribute_tricks() -> None:
    from jinja2.exceptions import SecurityError

    tpl = TemplateConfig.model_validate({"sms": {"en": "{{ person.__class__.__mro__ }}"}})
    with pytest.raises(SecurityError):
        templates.render(tpl, "sms", "en", {"person": {}})


def test_unknown_template_variable_is_a_config_error() -> None:
    tpl = TemplateConfig.model_validate({"sms": {"en": "Hi {{ first_name }}"}})
    assert templates.check("t", tpl) == [
        "templates.t.sms.en: unknown variable 'first_name' (allowed: appointment, encounter, event, person, "
        "product, site)"
    ]


@pytest.mark.parametrize(
    "raw,fragment",
    [
        (
            {"on": "appointment.booked", "steps": [{"send": "x", "wait_for": "appointment.confirmed"}]},
            "exactly one",
        ),
        ({"on": "appointment.booked", "steps": [{"wait_for": "appointment.confirmed"}]}, "needs a timeout"),
        ({"on": "appointment.booked", "steps": []}, "at least 1"),
        ({"on": "appointment.booked", "steps": [{"send": "x", "at": "lunchtime"}]}, "must be one of"),
    ],
)
def test_playbook_shapes_are_checked(raw: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError) as exc:
        PlaybookConfig.model_validate(raw)
    assert fragment in str(exc.value)


def test_dates_follow_the_language_of_the_body_sent() -> None:
    start = datetime(2026, 3, 13, 18, 0, tzinfo=UTC).astimezone(timezones_zone("America/New_York"))
    ctx = {"appointment": {"start": start}, "person": {"language": "es"}}
    both = TemplateConfig.model_validate(
        {
            "sms": {
                "en": "{{ appointment.start | local_date }} {{ appointment.start | local_time }}",
                "es": "{{ appointment.start | local_date }} {{ appointment.start | local_time }}",
            }
        }
    )
    assert templates.render(both, "sms", "es", ctx) == {"text": "viernes 13 de marzo 14:00"}
    english_only = TemplateConfig.model_validate(
        {"sms": {"en": "{{ appointment.start | local_date }} {{ appointment.start | local_time }}"}}
    )
    assert templates.render(english_only, "sms", "es", ctx) == {"text": "Fri Mar 13 2:00 PM"}


def test_a_wait_counts_from_when_its_event_happened_not_when_it_arrived() -> None:
    from datetime import timedelta

    from orchestrator.playbooks import Ctx, Schedule, on_event
    from orchestrator.state import JourneyState

    pb = PlaybookConfig.model_validate(
        {
            "on": "encounter.discharged",
            "steps": [
                {"wait_for": "discharge_instructions.delivered", "timeout": "48h", "on_timeout": "escalate"}
            ],
        }
    )
    discharged = datetime(2026, 3, 2, 15, tzinfo=UTC)
    for arrived in (discharged, discharged + timedelta(days=30)):  # on time, and a month late
        ctx = Ctx(JourneyState(), arrived, "Encounter/e1", "encounter.discharged", discharged)
        [wait] = on_event("discharge-survey", pb, ctx)
        assert isinstance(wait, Schedule) and wait.due_at == discharged + timedelta(hours=48)
