"""The learner never picks an option the compliance gate refused (issue 10): property tests,
on the pure choice and through the real orchestrator with learned preferences that push
toward refused channels."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from careloop import config as cfgmod
from careloop.clock import utc
from careloop.config import LearningConfig
from careloop.replay import FeedLine, Replayer
from careloop.tables import Consent, LearningStat, OutboxItem, Person, PersonIdentifier
from orchestrator import gate, learning
from tests.conftest import FIXTURES
from tests.kernel_plugins import register

register()
CONFIG = FIXTURES / "config" / "learning-test.yaml"
NY = ZoneInfo("America/New_York")
CHANNELS = ["sms", "email", "ehr"]
FACTS = {
    "sms": gate.ChannelFacts("sms", "phone", "sms", "none"),
    "email": gate.ChannelFacts("email", "email", "email", "limited"),
    "ehr": gate.ChannelFacts("ehr", "fhir", "fhir", "full"),
}


@st.composite
def gate_inputs(draw: st.DrawFn) -> gate.GateInput:
    addresses = {}
    if draw(st.booleans()):
        addresses["phone"] = ["+15555550100"]
    if draw(st.booleans()):
        addresses["email"] = ["x@example.test"]
    opted = draw(st.sets(st.sampled_from([("sms", "*"), ("email", "*"), ("*", "marketing"), ("*", "*")])))
    opted_in = draw(st.sets(st.sampled_from([("sms", "marketing"), ("email", "*"), ("*", "marketing")])))
    person = gate.PersonFacts(
        deceased=draw(st.booleans()),
        timezone="America/New_York",
        addresses=addresses,
        opted_out=frozenset(opted),
        open_escalations=draw(st.sampled_from([0, 0, 0, 1])),
        opted_in=dict.fromkeys(opted_in, datetime(2026, 3, 1, tzinfo=UTC)),
    )
    order = draw(st.permutations(CHANNELS))
    now = datetime(2026, 3, 2, tzinfo=UTC) + timedelta(minutes=draw(st.integers(0, 7 * 24 * 60)))
    return gate.GateInput(
        now=now,
        person=person,
        template_kinds=frozenset(
            draw(st.sets(st.sampled_from(["sms", "email", "fhir", "text"]), min_size=1))
        ),
        phi_class=draw(st.sampled_from(["none", "limited", "full"])),
        purpose="marketing",
        channels=[FACTS[c] for c in order],
        sent_day={"sms": draw(st.integers(0, 2)), "email": draw(st.integers(0, 2))},
        sent_week={"sms": draw(st.integers(0, 4))},
        caps={"sms": gate.Cap(1, 3)},
    )


@given(
    gate_inputs(),
    st.dictionaries(st.sampled_from(CHANNELS), st.tuples(st.floats(0, 500), st.floats(0, 500))),
    st.integers(0, 2**32),
    st.floats(0, 1),
    st.floats(0, 0.5),
)
@settings(max_examples=300, deadline=None)
def test_pure_choice_is_always_among_the_gates_allowed_channels(
    inp: gate.GateInput, prefs: dict[str, tuple[float, float]], seed: int, max_exp: float, floor: float
) -> None:
    cfg = LearningConfig(enabled=True, max_exploration=max_exp, min_propensity=floor, grid=64)
    verdict = gate.evaluate(inp)
    if verdict.outcome == "suppress":
        assert verdict.allowed == ()
        return
    stats = learning.MemoryStats(cfg)
    for ch, (s, f) in prefs.items():  # evidence for every channel, refused ones included
        cell = stats.cells.setdefault(("person", "p", "channel", ch), learning.MemoryStats.Cell())
        cell.successes, cell.failures = s, f
    windows = {"now": inp.now}
    choice = learning.choose(
        stats,
        person_key="p",
        segment="s",
        channels=list(verdict.allowed),
        windows=windows,
        variants_for=lambda c: ["default", "short"],
        template="t",
        rng=random.Random(seed),
        cfg=cfg,
    )
    assert choice.channel in verdict.allowed
    probs = choice.dims["channel"].probs
    assert set(probs) == set(verdict.allowed)
    assert abs(sum(probs.values()) - 1.0) < 1e-9
    assert min(probs.values()) >= min(floor, 1 / len(probs)) - 1e-12
    if len(probs) > 1 and floor * len(probs) <= 1:
        greedy = choice.dims["channel"].greedy
        assert 1 - probs[greedy] <= max_exp + floor * (len(probs) - 1) + 1e-9


# ---------------------------------------------------------------------------------- engine level


def _feed(at: datetime, **body: Any) -> FeedLine:
    return FeedLine(utc(at), "feed", json.dumps({"at": at.isoformat(), **body}).encode(), {})


@st.composite
def people(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "phone": draw(st.booleans()),
        "email": draw(st.booleans()),
        "opt_out": draw(st.sets(st.sampled_from(["sms", "email", "*"]), max_size=2)),
        "opt_in": draw(st.sampled_from([True, True, True, False])),  # marketing consent on record
        "deceased": draw(st.sampled_from([False, False, False, True])),
        "pref_sms": draw(st.floats(0.0, 1.0)),  # learned evidence that pushes toward a channel
        "hours": draw(st.lists(st.integers(0, 23), min_size=1, max_size=4)),  # local hour of each offer
        "minute": draw(st.integers(0, 59)),
    }


class _World:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.day = datetime(2026, 3, 2, tzinfo=NY)
        self.rp = Replayer(cfgmod.load(CONFIG), start=self.day.astimezone(UTC), engine=engine)
        self.n = 0


def _run_person(w: _World, p: dict[str, Any]) -> None:
    w.n += 1
    w.day += timedelta(days=10)  # the virtual clock only moves forward: each example gets its own days
    who: dict[str, Any] = {"mrn": f"MRN-G{w.n}"}
    if p["phone"]:
        who["phone"] = f"+1555556{w.n:04d}"
    if p["email"]:
        who["email"] = f"g{w.n}@example.test"
    rp = w.rp

    async def go() -> None:
        t0 = w.day.replace(hour=0, minute=1).astimezone(UTC)
        await rp.advance(t0)
        await rp.signal(_feed(t0, id=f"g{w.n}-hello", type="patient.updated", **who))
        with Session(w.engine) as s:  # learned evidence at every level, strongly for one channel
            pid = s.exec(select(PersonIdentifier.person_id).where(PersonIdentifier.value == who["mrn"])).one()
            for scope, key in (("person", str(pid)), ("population", "*")):
                for ch, share in (("sms", p["pref_sms"]), ("email", 1 - p["pref_sms"])):
                    row = s.exec(
                        select(LearningStat).where(
                            LearningStat.scope == scope,
                            LearningStat.scope_key == key,
                            LearningStat.dimension == "channel",
                            LearningStat.option == ch,
                        )
                    ).first()
                    row = row or LearningStat(
                        scope=scope, scope_key=key, dimension="channel", option=ch, updated_at=t0
                    )
                    row.successes, row.failures, row.updated_at = 40 * share, 40 * (1 - share), t0
                    s.add(row)
            s.commit()
        if p["opt_in"]:  # before any opt-out: a later STOP must still win
            await rp.signal(
                _feed(
                    t0,
                    id=f"g{w.n}-optin",
                    type="consent.granted",
                    attributes={"channel": "*", "purpose": "marketing"},
                    **who,
                )
            )
        for i, ch in enumerate(sorted(p["opt_out"])):
            t = t0 + timedelta(minutes=1 + i)
            await rp.advance(t)
            await rp.signal(
                _feed(
                    t,
                    id=f"g{w.n}-stop{i}",
                    type="consent.revoked",
                    attributes={"channel": ch, "purpose": "*"},
                    **who,
                )
            )
        if p["deceased"]:
            t = t0 + timedelta(minutes=5)
            await rp.advance(t)
            await rp.signal(_feed(t, id=f"g{w.n}-dead", type="patient.deceased", **who))
        for i, hour in enumerate(sorted(set(p["hours"]))):
            t = w.day.replace(hour=hour, minute=p["minute"]).astimezone(UTC)
            if t <= t0 + timedelta(minutes=10):
                t = t0 + timedelta(minutes=10 + i)
            await rp.advance(t)
            await rp.signal(
                _feed(
                    t,
                    id=f"g{w.n}-offer{i}",
                    type="crm.offer.eligible",
                    attributes={"product": f"p{i}"},
                    **who,
                )
            )
        await rp.advance(w.day.astimezone(UTC) + timedelta(days=3))

    asyncio.run(go())
    _check_invariants(w.engine, who["mrn"], p)


def _check_invariants(engine: Engine, mrn: str, p: dict[str, Any]) -> None:
    """Checked from the rules themselves, not by asking the gate again."""
    with Session(engine) as s:
        pid = s.exec(select(PersonIdentifier.person_id).where(PersonIdentifier.value == mrn)).one()
        person = s.get(Person, pid)
        assert person is not None
        items = s.exec(
            select(OutboxItem)
            .where(OutboxItem.person_id == pid, col(OutboxItem.status).not_in(["cancelled"]))
            .order_by(col(OutboxItem.created_at))
        ).all()
        opted = {
            c.channel
            for c in s.exec(
                select(Consent).where(Consent.person_id == pid, Consent.status == "opt_out")
            ).all()
        }
    if p["deceased"] or not p["opt_in"]:
        assert items == []
    sms_times: list[datetime] = []
    for item in items:
        at = utc(item.created_at)
        assert item.channel not in opted and "*" not in opted, "sent on an opted-out channel"
        assert (item.channel == "sms" and p["phone"]) or (item.channel == "email" and p["email"])
        local = at.astimezone(ZoneInfo(person.timezone or "America/New_York"))
        assert 8 <= local.hour < 21, f"sent at {local.time()} local, inside quiet hours"
        if item.channel == "sms":
            assert all(at - t >= timedelta(hours=24) for t in sms_times), "SMS daily cap broken"
            sms_times.append(at)


@given(st.lists(people(), min_size=1, max_size=2))
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_orchestrator_with_learning_never_sends_what_the_gate_refuses(
    engine: Engine, request: pytest.FixtureRequest, batch: list[dict[str, Any]]
) -> None:
    w = _world(engine, request)
    for p in batch:
        _run_person(w, p)


def test_strong_preference_for_an_opted_out_channel_still_gets_only_the_allowed_one(
    engine: Engine, request: pytest.FixtureRequest
) -> None:
    w = _world(engine, request)
    p = {
        "phone": True,
        "email": True,
        "opt_out": {"sms"},
        "opt_in": True,
        "deceased": False,
        "pref_sms": 1.0,
        "hours": [2, 10, 13, 22],
        "minute": 30,
    }
    _run_person(w, p)
    with Session(engine) as s:
        sent = s.exec(select(OutboxItem.channel)).all()
    assert sent and set(sent) == {"email"}


_WORLDS: dict[int, _World] = {}


def _world(engine: Engine, request: pytest.FixtureRequest) -> _World:
    if id(engine) not in _WORLDS:
        w = _WORLDS[id(engine)] = _World(engine)

        def close() -> None:
            w.rp.close()
            _WORLDS.pop(id(engine), None)

        request.addfinalizer(close)
    return _WORLDS[id(engine)]
