"""Triage as pure functions: tiers, negation, intents, response patterns, the policy plan,
the config model, and the gate's reply and safety modes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from careloop.errors import ConfigError
from orchestrator import gate
from orchestrator.triage import (
    History,
    Inbound,
    TriageConfig,
    assess,
    check_config,
    load_lexicon,
    plan,
)

NOW = datetime(2026, 3, 5, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    "text,tier",
    [
        ("I have chest pain", "emergency"),
        ("No, I have chest pain", "emergency"),
        ("no I have chest pain", "emergency"),
        ("CHEST PAAAIN", "emergency"),
        ("i cant stop bleeding", "emergency"),
        ("no puedo respirar", "emergency"),
        ("No, tengo dolor de pecho", "emergency"),
        ("no chest pain", None),
        ("I don't have any chest pain", None),
        ("sin dolor de pecho", None),
        ("no tengo dolor de pecho", None),
        ("chest pain is gone", None),
        ("no chest pain but my calf is swollen", "urgent"),
        ("fiebre alta desde ayer", "urgent"),
        ("need a refill", "routine"),
        ("I'm dying to see the new office", None),
    ],
)
def test_red_flag_tier_respects_negation_in_both_languages(text: str, tier: str | None) -> None:
    assert assess(text, now=NOW).tier == tier


@pytest.mark.parametrize(
    "text,tier",
    [
        ("doing well today, thanks", None),  # "doing" is one edit from "dying"
        ("cooking dinner, will call back", None),  # ... "cooking" from "choking"
        ("we painted the nursery this weekend", None),  # ... "painted" from "fainted"
        ("i feel like im dyng", "emergency"),  # a real typo is still caught
        ("my chets hurts", "emergency"),
        ("im chokng", "emergency"),
    ],
)
def test_ordinary_words_are_not_read_as_typos_of_red_flags(text: str, tier: str | None) -> None:
    assert assess(text, now=NOW).tier == tier


@pytest.mark.parametrize(
    "text,tier",
    [
        ("the form asks about chest pain, is that for me or family history?", "urgent"),
        ("adding my family history of stroke", "urgent"),
        ("family hx: dad had a stroke", "emergency"),  # the colon starts a clause: not dampened
        ("el formulario pregunta si he tenido convulsiones", "urgent"),
        ("my chest pain is back, filling out the form now", "emergency"),  # another clause
        ("I have chest pain", "emergency"),
    ],
)
def test_a_red_flag_about_a_form_or_history_reaches_staff_without_a_911_reply(text: str, tier: str) -> None:
    assert assess(text, now=NOW).tier == tier


def test_negated_rule_is_reported_as_negated_not_matched() -> None:
    a = assess("no chest pain today", now=NOW)
    assert a.rules == () and "em.chest-pain" in a.negated


@pytest.mark.parametrize(
    "text,keyword,intent",
    [
        ("C", "confirm", "confirm"),
        ("yes 👍", None, "confirm"),
        ("Sí, confirmo", None, "confirm"),
        ("cancel my appt please", None, "cancel"),
        ("no voy a poder ir", None, "cancel"),
        ("can I reschedule for next week", None, "reschedule"),
        ("STOP", "stop", "opt_out"),
        ("please stop texting me", None, "opt_out"),
        ("HELP", "help", "help"),
        ("where do I park?", None, "question"),
        ("worst clinic ever 😡", None, "complaint"),
        ("cancel, I have chest pain", None, "clinical_concern"),
        ("thanks", None, "other"),
    ],
)
def test_intent_by_rules(text: str, keyword: str | None, intent: str) -> None:
    assert assess(text, keyword=keyword, now=NOW).intent == intent


def test_long_message_with_yes_is_not_a_confirmation() -> None:
    # Single-word reply terms count only in a short reply.
    a = assess("yes the pharmacy told me to ask you about the dose", now=NOW)
    assert a.intent != "confirm"


def test_response_patterns_from_history() -> None:
    hist = History(
        inbound=[
            Inbound(NOW - timedelta(minutes=4), "what time is it?"),
            Inbound(NOW - timedelta(minutes=2), "hello"),
        ],
        last_outbound_at=NOW - timedelta(days=1),
    )
    a = assess("WHY IS NOBODY ANSWERING???", now=NOW, history=hist)
    assert {"pattern.burst", "pattern.unanswered-question", "pattern.punctuation", "pattern.shouting"} <= set(
        a.patterns
    )
    assert a.intent == "complaint"


def test_question_answered_since_is_not_unanswered() -> None:
    hist = History(
        inbound=[Inbound(NOW - timedelta(hours=3), "what time is it?")],
        last_outbound_at=NOW - timedelta(hours=1),
    )
    assert "pattern.unanswered-question" not in assess("ok", now=NOW, history=hist).patterns


def test_sentiment_is_vader_compound() -> None:
    assert assess("This is terrible and I am furious", now=NOW).sentiment < -0.5
    assert assess("Thank you so much, wonderful staff", now=NOW).sentiment > 0.5


def test_plan_emergency_escalates_and_sends_safety_reply_whatever_the_config() -> None:
    cfg = TriageConfig(severity={"emergency": "emergency", "urgent": None, "routine": None})
    p = plan(assess("chest pain", now=NOW), cfg)
    assert p.escalate == ("emergency", "red-flag-emergency") and p.safety_reply


def test_plan_tiers_follow_configured_thresholds() -> None:
    quiet = TriageConfig(severity={"emergency": "emergency", "urgent": "urgent", "routine": None})
    p = plan(assess("need a refill", now=NOW), quiet)
    assert p.escalate is None and p.watch_silence
    bumped = TriageConfig(severity={"emergency": "emergency", "urgent": "emergency", "routine": "routine"})
    p2 = plan(assess("fever of 103", now=NOW), bumped)
    assert p2.escalate == ("emergency", "red-flag-urgent") and not p2.safety_reply


def test_plan_stop_is_opt_out_without_escalation_or_reply() -> None:
    p = plan(assess("STOP", keyword="stop", now=NOW), TriageConfig(), "stop")
    assert p == type(p)()


def test_plan_help_replies_and_confirm_derives() -> None:
    assert plan(assess("HELP", keyword="help", now=NOW), TriageConfig(), "help").help_reply
    assert plan(assess("C", keyword="confirm", now=NOW), TriageConfig(), "confirm").derive == "confirm"
    assert plan(assess("cancel", keyword="cancel", now=NOW), TriageConfig(), "cancel").derive == "cancel"


def test_config_cannot_switch_emergency_off() -> None:
    with pytest.raises(ValueError, match=r"severity\.emergency"):
        TriageConfig(severity={"emergency": None, "urgent": "urgent", "routine": "routine"})


def test_config_check_names_unknown_templates_channels_and_bad_fields(tmp_path: Path) -> None:
    raw = {
        "routes": [{"channel": "pager", "kind": "email", "to": "x@example.test"}],
        "sla": {"urgent": "soon"},
    }
    problems = check_config(raw, tmp_path, set(), {"sms"})
    assert any(p.startswith("triage.sla") for p in problems)
    problems = check_config({"routes": [{"channel": "pager", "kind": "webhook"}]}, tmp_path, set(), {"sms"})
    assert "triage.safety_reply: unknown template 'safety-reply'" in problems
    assert "triage.routes.0.channel: unknown channel 'pager'" in problems


def test_wiring_check_reports_triage_problems(tmp_path: Path) -> None:
    from careloop import config as cfgmod
    from careloop.wiring import check

    p = tmp_path / "c.yaml"
    p.write_text("triage: {lexicon: missing.yaml, max_level: 99}\n")
    with pytest.raises(ConfigError) as exc:
        check(cfgmod.load(p))
    assert any(x.startswith("triage.max_level") for x in exc.value.problems)


def test_bad_lexicon_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "lex.yaml"
    bad.write_text("version: x\nrules: []\n")
    with pytest.raises(ValueError, match=r"triage lexicon lex\.yaml"):
        load_lexicon(bad)


def test_lexicon_is_versioned() -> None:
    assert load_lexicon().version
    assert assess("chest pain", now=NOW).lexicon_version == load_lexicon().version


# ----------------------------------------------------------------------------- gate modes

SMS = gate.ChannelFacts("sms", "phone", "sms", "none")


def _inp(mode: str, **person: object) -> gate.GateInput:
    facts = {
        "deceased": False,
        "timezone": "America/New_York",
        "addresses": {"phone": ["+15555550101"]},
        "opted_out": frozenset(),
        "open_escalations": 1,
        "identity_held": False,
        **person,
    }
    return gate.GateInput(
        now=datetime(2026, 3, 5, 7, tzinfo=UTC),  # 02:00 in New York: quiet hours
        person=gate.PersonFacts(**facts),  # type: ignore[arg-type]
        template_kinds=frozenset({"sms"}),
        phi_class="none",
        purpose="safety",
        channels=[SMS],
        sent_day={"sms": 5},
        sent_week={"sms": 9},
        caps={"sms": gate.Cap(1, 3)},
        mode=mode,
    )


def test_safety_reply_passes_open_escalation_quiet_hours_caps_and_held_identity() -> None:
    v = gate.evaluate(_inp("safety", identity_held=True))
    assert (v.outcome, v.channel) == ("send", "sms")


def test_outreach_is_still_paused_by_open_escalation() -> None:
    assert gate.evaluate(_inp("outreach")).reason == "escalation-open"


def test_safety_reply_respects_deceased_and_opt_out() -> None:
    assert gate.evaluate(_inp("safety", deceased=True)).reason == "deceased"
    assert gate.evaluate(_inp("safety", opted_out=frozenset({("*", "*")}))).reason == "opted-out"


def test_safety_reply_must_carry_no_phi() -> None:
    v = gate.evaluate(replace(_inp("safety"), phi_class="limited"))
    assert v.reason == "safety-reply-not-phi-free"


def test_help_reply_mode_does_not_pass_held_identity() -> None:
    assert gate.evaluate(_inp("reply", identity_held=True)).reason == "identity-unresolved"
    assert gate.evaluate(_inp("reply")).outcome == "send"
