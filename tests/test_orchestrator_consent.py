"""Marketing goes only with an opt-in on record (the gate's ``no-consent`` rule): TCPA asks
for prior express written consent before a marketing text, HIPAA for an authorization.
The pure gate with plain values, the config section, and the shipped example config
through replay (CRM consent and offers, a Twilio STOP, on SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from careloop import config as cfgmod
from careloop.config import AppConfig
from careloop.errors import ConfigError
from careloop.replay import Replayer, build_report, read_feed
from careloop.tables import AuditRecord, Consent
from orchestrator.gate import ChannelFacts, GateInput, PersonFacts, evaluate
from tests.conftest import FIXTURES

NOW = datetime(2026, 3, 4, 15, 0, tzinfo=UTC)  # 10:00 in New York
SMS = ChannelFacts("sms", "phone", "sms", "none")
EMAIL = ChannelFacts("email", "email", "email", "limited")


def _person(
    opted_in: dict[tuple[str, str], datetime] | None = None,
    opted_out: frozenset[tuple[str, str]] = frozenset(),
) -> PersonFacts:
    return PersonFacts(
        deceased=False,
        timezone="America/New_York",
        addresses={"phone": ["+15555550100"], "email": ["pat@example.test"]},
        opted_out=opted_out,
        opted_in=opted_in or {},
    )


def _gate(person: PersonFacts, purpose: str = "marketing", **kw: Any) -> GateInput:
    base: dict[str, Any] = {
        "now": NOW,
        "person": person,
        "template_kinds": frozenset({"sms", "email"}),
        "phi_class": "none",
        "purpose": purpose,
        "channels": [SMS, EMAIL],
    }
    return GateInput(**{**base, **kw})


# ------------------------------------------------------------------------------ the pure gate


def test_marketing_without_an_opt_in_is_refused_on_every_channel() -> None:
    v = evaluate(_gate(_person()))
    assert (v.outcome, v.reason, v.allowed) == ("suppress", "no-consent", ())
    assert v.tried == (("sms", "no-consent"), ("email", "no-consent"))


def test_treatment_and_operations_purposes_need_no_opt_in() -> None:
    for purpose in ("appointment-reminder", "appointment-prep", "care-coordination"):
        v = evaluate(_gate(_person(), purpose=purpose))
        assert (v.outcome, v.channel) == ("send", "sms"), purpose


def test_opt_in_is_per_channel_and_must_name_the_purpose() -> None:
    email_only = _person({("email", "marketing"): NOW - timedelta(days=1)})
    v = evaluate(_gate(email_only))
    assert (v.outcome, v.channel, v.tried) == ("send", "email", (("sms", "no-consent"),))
    for key in (("sms", "marketing"), ("*", "marketing")):
        v = evaluate(_gate(_person({key: NOW - timedelta(days=1)})))
        assert (v.outcome, v.channel, v.allowed) == (
            "send",
            "sms",
            ("sms",) if key[0] == "sms" else ("sms", "email"),
        )
    # A blanket opt-in (START, a Consent without a purpose) is not consent to marketing.
    for key in (("sms", "*"), ("*", "*")):
        v = evaluate(_gate(_person({key: NOW - timedelta(days=1)})))
        assert (v.outcome, v.reason) == ("suppress", "no-consent")


def test_an_opt_in_for_another_purpose_does_not_count() -> None:
    v = evaluate(_gate(_person({("sms", "survey"): NOW - timedelta(days=1)})))
    assert (v.outcome, v.reason) == ("suppress", "no-consent")


def test_opt_out_wins_over_an_opt_in() -> None:
    both = _person({("sms", "marketing"): NOW}, opted_out=frozenset({("sms", "*")}))
    v = evaluate(_gate(both, channels=[SMS]))
    assert (v.outcome, v.reason) == ("suppress", "opted-out")


def test_opt_in_older_than_the_max_age_no_longer_counts() -> None:
    age = timedelta(days=365)
    fresh = _person({("sms", "marketing"): NOW - age})  # exactly the max age: still valid
    assert evaluate(_gate(fresh, opt_in_max_age=age)).outcome == "send"
    stale = _person({("sms", "marketing"): NOW - age - timedelta(seconds=1)})
    assert evaluate(_gate(stale, opt_in_max_age=age)).reason == "no-consent"
    assert evaluate(_gate(stale)).outcome == "send"  # no max age: never expires
    # The newest matching opt-in is the one that counts.
    renewed = _person({("sms", "marketing"): NOW - 2 * age, ("*", "marketing"): NOW - timedelta(days=3)})
    assert evaluate(_gate(renewed, opt_in_max_age=age)).channel == "sms"


def test_purposes_needing_an_opt_in_come_from_the_input() -> None:
    assert evaluate(_gate(_person(), opt_in_required=frozenset())).outcome == "send"
    v = evaluate(_gate(_person(), purpose="survey", opt_in_required=frozenset({"survey", "marketing"})))
    assert v.reason == "no-consent"


def test_replies_are_held_to_the_opt_in_rule_too() -> None:
    v = evaluate(_gate(_person(), mode="reply"))
    assert v.reason == "no-consent"


# ------------------------------------------------------------------------------ configuration


def test_compliance_defaults_require_an_opt_in_for_marketing_only() -> None:
    cfg = cfgmod.load(FIXTURES / "config" / "example.yaml")
    assert cfg.compliance.opt_in_required == ["marketing"]
    assert cfg.compliance.opt_in_max_age_days is None


def test_config_check_names_bad_opt_in_fields(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("compliance:\n  opt_in_required: [marketing, '*', marketing]\n  opt_in_max_age_days: 0\n")
    with pytest.raises(ConfigError) as err:
        cfgmod.load(path)
    problems = "\n".join(err.value.problems)
    assert "compliance.opt_in_required:" in problems and "'*' is not a purpose name" in problems
    assert "compliance.opt_in_max_age_days:" in problems
    path.write_text("compliance:\n  opt_in_required: marketing\n")
    with pytest.raises(ConfigError) as err:
        cfgmod.load(path)
    assert any(p.startswith("compliance.opt_in_required:") for p in err.value.problems)
    path.write_text("compliance:\n  opt_in_required: [marketing, marketing]\n")
    with pytest.raises(ConfigError) as err:
        cfgmod.load(path)
    assert err.value.problems == ["compliance.opt_in_required: lists a purpose twice"]


# ------------------------------------------------------------------------------ replay

EXAMPLE = FIXTURES / "config" / "example.yaml"
CONTACT = {"mrn": "NW200001", "phone": "+15555550141", "email": "pat.sample@example.org"}


def _crm(at: str, eid: str, etype: str, **data: str) -> str:
    body = {"id": eid, "type": etype, "occurred_at": at, "contact": CONTACT, "data": data}
    return json.dumps({"at": at, "connector": "crm", "body": body})


def _offer(at: str, eid: str, product: str) -> str:
    return _crm(at, eid, "offer.eligible", product=product)


def _sms(at: str, sid: int, text: str) -> str:
    body = {
        "From": CONTACT["phone"],
        "To": "+15555550199",
        "Body": text,
        "MessageSid": f"SM{sid:032d}",
        "AccountSid": "AC" + "0" * 32,
    }
    return json.dumps({"at": at, "connector": "sms", "body": body})


def _replay(cfg: AppConfig, engine: Engine, tmp_path: Path, lines: list[str]) -> dict[str, Any]:
    feed = tmp_path / "feed.jsonl"
    feed.write_text("\n".join(lines) + "\n")
    parsed = read_feed(feed)
    rp = Replayer(cfg, start=parsed[0].at, engine=engine)
    try:
        asyncio.run(rp.feed(parsed))
        return build_report(rp.store)
    finally:
        rp.close()


def _offers(rep: dict[str, Any]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    sent = [(d["at"], d["channel"]) for d in rep["deliveries"] if d["template"] == "discount-offer"]
    refused = [(s["at"], s["reason"]) for s in rep["suppressed"] if s["template"] == "discount-offer"]
    return sent, refused


def test_offer_goes_only_between_opt_in_and_stop(engine: Engine, tmp_path: Path) -> None:
    rep = _replay(
        cfgmod.load(EXAMPLE),
        engine,
        tmp_path,
        [
            _offer("2026-03-02T10:00:00-05:00", "evt_o1", "dental-plan"),  # no consent on record
            _crm(
                "2026-03-03T09:00:00-05:00", "evt_c1", "consent.granted", channel="sms", purpose="marketing"
            ),
            _offer("2026-03-03T10:00:00-05:00", "evt_o2", "vision-plan"),
            _sms("2026-03-05T09:00:00-05:00", 1, "STOP"),
            _offer("2026-03-06T10:00:00-05:00", "evt_o3", "hearing-plan"),
        ],
    )
    sent, refused = _offers(rep)
    assert sent == [("2026-03-03T15:00:00+00:00", "sms")]
    # Before the opt-in: no-consent on both channels (an SMS opt-in does not cover email).
    # After STOP: opted-out on SMS wins, and email still has no opt-in.
    assert refused == [
        ("2026-03-02T15:00:00+00:00", "no-consent"),
        ("2026-03-06T15:00:00+00:00", "opted-out"),
    ]
    with Session(engine) as s:
        rows = {(c.channel, c.purpose, c.status) for c in s.exec(select(Consent)).all()}
    assert rows == {("sms", "marketing", "opt_in"), ("sms", "*", "opt_out")}


def test_opt_in_older_than_max_age_is_refused_until_renewed(engine: Engine, tmp_path: Path) -> None:
    base = cfgmod.load(EXAMPLE)
    cfg = base.model_copy(
        update={"compliance": base.compliance.model_copy(update={"opt_in_max_age_days": 30})}
    )
    granted = {"channel": "*", "purpose": "marketing"}
    rep = _replay(
        cfg,
        engine,
        tmp_path,
        [
            _crm("2026-03-01T09:00:00-05:00", "evt_c1", "consent.granted", **granted),
            _offer("2026-03-10T10:00:00-04:00", "evt_o1", "dental-plan"),  # 9 days old: goes
            _offer("2026-04-02T10:00:00-04:00", "evt_o2", "vision-plan"),  # 32 days old: refused
            _crm("2026-04-03T09:00:00-04:00", "evt_c2", "consent.granted", **granted),
            _offer("2026-04-03T10:00:00-04:00", "evt_o3", "hearing-plan"),  # renewed: goes
        ],
    )
    sent, refused = _offers(rep)
    assert sent == [("2026-03-10T14:00:00+00:00", "sms"), ("2026-04-03T14:00:00+00:00", "sms")]
    assert refused == [("2026-04-02T14:00:00+00:00", "no-consent")]
    # The refusal is recorded like every other: a decision with its reason, and in the audit log.
    with Session(engine) as s:
        audited = [
            r.detail
            for r in s.exec(select(AuditRecord).where(AuditRecord.action == "decision.suppress")).all()
        ]
    assert [(d["template"], d["reason"]) for d in audited] == [("discount-offer", "no-consent")]
