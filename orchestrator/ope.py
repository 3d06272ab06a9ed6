"""Offline policy evaluation (issue 10): what would another policy have earned on the sends
the learner logged, before anyone switches it on.

Each logged unit is one learned send: the options the gate allowed and the learner saw
(per dimension: channel, window, variant), the probability it gave each, the option it
took with its propensity, and the reward its outcomes earned (orchestrator/outcomes.py).
A target policy maps that context to a distribution over (channel, window, variant).

- IPS: mean of pi(a|x)/p(a|x) * r. Unbiased when p > 0 wherever pi > 0 (the learner's
  ``min_propensity`` floor guarantees it for every allowed option).
- SNIPS: IPS divided by the mean weight (a little biased, much less variance).
- DR (doubly robust): mean of sum_a pi(a|x) q(x,a) + pi(a|x)/p(a|x) * (r - q(x,a)), with q a
  reward model fitted on the log (means per segment and option, shrunk toward the option's
  mean over everyone, then toward the overall mean), cross-fitted on two folds so a unit's
  own reward never sits in its own model. Unbiased if either the propensities or q is right.

Standard errors are the per-unit spread / sqrt(n); ``ess`` is the effective sample size of
the importance weights ((sum w)^2 / sum w^2).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from careloop.clock import utc
from careloop.tables import Decision, OutreachOutcome

Action = tuple[str, str, str]  # channel, window, variant
DIMS = ("channel", "window", "variant")


@dataclass(frozen=True, slots=True)
class Logged:
    options: dict[str, tuple[str, ...]]  # dimension -> the options offered, in the logged order
    probs: dict[str, dict[str, float]]  # dimension -> option -> logged probability
    greedy: dict[str, str]  # dimension -> the posterior-mean best at the time
    action: Action
    propensity: float
    reward: float
    segment: str = "*"
    key: int = 0  # for cross-fitting folds

    def actions(self) -> list[Action]:
        return list(itertools.product(*(self.options[d] for d in DIMS)))  # type: ignore[arg-type]


Policy = Callable[[Logged], dict[Action, float]]


def logging_policy(u: Logged) -> dict[Action, float]:
    return {a: math.prod(u.probs[d][o] for d, o in zip(DIMS, a, strict=True)) for a in u.actions()}


def greedy_policy(u: Logged) -> dict[Action, float]:
    return {(u.greedy["channel"], u.greedy["window"], u.greedy["variant"]): 1.0}


def uniform_policy(u: Logged) -> dict[Action, float]:
    acts = u.actions()
    return {a: 1.0 / len(acts) for a in acts}


def fixed_policy(u: Logged) -> dict[Action, float]:
    """The gate's preference order, the earliest window (as without learning), default wording."""
    return {
        (
            u.options["channel"][0],
            u.options["window"][0],
            "default" if "default" in u.options["variant"] else u.options["variant"][0],
        ): 1.0
    }


def prefer(dimension: str, option: str) -> Policy:
    """``fixed``, except ``option`` on ``dimension`` whenever it was allowed."""
    idx = DIMS.index(dimension)

    def pi(u: Logged) -> dict[Action, float]:
        (a,) = fixed_policy(u)
        if option in u.options[dimension]:
            a = (*a[:idx], option, *a[idx + 1 :])  # type: ignore[assignment]
        return {a: 1.0}

    return pi


def policy_named(name: str) -> Policy:
    """logged | greedy | uniform | fixed | channel:<id> | window:<name> | variant:<name>."""
    named: dict[str, Policy] = {
        "logged": logging_policy,
        "greedy": greedy_policy,
        "uniform": uniform_policy,
        "fixed": fixed_policy,
    }
    if name in named:
        return named[name]
    dim, _, opt = name.partition(":")
    if dim in DIMS and opt:
        return prefer(dim, opt)
    raise ValueError(
        f"unknown policy {name!r} (logged, greedy, uniform, fixed, channel:ID, window:NAME, variant:NAME)"
    )


