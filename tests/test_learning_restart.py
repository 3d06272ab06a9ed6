"""Learned state lives in the store (issue 10): a new engine, session and orchestrator on
the same database pick up where the last one left off."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from careloop import config as cfgmod
from careloop.clock import utc
from careloop.db import make_engine
from careloop.replay import Replayer
from careloop.tables import Decision, LearningStat, OutboxItem
from tests.conftest import PG_URL
from tests.test_learning_replay import CONFIG, START, WHO, _line, _rounds


def _reopen(engine: Engine) -> Engine:
    """A new engine on the same database (the same file, or the same PostgreSQL schema)."""
    if engine.dialect.name == "sqlite":
        return make_engine(engine.url.render_as_string(hide_password=False))
    with engine.connect() as c:
        schema = c.execute(text("select current_schema()")).scalar_one()
    assert PG_URL
    return make_engine(PG_URL, schema=schema)


def _stats(engine: Engine) -> dict[tuple[str, str, str, str], tuple[float, float, int, int]]:
    with Session(engine) as s:
        return {
            (r.scope, r.scope_key, r.dimension, r.option): (r.successes, r.failures, r.trials, r.engaged)
            for r in s.exec(select(LearningStat)).all()
        }


def test_learned_preference_survives_a_restart(engine: Engine) -> None:
    rp, sent = _rounds(engine, 8, replies_on="email")
    before = _stats(engine)
    last_at = max(utc(i.created_at) for i in sent)
    rp.close()
    engine.dispose()

    again = _reopen(engine)
    try:
        assert _stats(again) == before and before
        at = START + timedelta(days=20)
        assert at > last_at
        rp2 = Replayer(cfgmod.load(CONFIG), start=at, engine=again)
        asyncio.run(
            rp2.signal(
                _line(at, id="after-restart", type="crm.offer.eligible", attributes={"product": "p-r"}, **WHO)
            )
        )
        with Session(again) as s:
            dec = s.exec(
                select(Decision)
                .where(col(Decision.action).in_(["send", "defer"]), Decision.playbook == "discount-offer")
                .order_by(col(Decision.id).desc())
            ).first()
            assert dec is not None and utc(dec.decided_at) == at
            ch = dec.detail["learning"]["dims"]["channel"]
            emails = sum(1 for i in sent if i.channel == "email")
            assert ch["person"]["email"] == [emails, emails]  # the history came back from the store
            assert ch["greedy"] == "email" and ch["p_best"]["email"] > 0.9
            n_out = len(s.exec(select(OutboxItem)).all())
        rp2.close()
        assert n_out >= len(sent)
    finally:
        again.dispose()
