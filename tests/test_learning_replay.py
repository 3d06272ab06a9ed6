"""End to end (issue 10): the learner inside the real pipeline, driven by replay on a
virtual clock, with outcomes fed back as journey events."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from careloop import config as cfgmod
from careloop.clock import utc
from careloop.explain import timeline
from careloop.replay import FeedLine, Replayer
from careloop.tables import Decision, LearningStat, OutboxItem, OutreachOutcome, Timer
from tests.conftest import FIXTURES
from tests.kernel_plugins import register

register()
CONFIG = FIXTURES / "config" / "learning-test.yaml"
WHO = {"mrn": "MRN-L1", "phone": "+15555550171", "email": "pat.l1@example.test"}
START = datetime.fromisoformat("2026-03-02T14:00:00+00:00")  # 09:00 in New York


def _line(at: datetime, **body: Any) -> FeedLine:
    doc = {"at": at.isoformat(), **body}
    return FeedLine(utc(at), "feed", json.dumps(doc).encode(), {})


def _rounds(
    engine: Engine, n: int, replies_on: str | None, config: cfgmod.AppConfig | None = None
) -> tuple[Replayer, list[OutboxItem]]:
    """``n`` offers a day apart; the person answers only messages on ``replies_on``."""
    rp = Replayer(config or cfgmod.load(CONFIG), start=START, engine=engine)
    sent: list[OutboxItem] = []

    async def go() -> None:
        # Offers are marketing: the person's opt-in is on record first (the gate's no-consent rule).
        consent = {"channel": "*", "purpose": "marketing"}
        await rp.signal(_line(START, id="opt-in", type="consent.granted", attributes=consent, **WHO))
        for i in range(n):
            at = START + timedelta(days=i)
            await rp.advance(at)
            await rp.signal(
                _line(at, id=f"o{i}", type="crm.offer.eligible", attributes={"product": f"p-{i}"}, **WHO)
            )
            await rp.advance(at + timedelta(hours=20))  # a deferred window opens within 12 h
            with Session(engine) as s:
                item = s.exec(
                    select(OutboxItem)
                    .where(OutboxItem.playbook == "discount-offer")
                    .order_by(col(OutboxItem.id).desc())
                ).first()
            assert item is not None and (not sent or item.id != sent[-1].id), f"round {i}: nothing sent"
            sent.append(item)
            if item.channel == replies_on:
                reply_at = utc(item.created_at) + timedelta(hours=1)
                await rp.advance(reply_at)
                await rp.signal(
                    _line(
                        reply_at,
                        id=f"r{i}",
                        type="message.inbound",
                        attributes={"channel": replies_on, "body": "yes please"},
                        **WHO,
                    )
                )

    asyncio.run(go())
    return rp, sent


def _decision_for(engine: Engine, item: OutboxItem) -> dict[str, Any]:
    with Session(engine) as s:
        dec = s.get(Decision, item.decision_id)
        assert dec is not None
        return dict(dec.detail["learning"])


def test_person_who_only_replies_to_email_gets_email_after_a_few_sends(engine: Engine) -> None:
    rp, sent = _rounds(engine, 14, replies_on="email")
    try:
        channels = [i.channel for i in sent]
        first = _decision_for(engine, sent[0])
        assert first["dims"]["channel"]["p_best"] == {"sms": 0.5, "email": 0.5}  # started from the prior
        assert "no history yet" in first["explain"]
        assert channels[-6:].count("email") >= 5, channels
        with Session(engine) as s:
            last = s.exec(
                select(Decision)
                .where(Decision.action == "send", Decision.playbook == "discount-offer")
                .order_by(col(Decision.id).desc())
            ).first()
            assert last is not None
            ch = last.detail["learning"]["dims"]["channel"]
            assert ch["greedy"] == "email" and ch["probs"]["email"] >= 0.79
            replied = s.exec(
                select(OutreachOutcome).where(col(OutreachOutcome.replied_at).is_not(None))
            ).all()
            assert replied and {r.channel for r in replied} == {"email"}
            assert all(r.reward == 1.0 and r.learned for r in replied)
    finally:
        rp.close()


def test_every_learned_send_logs_its_propensity_and_explanation(engine: Engine) -> None:
    rp, sent = _rounds(engine, 4, replies_on="email")
    try:
        with Session(engine) as s:
            for item in sent:
                dec = s.get(Decision, item.decision_id)
                assert dec is not None and dec.propensity is not None and 0.0 < dec.propensity <= 1.0
                info = dec.detail["learning"]
                assert info["channel"] == item.channel
                joint = 1.0
                for d in info["dims"].values():
                    joint *= d["probs"][d["chosen"]]
                assert abs(joint - dec.propensity) < 1e-5
                assert "P(best)=" in info["explain"]
                out = s.exec(select(OutreachOutcome).where(OutreachOutcome.outbox_key == item.key)).one()
                assert out.decision_id == dec.id and out.propensity == dec.propensity
            rows = timeline(s, sent[0].person_id)
            assert any("P(best)=" in why for _, kind, _, why in rows if kind == "send")
    finally:
        rp.close()


def test_later_window_goes_through_a_deferred_timer_and_the_gate_again(engine: Engine) -> None:
    rp, _ = _rounds(engine, 8, replies_on=None)
    try:
        with Session(engine) as s:
            defers = s.exec(
                select(Decision).where(Decision.action == "defer", Decision.reason == "learning-window")
            ).all()
            assert defers, "some choice waited for a later window"
            for d in defers:
                t = s.exec(
                    select(Timer).where(
                        Timer.created_by_event == d.event_id, Timer.playbook == "discount-offer"
                    )
                ).one()
                assert (
                    t.payload["kind"] == "deferred"
                    and t.payload["learning"]["window"] == d.detail["learning"]["window"]
                )
                assert t.status == "fired"
                # the send it became carries the same choice and propensity
                sent_dec = s.exec(
                    select(Decision).where(Decision.timer_id == t.id, Decision.action == "send")
                ).one()
                assert sent_dec.channel == d.channel and sent_dec.propensity == d.propensity
                local = utc(sent_dec.decided_at).astimezone(
                    __import__("zoneinfo").ZoneInfo("America/New_York")
                )
                assert 8 <= local.hour < 21
    finally:
        rp.close()


def test_stats_count_trials_and_rewards_at_every_pooling_level(engine: Engine) -> None:
    rp, sent = _rounds(engine, 6, replies_on="email")
    try:
        with Session(engine) as s:
            stats = {(r.scope, r.dimension, r.option): r for r in s.exec(select(LearningStat)).all()}
            n_email = sum(1 for i in sent if i.channel == "email")
            for scope in ("population", "segment", "person"):
                assert stats[(scope, "channel", "email")].trials == n_email
                assert stats[(scope, "channel", "email")].engaged == n_email
                total = sum(r.trials for (sc, dim, _), r in stats.items() if sc == scope and dim == "window")
                assert total == len(sent)
    finally:
        rp.close()


def test_outcomes_join_receipts_confirmation_and_attendance_to_the_reminder(engine: Engine) -> None:
    appt = {"id": "a-l1", "start": "2026-03-12T15:00:00+00:00", "end": "2026-03-12T15:30:00+00:00"}
    rp = Replayer(cfgmod.load(CONFIG), start=START, engine=engine)

    async def go() -> None:
        await rp.signal(_line(START, id="b1", type="appointment.booked", appointment=appt, **WHO))
        await rp.advance(datetime.fromisoformat("2026-03-09T23:00:00+00:00"))  # the 72 h reminder went
        with Session(engine) as s:
            item = s.exec(select(OutboxItem)).one()
        t = utc(item.created_at) + timedelta(minutes=5)
        for n, kind in enumerate(["message.delivered", "message.read", "message.read"]):  # a duplicate too
            await rp.advance(t + timedelta(minutes=n))
            await rp.signal(
                _line(t + timedelta(minutes=n), id=f"s{n}", type=kind, attributes={"key": item.key}, **WHO)
            )
        t2 = t + timedelta(hours=3)
        await rp.advance(t2)
        await rp.signal(_line(t2, id="c1", type="appointment.confirmed", appointment=appt, **WHO))
        t3 = datetime.fromisoformat("2026-03-12T16:00:00+00:00")
        await rp.advance(t3)
        await rp.signal(
            _line(
                t3, id="f1", type="appointment.fulfilled", appointment={**appt, "status": "fulfilled"}, **WHO
            )
        )

    try:
        asyncio.run(go())
        with Session(engine) as s:
            out = s.exec(
                select(OutreachOutcome).where(OutreachOutcome.template == "appointment-reminder")
            ).one()
            prep = s.exec(select(OutreachOutcome).where(OutreachOutcome.template == "appointment-prep")).one()
            assert prep.attended_at is not None and prep.confirmed_at is None  # sent after the confirmation
            dec = s.get(Decision, out.decision_id)
            assert dec is not None and dec.template == "appointment-reminder" and dec.propensity is not None
            assert out.delivered_at and out.read_at and out.confirmed_at and out.attended_at
            assert out.replied_at is None and out.reward == 1.0 and out.learned
            person_var = s.exec(
                select(LearningStat).where(
                    LearningStat.scope == "person",
                    LearningStat.dimension == "variant",
                    LearningStat.option == "appointment-reminder/default",
                )
            ).one()
            assert person_var.trials == 1 and person_var.engaged == 1
            assert person_var.successes == pytest.approx(1.0, rel=1e-2)  # decayed a little (60-day half-life)
            assert person_var.failures == pytest.approx(0.0, abs=1e-9)
    finally:
        rp.close()
