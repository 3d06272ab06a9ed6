"""The learner's joint model (``learning.model: belief``, orchestrator/belief.py): what one
person's outcomes do to the belief, the link fitted from logged sends, and the model end to
end through the orchestrator on both engines (the choices stay among the gate's allowed
options, the belief is rebuilt from the store after a restart). Synthetic people only."""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from careloop import config as cfgmod
from careloop.config import LearningConfig
from careloop.tables import Decision, OutreachOutcome, Person
from orchestrator import belief, learning, ope
from tests.test_learning_replay import CONFIG, _rounds
from tests.test_learning_restart import _reopen

WINDOWS = ("morning", "midday", "evening")
T0 = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)
KEY = "offer/default"


def _pool() -> belief.Pool:
    return belief.Pool(7, 400, WINDOWS)


def _uniform(p: belief.Pool) -> list[float]:
    return [1.0 / p.n] * p.n


def _sends(n: int, channel: str, window: str, response: str, **kw: object) -> list[belief.Observed]:
    return [
        belief.Observed(T0 + timedelta(days=7 * i), channel, window, KEY, response, **kw)  # type: ignore[arg-type]
        for i in range(n)
    ]


def _mean(p: belief.Pool, w: list[float], channel: str, window: str) -> float:
    return sum(x * q for x, q in zip(w, p.q(channel, window, KEY), strict=True))


def test_the_pool_is_the_same_for_every_process_with_the_same_seed() -> None:
    a, b = belief.Pool(7, 50, WINDOWS), belief.Pool(7, 50, WINDOWS)
    assert a.q("sms", "evening", "offer/short") == b.q("sms", "evening", "offer/short")
    assert a.active == b.active
    assert belief.Pool(8, 50, WINDOWS).rate("sms") != a.rate("sms")


def test_replies_on_one_channel_and_silence_on_the_other_move_the_belief() -> None:
    p, link = _pool(), belief.Link()
    history = _sends(6, "email", "morning", "reply") + _sends(6, "sms", "morning", "none")
    w = belief.belief(p, _uniform(p), history, link, 1 / 365, T0 + timedelta(days=60))
    before = _uniform(p)
    assert _mean(p, w, "email", "morning") > 2 * _mean(p, before, "email", "morning")
    assert _mean(p, w, "sms", "morning") < _mean(p, before, "sms", "morning")
    options = {(c, "morning", KEY): "morning" for c in ("sms", "email")}
    a = belief.assess(p, w, options, link, 0.3)
    assert a.p_best[("email", "morning", KEY)] > 0.95


def test_when_the_channel_they_answered_on_goes_quiet_their_attention_may_have_moved() -> None:
    """Months of SMS replies with email untried, then SMS silence: a model in which attention
    moves between channels (``exchange_per_day``) expects their email to have taken SMS's
    place, and turns to it sooner than one that only forgets toward the prior."""
    p, link = _pool(), belief.Link()
    replied = _sends(10, "sms", "morning", "reply")
    quiet = [
        dataclasses.replace(o, at=o.at + timedelta(days=200)) for o in _sends(3, "sms", "morning", "none")
    ]
    now = quiet[-1].at + timedelta(days=1)
    options = {(c, "morning", KEY): "morning" for c in ("sms", "email")}

    def p_email(exchange: float) -> float:
        w = belief.belief(p, _uniform(p), replied + quiet, link, 1 / 365, now, exchange, ["email", "sms"])
        return belief.assess(p, w, options, link, 0.3).p_best[("email", "morning", KEY)]

    still = belief.belief(
        p, _uniform(p), replied, link, 1 / 365, T0 + timedelta(days=70), 1 / 365, ["email", "sms"]
    )
    assert belief.assess(p, still, options, link, 0.3).p_best[("sms", "morning", KEY)] > 0.9  # before
    assert p_email(1 / 365) > p_email(0.0) + 0.05  # 0.74 against 0.63
    assert p_email(1 / 365) > 0.7


