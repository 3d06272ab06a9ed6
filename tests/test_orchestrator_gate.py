"""The compliance gate as a pure function: each rule, with its reason code."""

from __future__ import annotations

from datetime import UTC, datetime, time

import pytest

from orchestrator.gate import Cap, ChannelFacts, GateInput, PersonFacts, evaluate, next_allowed

SMS = ChannelFacts("sms", "phone", "sms", "none")
EMAIL = ChannelFacts("email", "email", "email", "limited")
NOON_NY = datetime(2026, 3, 2, 17, 0, tzinfo=UTC)  # 12:00 in New York


def person(**kw: object) -> PersonFacts:
    base: dict[str, object] = dict(
        deceased=False,
        timezone="America/New_York",
        addresses={"phone": ["+15555550101"], "email": ["p@example.test"]},
        opted_out=frozenset(),
    )
    base.update(kw)
    return PersonFacts(**base)  # type: ignore[arg-type]


def gate(**kw: object) -> GateInput:
    base: dict[str, object] = dict(
        now=NOON_NY,
        person=person(),
        template_kinds=frozenset({"sms", "email", "text"}),
        phi_class="none",
        purpose="appointment-reminder",
        channels=[SMS, EMAIL],
        caps={"sms": Cap(1, 3)},
    )
    base.update(kw)
    return GateInput(**base)  # type: ignore[arg-type]


def test_allowed_send_picks_first_channel() -> None:
    v = evaluate(gate())
    assert (v.outcome, v.channel, v.recipient) == ("send", "sms", "+15555550101")
    assert v.allowed == ("sms", "email")


@pytest.mark.parametrize(
    "kw,reason",
    [
        ({"person": person(deceased=True)}, "deceased"),
        ({"person": person(open_escalations=1)}, "escalation-open"),
        ({"person": person(identity_held=True)}, "identity-unresolved"),
    ],
)
def test_person_level_refusals(kw: dict[str, object], reason: str) -> None:
    v = evaluate(gate(**kw))
    assert (v.outcome, v.reason) == ("suppress", reason)


def test_opt_out_for_sms_falls_back_to_email() -> None:
    v = evaluate(gate(person=person(opted_out=frozenset({("sms", "*")}))))
    assert v.channel == "email"
    assert v.tried == (("sms", "opted-out"),)


def test_opt_out_of_everything_suppresses() -> None:
    v = evaluate(gate(person=person(opted_out=frozenset({("*", "*")}))))
    assert (v.outcome, v.reason) == ("suppress", "opted-out")


def test_opt_out_per_purpose_leaves_other_purposes() -> None:
    p = person(opted_out=frozenset({("sms", "marketing")}))
    assert evaluate(gate(person=p, purpose="marketing", channels=[SMS])).reason == "opted-out"
    assert evaluate(gate(person=p, channels=[SMS])).outcome == "send"


def test_minimum_necessary_keeps_clinical_detail_off_sms() -> None:
    v = evaluate(gate(phi_class="limited"))
    assert v.channel == "email"
    assert v.tried == (("sms", "phi-exceeds-channel"),)
    assert evaluate(gate(phi_class="full")).reason == "phi-exceeds-channel"


def test_frequency_cap_per_day_and_week() -> None:
    assert evaluate(gate(channels=[SMS], sent_day={"sms": 1})).reason == "frequency-cap"
    assert evaluate(gate(channels=[SMS], sent_week={"sms": 3})).reason == "frequency-cap"
    assert evaluate(gate(channels=[SMS], sent_week={"sms": 2})).outcome == "send"


def test_quiet_hours_defer_to_local_opening() -> None:
    late = datetime(2026, 3, 3, 3, 30, tzinfo=UTC)  # 22:30 in New York
    v = evaluate(gate(now=late))
    assert (v.outcome, v.reason) == ("defer", "quiet-hours")
    assert v.deliver_at == datetime(2026, 3, 3, 13, 0, tzinfo=UTC)


def test_quiet_hours_respect_recipient_zone_not_site() -> None:
    # 06:30 in Los Angeles is 09:30 in New York: the Californian waits, the New Yorker does not.
    t = datetime(2026, 3, 2, 14, 30, tzinfo=UTC)
    assert evaluate(gate(now=t, person=person(timezone="America/Los_Angeles"))).outcome == "defer"
    assert evaluate(gate(now=t)).outcome == "send"


def test_quiet_hours_past_useful_life_is_suppressed() -> None:
    late = datetime(2026, 3, 3, 3, 30, tzinfo=UTC)
    v = evaluate(gate(now=late, not_after=datetime(2026, 3, 3, 12, 0, tzinfo=UTC)))
    assert (v.outcome, v.reason) == ("suppress", "quiet-hours-past-useful-life")


def test_no_address_and_no_template() -> None:
    v = evaluate(gate(person=person(addresses={}), channels=[SMS, EMAIL]))
    assert v.reason == "no-address"
    v = evaluate(gate(template_kinds=frozenset({"email"}), channels=[SMS]))
    assert v.reason == "no-template-for-channel"


def test_next_allowed_across_dst_change() -> None:
    # The night clocks spring forward in New York (2026-03-08): the window opens at 08:00 EDT = 12:00 UTC.
    t = datetime(2026, 3, 8, 5, 0, tzinfo=UTC)
    assert next_allowed(t, "America/New_York", (time(8), time(21))) == datetime(2026, 3, 8, 12, 0, tzinfo=UTC)
