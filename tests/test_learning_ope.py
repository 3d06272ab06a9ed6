"""Offline policy evaluation (issue 10) on synthetic logs whose true answer is known."""

from __future__ import annotations

import math
import random
from datetime import timedelta

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from orchestrator import ope
from orchestrator.ope import Action, Logged

CHANNELS, WINDOWS, VARIANTS = ("sms", "email"), ("morning", "midday", "evening"), ("default", "short")


def _truth(segment: str, a: Action) -> float:
    base = {"young": {"sms": 0.35, "email": 0.10}, "old": {"sms": 0.08, "email": 0.30}}[segment][a[0]]
    when = (
        {"morning": 1.0, "midday": 0.7, "evening": 0.5}[a[1]]
        if segment == "old"
        else {"morning": 0.5, "midday": 0.7, "evening": 1.0}[a[1]]
    )
    return base * when * (1.1 if a[2] == "short" else 1.0)


def _log(n: int, seed: int) -> tuple[list[Logged], list[dict[Action, float]]]:
    """A logging policy with random (floored) probabilities per dimension; returns the units and,
    per unit, the true expected reward of every action in its context."""
    rng = random.Random(seed)
    units, truths = [], []
    for i in range(n):
        seg = rng.choice(["young", "old"])
        channels = CHANNELS if rng.random() < 0.8 else (rng.choice(CHANNELS),)
        options = {"channel": channels, "window": WINDOWS, "variant": VARIANTS}
        probs: dict[str, dict[str, float]] = {}
        for d, opts in options.items():
            raw = [rng.random() + 0.1 for _ in opts]
            probs[d] = {o: r / sum(raw) for o, r in zip(opts, raw, strict=True)}
        action = tuple(
            rng.choices(list(probs[d]), weights=list(probs[d].values()))[0]
            for d in ("channel", "window", "variant")
        )
        p = math.prod(probs[d][o] for d, o in zip(("channel", "window", "variant"), action, strict=True))
        reward = 1.0 if rng.random() < _truth(seg, action) else 0.0  # type: ignore[arg-type]
        greedy = {"channel": channels[0], "window": "morning", "variant": "short"}
        u = Logged(options, probs, greedy, action, p, reward, seg, i)  # type: ignore[arg-type]
        units.append(u)
        truths.append({a: _truth(seg, a) for a in u.actions()})
    return units, truths


@pytest.mark.parametrize("name", ["fixed", "channel:email", "greedy", "uniform", "window:evening"])
def test_ips_and_dr_recover_the_true_value_of_a_policy(name: str) -> None:
    units, truths = _log(20_000, seed=7)
    pi = ope.policy_named(name)
    true = sum(sum(p * t[a] for a, p in pi(u).items()) for u, t in zip(units, truths, strict=True)) / len(
        units
    )
    est = ope.evaluate(units, pi, name)
    assert abs(est.ips - true) < 4 * est.ips_se, (est, true)
    assert abs(est.dr - true) < 4 * est.dr_se, (est, true)
    assert abs(est.snips - true) < 0.02
    if name != "uniform":
        assert est.dr_se < est.ips_se  # the reward model takes out variance


def test_ips_of_the_logging_policy_is_the_logged_mean() -> None:
    units, _ = _log(5_000, seed=3)
    est = ope.evaluate(units, ope.logging_policy, "logged")
    assert est.ips == pytest.approx(est.logged_mean, rel=1e-9)
    assert est.ess == pytest.approx(len(units))


def test_policies_that_differ_get_told_apart() -> None:
    units, _ = _log(20_000, seed=11)
    young_sms = ope.evaluate([u for u in units if u.segment == "young"], ope.policy_named("channel:sms"))
    young_email = ope.evaluate([u for u in units if u.segment == "young"], ope.policy_named("channel:email"))
    assert young_sms.dr - young_email.dr > 4 * math.hypot(young_sms.dr_se, young_email.dr_se)


def test_unknown_policy_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        ope.policy_named("telepathy")


def test_units_load_from_logged_decisions_with_their_rewards(engine: Engine) -> None:
    from tests.test_learning_replay import _rounds

    rp, sent = _rounds(engine, 5, replies_on="email")
    try:
        with Session(engine) as s:
            last = max(i.created_at for i in sent)
            units = ope.load(s, until=last + timedelta(seconds=1))
        assert len(units) == len(sent)
        by_channel = {u.action[0]: u.reward for u in units}
        assert by_channel.get("email", 1.0) == 1.0 and by_channel.get("sms", 0.0) == 0.0
        est = ope.evaluate(units, ope.logging_policy, "logged")
        assert est.ips == pytest.approx(est.logged_mean)
    finally:
        rp.close()