def test_late_responses_place_the_person_in_the_window_they_came_in() -> None:
    p, link = _pool(), belief.Link()
    late = _sends(4, "sms", "morning", "read", late=True, seen="evening")
    prompt = _sends(4, "sms", "morning", "read")
    w_late = belief.belief(p, _uniform(p), late, link, 1 / 365, T0 + timedelta(days=30))
    w_prompt = belief.belief(p, _uniform(p), prompt, link, 1 / 365, T0 + timedelta(days=30))
    assert belief.active_share(p, w_late, "evening") > 0.9
    assert belief.active_share(p, w_prompt, "morning") > belief.active_share(p, _uniform(p), "morning")
    assert belief.active_share(p, w_prompt, "evening") < 0.2


def test_the_belief_relaxes_toward_the_prior_as_time_passes() -> None:
    p, link = _pool(), belief.Link()
    history = _sends(5, "email", "midday", "reply")
    soon = belief.belief(p, _uniform(p), history, link, 1 / 365, T0 + timedelta(days=30))
    later = belief.belief(p, _uniform(p), history, link, 1 / 365, T0 + timedelta(days=2000))
    prior = _mean(p, _uniform(p), "email", "midday")
    assert _mean(p, soon, "email", "midday") > _mean(p, later, "email", "midday") > prior


def test_the_segments_means_tilt_a_new_persons_prior() -> None:
    p, link = _pool(), belief.Link()
    lent = {("sms", "morning", KEY): 0.05, ("email", "morning", KEY): 0.5}
    w = belief.prior(p, lent, 4.0, link, 0.3)
    assert _mean(p, w, "email", "morning") > _mean(p, _uniform(p), "email", "morning")
    assert _mean(p, w, "email", "morning") > _mean(p, w, "sms", "morning")


@pytest.mark.parametrize("true", [belief.Link(0.2, 2.0, 0.95, 0.6), belief.Link(0.4, 0.5, 0.9, 0.2)])
def test_the_link_is_fitted_from_logged_predictions_and_what_came(true: belief.Link) -> None:
    rng = random.Random(3)
    settled = []
    for _ in range(6000):
        q, p_active = rng.uniform(0.02, 0.4), rng.random()
        u = rng.random()
        response = "reply" if u < q else ("read" if u < true.p_any(q) else "none")
        active = rng.random() < p_active
        late = response != "none" and not active and rng.random() < true.late
        settled.append(belief.Settled(q, p_active, response, late))
    fit = belief.fit_link(settled)
    assert fit.n == 6000
    assert fit.floor == pytest.approx(true.floor, abs=0.05)
    assert fit.slope == pytest.approx(true.slope, abs=0.5)
    assert fit.late == pytest.approx(true.late, abs=0.08)
    assert belief.fit_link(settled[:100]) == belief.Link()  # too few: the generic link


@pytest.mark.parametrize("where", [0.1, 1.0])
def test_where_late_responses_land_is_fitted_and_when_it_says_nothing_they_move_nothing(where: float) -> None:
    rng = random.Random(5)
    settled = []
    for _ in range(3000):
        shares = [rng.random() ** 3 for _ in WINDOWS]  # what a decision predicted of each window
        shares = [x / sum(shares) for x in shares]
        active = rng.choices(range(len(WINDOWS)), weights=shares)[0]  # its predictions are calibrated
        seen = active if rng.random() >= where else rng.randrange(len(WINDOWS))
        p_active, late = rng.random(), rng.random() < 0.3
        settled.append(belief.Settled(0.2, p_active, "read", late, shares[seen] if late else None))
    fit = belief.fit_link(settled, windows=len(WINDOWS))
    assert fit.where == pytest.approx(where, abs=0.08)
    p = _pool()
    history = _sends(4, "sms", "morning", "read", late=True, seen="evening")
    link = dataclasses.replace(belief.Link(), where=fit.where)
    w = belief.belief(p, _uniform(p), history, link, 1 / 365, T0 + timedelta(days=30))
    if where == 1.0:  # late responses come anywhere: where they came says (almost) nothing
        assert belief.active_share(p, w, "evening") < 0.6
    else:
        assert belief.active_share(p, w, "evening") > 0.8