class RewardModel:
    """Mean reward per (segment, action), shrunk toward the action's mean, then the overall mean."""

    def __init__(self, units: Iterable[Logged], strength: float = 5.0) -> None:
        self.m = strength
        self.sums: dict[tuple[str, Action] | Action | str, tuple[float, int]] = {}
        total, n = 0.0, 0
        for u in units:
            for k in ((u.segment, u.action), u.action):
                s, c = self.sums.get(k, (0.0, 0))
                self.sums[k] = (s + u.reward, c + 1)
            total, n = total + u.reward, n + 1
        self.overall = total / n if n else 0.0

    def __call__(self, segment: str, a: Action) -> float:
        s, c = self.sums.get(a, (0.0, 0))
        by_action = (s + self.m * self.overall) / (c + self.m)
        s2, c2 = self.sums.get((segment, a), (0.0, 0))
        return (s2 + self.m * by_action) / (c2 + self.m)


@dataclass(frozen=True, slots=True)
class Estimate:
    policy: str
    n: int
    ips: float
    ips_se: float
    snips: float
    dr: float
    dr_se: float
    ess: float
    logged_mean: float  # the rewards as they happened, for comparison


def _mean_se(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    if n == 0:
        return 0.0, 0.0
    mean = math.fsum(xs) / n
    if n == 1:
        return mean, 0.0
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n)


def evaluate(units: list[Logged], policy: Policy, name: str = "?") -> Estimate:
    if not units:
        return Estimate(name, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    folds = [[u for u in units if u.key % 2 == f] for f in (0, 1)]
    models = [RewardModel(folds[1]), RewardModel(folds[0])]  # each fold scored by the other's model
    ips_terms, dr_terms, weights = [], [], []
    for u in units:
        q = models[u.key % 2]
        pi = policy(u)
        w = pi.get(u.action, 0.0) / u.propensity
        weights.append(w)
        ips_terms.append(w * u.reward)
        direct = math.fsum(p * q(u.segment, a) for a, p in pi.items())
        dr_terms.append(direct + w * (u.reward - q(u.segment, u.action)))
    ips, ips_se = _mean_se(ips_terms)
    dr, dr_se = _mean_se(dr_terms)
    wsum = math.fsum(weights)
    snips = math.fsum(ips_terms) / wsum if wsum > 0 else 0.0
    ess = wsum * wsum / math.fsum(w * w for w in weights) if wsum > 0 else 0.0
    return Estimate(
        name, len(units), ips, ips_se, snips, dr, dr_se, ess, math.fsum(u.reward for u in units) / len(units)
    )


def unit_from(detail: Mapping[str, Any], propensity: float, reward: float, key: int) -> Logged | None:
    """A logged unit from a decision's ``detail["learning"]``; None if it lacks what OPE needs."""
    info = detail.get("learning")
    if not isinstance(info, dict) or not isinstance(info.get("dims"), dict) or info.get("fallback_from"):
        return None
    dims = info["dims"]
    try:
        options = {d: tuple(dims[d]["options"]) for d in DIMS}
        probs = {d: {str(k): float(v) for k, v in dims[d]["probs"].items()} for d in DIMS}
        greedy = {d: str(dims[d]["greedy"]) for d in DIMS}
        joint = (info.get("belief") or {}).get("greedy")  # learning.model belief: the joint best
        if isinstance(joint, list) and len(joint) == len(DIMS):
            greedy = {d: str(v) for d, v in zip(DIMS, joint, strict=True)}
        action = (str(info["channel"]), str(info["window"]), str(info["variant"]))
    except (KeyError, TypeError, ValueError):
        return None
    return Logged(options, probs, greedy, action, propensity, reward, str(info.get("segment") or "*"), key)


def load(s: Session, *, until: datetime, since: datetime | None = None) -> list[Logged]:
    """Learned sends decided in [since, until) with a propensity, and their rewards so far."""
    q = (
        select(Decision, OutreachOutcome.reward)
        .join(OutreachOutcome, col(OutreachOutcome.decision_id) == col(Decision.id), isouter=True)
        .where(
            Decision.action == "send", col(Decision.propensity).is_not(None), col(Decision.decided_at) < until
        )
        .order_by(col(Decision.id))
    )
    if since is not None:
        q = q.where(col(Decision.decided_at) >= since)
    out: list[Logged] = []
    for dec, reward in s.exec(q).all():
        assert dec.propensity is not None and dec.id is not None
        u = unit_from(dec.detail, dec.propensity, float(reward or 0.0), dec.id)
        if u is not None:
            out.append(u)
    return out


def settled_before(now: datetime, hours: float) -> datetime:
    """Decisions older than this have had their reply window: their rewards are final."""
    return utc(now) - timedelta(hours=hours)