# --------------------------------------------------------------------------- end to end


def _config() -> cfgmod.AppConfig:
    base = cfgmod.load(CONFIG)
    return base.model_copy(update={"learning": base.learning.model_copy(update={"model": "belief"})})


def _learned(engine: Engine) -> list[dict[str, object]]:
    with Session(engine) as s:
        decs = s.exec(
            select(Decision).where(Decision.playbook == "discount-offer").order_by(col(Decision.id))
        ).all()
        return [dict(d.detail["learning"]) for d in decs if d.detail and "learning" in d.detail]


def test_the_belief_learns_the_persons_channel_within_the_gate(engine: Engine) -> None:
    rp, sent = _rounds(engine, 10, replies_on="email", config=_config())
    rp.close()
    infos = _learned(engine)
    assert infos and all("belief" in i for i in infos)
    for info in infos:  # every choice among the options the gate allowed, with an exact propensity
        dims = info["dims"]
        assert isinstance(dims, dict)
        assert info["channel"] in dims["channel"]["options"]
        assert 0 < float(str(info["propensity"])) <= 1
    last = infos[-1]
    assert isinstance(last["belief"], dict) and last["belief"]["history"] >= 5
    assert last["dims"]["channel"]["greedy"] == "email"  # type: ignore[index]
    assert sum(1 for i in sent[-4:] if i.channel == "email") >= 3


def test_the_belief_is_rebuilt_from_the_store_after_a_restart(engine: Engine) -> None:
    rp, _ = _rounds(engine, 8, replies_on="email", config=_config())
    rp.close()
    before = _learned(engine)[-1]
    engine.dispose()
    again = _reopen(engine)
    try:
        cfg = _config().learning
        with Session(again) as s:
            [pid] = {d.person_id for d in s.exec(select(Decision)).all() if d.person_id is not None}
            now = datetime.fromisoformat(str(before["at"]))
            hist = learning.history(s, pid, now, cfg, "America/New_York")
        assert hist and {o.channel for o in hist} <= {"sms", "email"}
        assert any(o.response == "reply" and o.channel == "email" for o in hist)
        assert all(o.response == "none" for o in hist if o.channel == "sms")
    finally:
        again.dispose()


def test_belief_config_is_validated() -> None:
    with pytest.raises(ValueError, match="model"):
        LearningConfig.model_validate({"model": "crystal-ball"})


# --------------------------------------------------------------------------- from the review

TZ = "America/New_York"


def _logged_sends(
    engine: Engine,
    sends: list[tuple[datetime, datetime | None]],
    said: dict[str, object],
    tz: str | None = None,
) -> None:
    """One person's learned SMS sends (each: sent at, read at or None), every decision
    having predicted ``said`` (``learning.belief`` in its detail)."""
    with Session(engine) as s:
        p = Person(created_at=T0, timezone=tz)
        s.add(p)
        s.flush()
        assert p.id is not None
        for i, (at, read) in enumerate(sends):
            d = Decision(person_id=p.id, decided_at=at, playbook="x", action="send", reason="ok")
            d.detail = {"learning": {"belief": said}}
            s.add(d)
            s.flush()
            s.add(
                OutreachOutcome(
                    decision_id=d.id,
                    outbox_key=f"k{p.id}-{i}",
                    person_id=p.id,
                    channel="sms",
                    template="offer",
                    sent_at=at,
                    updated_at=at,
                    learned=True,
                    read_at=read,
                )
            )
        s.commit()


def _fill(engine: Engine, n: int, read_from: int) -> datetime:
    """``n`` learned sends an hour apart; those from ``read_from`` on read 10 minutes later."""
    at = [T0 + timedelta(hours=i) for i in range(n)]
    reads = [t + timedelta(minutes=10) if i >= read_from else None for i, t in enumerate(at)]
    _logged_sends(engine, list(zip(at, reads, strict=True)), {"q": 0.1, "p_active": 0.5})
    return T0 + timedelta(hours=n)


@pytest.mark.parametrize(
    ("came_in", "tz", "expect"),
    [
        ("morning", "UTC", (0.0, 0.2)),
        ("evening", "UTC", (0.8, 1.0)),
        ("morning", "America/New_York", (0.0, 0.2)),  # read on the person's clock, not UTC's
        ("evening", "America/New_York", (0.8, 1.0)),
    ],
)
def test_the_store_refit_learns_where_late_responses_land(
    engine: Engine, came_in: str, tz: str, expect: tuple[float, float]
) -> None:
    """Each decision predicted the person active in the morning (logged as ``active``); their
    sends are read a day later, in their morning (as predicted) or their evening (as if late
    responses came anywhere): the refit's ``where`` says which."""
    cfg = LearningConfig.model_validate({"enabled": True, "model": "belief", "refit_every": 50})
    hour = {"morning": 10, "evening": 19}[came_in]
    zone = ZoneInfo(tz)
    sends: list[tuple[datetime, datetime | None]] = []
    for i in range(300):
        at = (T0 + timedelta(days=i)).astimezone(zone).replace(hour=13).astimezone(UTC)  # their midday
        next_day = (at + timedelta(days=1)).astimezone(zone)
        sends.append((at, next_day.replace(hour=hour, minute=30).astimezone(UTC) if i % 3 == 0 else None))
    said = {"q": 0.1, "p_active": 0.05, "active": {"morning": 0.9, "midday": 0.05, "evening": 0.05}}
    _logged_sends(engine, sends, said, tz)
    with Session(engine) as s:
        link = learning.LinkCache().get(s, cfg, "UTC")  # the site's; the person's own wins
    assert link.n > 200 and expect[0] <= link.where <= expect[1]


def test_where_counts_a_late_response_as_news_of_a_window_other_than_the_one_sent_in() -> None:
    """Sends follow the belief (its most likely window, as with no exploration) and every late
    response comes in the person's active window (true where 0): a late response means the
    send's window was not the active one, so what its decision predicted of the window it
    came in is read given that (``seen_share``), and the fit finds where small, not 1."""
    rng, settled = random.Random(5), []
    for _ in range(3000):
        shares = [rng.random() ** 3 for _ in WINDOWS]
        shares = [x / sum(shares) for x in shares]
        active = rng.choices(range(len(WINDOWS)), weights=shares)[0]  # calibrated predictions
        sent = max(range(len(WINDOWS)), key=lambda i: shares[i])
        late = active != sent and rng.random() < 0.3
        o = belief.Observed(T0, "sms", WINDOWS[sent], KEY, "read", late, WINDOWS[active] if late else None)
        seen = belief.seen_share(dict(zip(WINDOWS, shares, strict=True)), o)
        settled.append(belief.Settled(0.2, shares[sent], "read", late, seen))
    assert belief.fit_link(settled, windows=len(WINDOWS)).where <= 0.1


def test_workers_that_refit_at_different_moments_fit_the_same_link(engine: Engine) -> None:
    cfg = LearningConfig.model_validate({"enabled": True, "model": "belief", "refit_every": 50})
    end = _fill(engine, 400, read_from=352)
    a, b = learning.LinkCache(), learning.LinkCache()
    with Session(engine) as s:
        la = a.get(s, cfg, "UTC")  # worker A, right after the 400th send
    with Session(engine) as s:  # days later, reads of the early sends come in (stamped then)
        for row in s.exec(select(OutreachOutcome).where(col(OutreachOutcome.id) <= 60)).all():
            row.read_at = end + timedelta(days=3)
        s.commit()
    with Session(engine) as s:
        lb = b.get(s, cfg, "UTC")  # worker B, or A after a restart
    assert a.boundary == b.boundary == 400 and la.n > 0
    assert la == lb


def test_a_new_link_drops_the_old_links_vectors() -> None:
    p = belief.Pool(0, 400, WINDOWS)
    old, new = belief.Link(), belief.Link(floor=0.25, n=1000)
    for ch in ("sms", "email"):
        p.reward(ch, "morning", KEY, old, 0.3)
        belief.likelihood(p, belief.Observed(T0, ch, "morning", KEY, "none"), old)
    assert p.recall(old, ("reward", "sms", "morning", KEY, 0.3)) is not None
    p.reward("sms", "morning", KEY, new, 0.3)  # the first decision after a refit
    assert p.recall(new, ("reward", "email", "morning", KEY, 0.3)) is None  # the old link's are gone
    assert p.recall(new, ("reward", "sms", "morning", KEY, 0.3)) is not None


def test_the_later_of_two_overlapping_windows_can_win() -> None:
    cfg = LearningConfig.model_validate(
        {
            "enabled": True,
            "model": "belief",
            "windows": {"early": "08:00", "late": "10:00"},
            "window_hours": 3,
        }
    )
    now = datetime(2026, 3, 2, 13, 30, tzinfo=UTC)  # 08:30 in New York
    wins = learning.window_options(now, now, TZ, cfg)
    assert set(wins) == {"early", "late"}
    # replies only ever came to the sends at 10:00 local (window "late", inside "early"'s hours
    # too), none to those at 08:00
    hist = []
    for i in range(12):
        day = now - timedelta(days=40 - 3 * i)
        hist.append(belief.Observed(day.replace(hour=15), "sms", "late", "offer/default", "reply"))
        hist.append(belief.Observed(day.replace(hour=13), "sms", "early", "offer/default", "none"))
    c = learning.choose(
        learning.MemoryStats(cfg),
        person_key="1",
        segment="*",
        channels=["sms"],
        windows=wins,
        variants_for=lambda c: [],
        template="offer",
        rng=random.Random(0),
        cfg=cfg,
        tz=TZ,
        model=learning.Model(hist, belief.Link(), 0.3),
    )
    assert c.dims["window"].p_best["late"] > 0.9


def test_offline_evaluation_reads_the_belief_models_joint_best_as_its_greedy() -> None:
    cfg = LearningConfig.model_validate({"enabled": True, "model": "belief", "max_exploration": 1.0})
    now = datetime(2026, 3, 2, 13, 30, tzinfo=UTC)  # 08:30 in New York
    wins = learning.window_options(now, now, TZ, cfg)
    hist = [
        belief.Observed(now - timedelta(days=7 * k), "email", "evening", "offer/default", "reply")
        for k in range(1, 7)
    ]
    logged = set()
    for seed in range(40):  # exploration on: the channel drawn varies, the joint best does not
        c = learning.choose(
            learning.MemoryStats(cfg),
            person_key="1",
            segment="*",
            channels=["sms", "email"],
            windows=wins,
            variants_for=lambda c: ["default", "short"],
            template="offer",
            rng=random.Random(seed),
            cfg=cfg,
            tz=TZ,
            model=learning.Model(hist, belief.Link(), 0.3),
        )
        info = c.to_json()
        unit = ope.unit_from({"learning": info}, c.propensity, 0.0, seed)
        assert unit is not None and info["belief"]["greedy"] == list(unit.greedy.values())
        logged.add((c.channel, tuple(unit.greedy.values())))
    assert {channel for channel, _ in logged} == {"sms", "email"}  # both were drawn
    assert {greedy for _, greedy in logged} == {("email", "evening", "default")}
    # the dims' window greedy is the best given the channel drawn; offline evaluation takes the
    # joint best even where the two differ
    info["dims"]["window"]["greedy"] = "morning"
    unit = ope.unit_from({"learning": info}, c.propensity, 0.0, 0)
    assert unit is not None and unit.greedy["window"] == "evening"
