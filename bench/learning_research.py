"""Research tools for issue 10: what it takes to get near the oracle in bench/learning_sim.py's
world. RESEARCH, NOT THE PRODUCT LEARNER: nothing under careloop/ or orchestrator/ imports this
module; the product learner is orchestrator/learning.py (the sim's ``learner``), whose
``learning.model: belief`` (orchestrator/belief.py) was built from ``model`` below and shares
its link fit (``belief.fit_link``). Both
subcommands reuse learning_sim's world, policies and ``one_seed``/``run`` by import, so every
policy here is served the same requests, through the same compliance gate, on the same luck.

``ablate``: the sim's InformedBayes ceiling (told the world's generative model exactly),
parametrised (``Ablated``) so that one piece of its exact knowledge at a time can be replaced by
a generic one: the prior, the time-of-day spread, the read likelihood, the timing likelihood, the
drift model, the wording prior, greedy choice vs capped exploration (``Knobs``). At ``exact`` it
is InformedBayes, decision for decision. Measures what each piece of knowledge is worth: its
engagement after the learner's Nth decision, as a ratio to the oracle's.

``model``: a prototype model-based learner (``ModelLearner``). It reads none of the world's
constants (BASE, BANDS, PREFERRED_PART, PARTS, PART_HOURS, SHORT_TREND, SHORT_SD, DRIFT_HAZARD,
READ_FLOOR, READ_SLOPE, LATE, nor the spreads inside ``population``) and none of a person's
hidden fields; it sees what the orchestrator sees: the site's channels, windows, wording
variants and timezone, a person's birth date and language (for the segment), the gate's
allowed channels and windows, the send time, and each outcome's kind and time. What it assumes
is the problem's structure:
* engagement q(channel, window, variant) = r[channel] x w[window] x s[variant] per person
  (w = 1 in the person's active window, less elsewhere; s[default] = 1);
* a read/open is likelier the likelier a reply: P(read or reply) = min(c, a + b q), with
  (a, b, c) fitted from the logged outcomes;
* people respond when they are active: a response to a send in their active window is prompt,
  one to a send elsewhere is late with probability L (fitted) and then comes in the active one;
* preferences drift: at a generic hazard (1/365 per day) a person's state is redrawn from their
  segment's prior.
Beliefs are weights over one shared pool of candidate people drawn once from a broad generic
proposal; a segment's prior is that pool reweighted by empirical Bayes (the short wording's
effect by segment, ``fit_prior=wording``), refitted every ``refit_every`` outcomes with
(a, b, c) and L. It sends the posterior-mean best option; ``floor`` > 0 replaces each dimension
by a uniform draw with probability floor x k, so every allowed option keeps propensity >= floor.

Figures (300 people, 10,000 requests, after the learner's 5,000th decision, ratio to the
oracle's engagement, mean ± sd over seeds 11 22 33; the product learner, then beta, 0.833 ± 0.013;
since 2026-11-23 its default is the belief model, 0.882 ± 0.015):
  .venv/bin/python bench/learning_research.py ablate --variants exact prior=pooled prior=generic \
      tod=generic prior=generic,tod=generic reads=frac reads=ignore timing=ignore \
      reads=frac,timing=ignore drift=none drift=redraw drift=swap2x wording=generic explore=learner \
      prior=generic,tod=generic,reads=frac,timing=ignore,drift=redraw,wording=generic,explore=learner
    exact 0.913 ± 0.013; prior=pooled 0.917, prior=generic 0.912, tod=generic 0.916, both 0.911
    (the prior is worth nothing once outcomes arrive); reads=frac 0.883, reads=ignore 0.873,
    timing=ignore 0.862, reads=frac,timing=ignore 0.814 (the read and timing likelihoods are
    worth 3-5 points each, 10 together); drift=none 0.880, drift=redraw 0.903, drift=swap2x
    0.910; wording=generic 0.891; explore=learner 0.886 (at beta's exploration, cap 0.1 and
    floor 0.02; the belief model's defaults are now 0 and 0.005); all generic 0.779 ± 0.001
    (15 min).
  .venv/bin/python bench/learning_research.py model                   0.894 ± 0.009 (1 min)
  .venv/bin/python bench/learning_research.py model --set floor=0.02  0.882 ± 0.011
(``--jobs 2``, the default, runs seeds in parallel; the ablation at 300 particles takes several
minutes. Without arguments, as ``make bench`` runs it, the module runs ``model``.)
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import learning_sim as sim
from careloop.config import LearningConfig
from orchestrator import belief, gate, learning

Particle = tuple[dict[str, float], dict[str, float], dict[str, float]]  # rates, when, wording
OTHER = {"sms": "email", "email": "sms"}


def with_floor(
    option: sim.Option, choices: Sequence[Sequence[str]], floor: float, rng: random.Random
) -> tuple[sim.Option, float]:
    """Each dimension of ``option`` replaced by a uniform draw among its k ``choices`` with
    probability floor x k, so every choice keeps P >= floor; returns the option and its
    propensity given ``option``."""
    out, prop = list(option), 1.0
    for d, opts in enumerate(choices):
        k = len(opts)
        if k > 1:
            if rng.random() < floor * k:
                out[d] = rng.choice(opts)
            prop *= floor + (1.0 - floor * k) * (out[d] == option[d])
    return (out[0], out[1], out[2]), prop


# ---------------------------------------------------------------------- ablate


class Knobs(BaseModel):
    """What InformedBayes knows, piece by piece; the first value of each is the exact one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prior: Literal["exact", "pooled", "generic"] = Field(
        "exact",
        description="rates: by band and language | population-wide means | logit N(logit .2, 1), "
        "no one-channel mixture",
    )
    tod: Literal["exact", "generic"] = Field(
        "exact", description="active part by band, elsewhere x U(.35,.75) | any part, x U(.2, 1)"
    )
    reads: Literal["exact", "frac", "ignore"] = Field(
        "exact",
        description="P(read) = .25 + 2.5 q | the signal r (0, .3, 1) as q^r (1-q)^(1-r) | reads are no news",
    )
    timing: Literal["exact", "ignore"] = Field(
        "exact", description="late responses come in the active part | when a response came says nothing"
    )
    drift: Literal["swap", "none", "redraw", "swap2x", "swap05x"] = Field(
        "swap",
        description="SMS/email swap at the world's hazard | no drift | forget toward the prior, "
        "1/240 per day | swap at 2x or 0.5x the hazard",
    )
    wording: Literal["exact", "generic"] = Field(
        "exact", description="short wording by band trend, sd .05 | N(1, .1) for everyone"
    )
    explore: Literal["greedy", "learner"] = Field(
        "greedy",
        description="posterior-mean best | Thompson over the particles, capped at max_exploration, "
        "min_propensity floor per dimension (as the learner does)",
    )

    @classmethod
    def parse(cls, spec: str) -> Knobs:
        """``exact`` or comma-separated knob=value, e.g. ``prior=generic,tod=generic``."""
        if spec == "exact":
            return cls()
        pairs = (kv.partition("=") for kv in spec.split(","))
        return cls.model_validate({k: v for k, _, v in pairs})


def _pooled_mean(ch: str) -> float:
    """The population's mean base rate on a channel (bands and languages mixed, 20% Spanish)."""
    lang = 1.2 if ch == "sms" else 0.8
    return sum(
        w * sum(sim.BASE[band][ch] * f for f in (lang * 0.2, 0.8)) for band, (w, _) in sim.BANDS.items()
    )


DRIFT_SCALE = {"none": 0.0, "swap05x": 0.5, "swap": 1.0, "swap2x": 2.0}  # x the world's swap hazard


class Ablated(sim.InformedBayes):
    """InformedBayes with the pieces of knowledge ``spec`` names (Knobs) replaced; at ``exact`` it
    draws the same particles from the same random numbers and makes the same decisions."""

    def __init__(self, cfg: LearningConfig, seed: int, spec: str, particles: int = 300) -> None:
        super().__init__(cfg, seed, particles)
        self.name = spec
        self.knobs = Knobs.parse(spec)
        self.cfg = cfg

    def _rate_mean(self, p: sim.SimPerson, ch: str) -> float:
        if self.knobs.prior == "pooled":
            return _pooled_mean(ch)
        return sim.BASE[p.band][ch] * ((1.2 if ch == "sms" else 0.8) if p.lang == "es" else 1.0)

    def _particle(self, p: sim.SimPerson) -> Particle:
        rng, k = self.rng, self.knobs
        if k.prior == "generic":
            rates = {ch: sim._expit(sim._logit(0.2) + rng.gauss(0, 1.0)) for ch in sim.ORDER}
        else:
            rates = {
                ch: sim._expit(sim._logit(self._rate_mean(p, ch)) + rng.gauss(0, 0.9)) for ch in sim.ORDER
            }
            if rng.random() < 0.15:
                rates[rng.choice(sim.ORDER)] *= 0.1
        if k.tod == "exact":
            pref, lo, hi = rng.choices(sim.PARTS, weights=sim.PREFERRED_PART[p.band])[0], 0.35, 0.75
        else:
            pref, lo, hi = sim.PARTS[rng.randrange(len(sim.PARTS))], 0.2, 1.0
        when = {q: (1.0 if q == pref else rng.uniform(lo, hi)) for q in sim.PARTS}
        if k.wording == "exact":
            short = sim.short_wording(rng, p.band)
        else:
            short = max(0.6, min(1.4, rng.gauss(1.0, 0.1)))
        return rates, when, {"default": 1.0, "short": short}

    def _draw(self, p: sim.SimPerson) -> list[Particle]:
        if p.id not in self.particles:
            self.particles[p.id] = [self._particle(p) for _ in range(self.n)]
        return self.particles[p.id]

    def _belief(self, p: sim.SimPerson, at: datetime) -> tuple[list[float], list[float]]:
        drift = self.knobs.drift
        if p.id not in self.belief or drift == "swap":
            return super()._belief(p, at)
        then, b0, b1 = self.belief[p.id]
        if drift == "redraw":
            rho = 1.0 - math.exp(-max(0.0, (at - then).total_seconds() / 86400) / 240.0)
            return [x * (1 - rho) + rho / self.n for x in b0], [y * (1 - rho) for y in b1]
        # k x the hazard over a span is the hazard over k x that span
        return super()._belief(p, then + (at - then) * DRIFT_SCALE[drift])

    def choose(
        self,
        p: sim.SimPerson,
        now: datetime,
        allowed: list[str],
        windows: dict[str, datetime],
        verdict: gate.Verdict,
        rng: random.Random,
    ) -> sim.Option:
        best = super().choose(p, now, allowed, windows, verdict, rng)
        if self.knobs.explore == "greedy":
            return best
        # Thompson sampling over the (particle, swapped) states, capped as the learner caps it
        b0, b1 = self._belief(p, now)
        opts = [(c, wn, v) for c in allowed for wn in windows for v in sim.VARIANTS]
        part = {wn: sim.part_of_day(at) for wn, at in windows.items()}
        p_best = dict.fromkeys(opts, 0.0)
        for (r, w, va), x, y in zip(self._draw(p), b0, b1, strict=True):
            for weight, rates in ((x, r), (y, {c: r[OTHER[c]] for c in r})):
                if weight > 1e-12:
                    p_best[max(opts, key=lambda o: rates[o[0]] * w[part[o[1]]] * va[o[2]])] += weight
        total = sum(p_best.values())
        explore, cap = 1.0 - p_best[best] / total, self.cfg.max_exploration
        if explore <= cap:
            probs = {o: v / total for o, v in p_best.items()}
        else:
            probs = {o: (v / total) * cap / explore for o, v in p_best.items() if o != best}
            probs[best] = 1.0 - cap
        drawn = rng.choices(list(probs), weights=list(probs.values()))[0]
        return with_floor(drawn, (allowed, list(windows), sim.VARIANTS), self.cfg.min_propensity, rng)[0]

    def _response(self, q: float, reward: float) -> float:
        """P(this outcome | engagement probability q), by the read knob."""
        if self.knobs.reads == "frac":
            return float(q**reward * (1 - q) ** (1 - reward))
        read = min(0.95, sim.READ_FLOOR + sim.READ_SLOPE * q) if self.knobs.reads == "exact" else q
        return q if reward >= 1.0 else (read - q if reward > 0 else 1.0 - read)

    @staticmethod
    def _timing(when: dict[str, float], part: str, seen: str, prompt: bool) -> float:
        """P(a response to a send in ``part`` came when it did | the person's active part)."""
        if when[part] == 1.0:
            return 1.0 if prompt else 0.0
        return (1.0 - sim.LATE) if prompt else (sim.LATE if when[seen] == 1.0 else 0.0)

    def outcome(self, p: sim.SimPerson, opt: sim.Option, sent: datetime, at: datetime, reward: float) -> None:
        if self.knobs.reads == "ignore" and reward < 1.0:
            reward = 0.0
        then = max(sent, self.belief[p.id][0]) if p.id in self.belief else sent
        b0, b1 = self._belief(p, then)
        part, seen, prompt = sim.part_of_day(sent), sim.part_of_day(at), at - sent == timedelta(hours=1)
        timed = reward > 0 and self.knobs.timing == "exact"
        n0: list[float] = []
        n1: list[float] = []
        for (r, w, va), x, y in zip(self._draw(p), b0, b1, strict=True):
            fit = self._timing(w, part, seen, prompt) if timed else 1.0
            n0.append(x * (self._response(min(0.95, r[opt[0]] * w[part] * va[opt[2]]), reward) * fit))
            n1.append(y * (self._response(min(0.95, r[OTHER[opt[0]]] * w[part] * va[opt[2]]), reward) * fit))
        total = sum(n0) + sum(n1)
        if total <= 0:  # every particle ruled out: start again from the prior
            n0, n1, total = [1.0] * self.n, [0.0] * self.n, float(self.n)
        self.belief[p.id] = (then, [x / total for x in n0], [y / total for y in n1])


# ---------------------------------------------------------------------- model


class ModelOptions(BaseModel):
    """The prototype's settings (``--set key=value``, JSON values)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(600, ge=10, description="candidate people in the shared pool")
    refit_every: int = Field(1000, ge=1, description="outcomes between empirical-Bayes refits")
    hazard_per_day: float = Field(1.0 / 365, ge=0, description="generic drift: P(redrawn) per day")
    floor: float = Field(0.0, ge=0, le=0.5, description="min propensity per dimension (0: greedy)")
    segment_people: float = Field(30.0, gt=0, description="pseudo-people the population lends a segment (em)")
    fit_prior: Literal["wording", "em", "none"] = "wording"
    read_model: tuple[float, float, float] | None = Field(None, description="diagnostics: fixed (a, b, c)")


@dataclass
class CandidatePool:
    """Candidate people: rates per channel, multiplier per window, short-wording multiplier."""

    windows: tuple[str, ...]
    rate: dict[str, list[float]]
    when: dict[str, list[float]]
    pref: list[int]
    short: list[float]

    @classmethod
    def draw(cls, rng: random.Random, n: int, windows: tuple[str, ...]) -> CandidatePool:
        rate = {c: [sim._expit(-1.7 + rng.gauss(0.0, 1.3)) for _ in range(n)] for c in sim.ORDER}
        pref = [rng.randrange(len(windows)) for _ in range(n)]
        when = {
            w: [1.0 if pref[i] == j else rng.uniform(0.2, 1.0) for i in range(n)]
            for j, w in enumerate(windows)
        }
        short = [max(0.5, min(1.5, rng.gauss(1.0, 0.15))) for _ in range(n)]
        return cls(windows, rate, when, pref, short)


@dataclass
class Send:
    seg: str
    q_hat: float  # predicted P(reply) at send time
    p_pref: float  # predicted P(the send's window is the person's active one)
    kind: str = ""  # "", then "reply", "read" or "none" when the outcome comes
    late: bool = False


@dataclass
class PersonState:
    seg: str
    belief: list[float]
    prior: list[float]  # the prior the belief was computed under
    updated: datetime
    sends: dict[tuple[str, str, str, datetime], Send] = field(default_factory=dict)


class ModelLearner(sim.Policy):
    """The prototype (module docstring): a belief per person over a shared candidate pool."""

    name = "model"

    def __init__(self, cfg: LearningConfig, seed: int, opts: ModelOptions | None = None) -> None:
        o = opts or ModelOptions()
        self.cfg, self.tz, self.n = cfg, sim.TZ, o.n
        self.windows = tuple(cfg.windows)
        self.pool = CandidatePool.draw(random.Random(seed * 7 + 3), o.n, self.windows)
        self.hazard, self.floor, self.m_seg, self.fit_prior = (
            o.hazard_per_day,
            o.floor,
            o.segment_people,
            o.fit_prior,
        )
        self.refit_every = o.refit_every
        # fitted, from generic starting values: the read model (a, b, c) and lateness L
        self.a, self.b, self.c = o.read_model or (0.3, 1.0, 0.99)
        self.late = 0.3
        self.read_fixed = o.read_model is not None
        self.eps_prompt, self.eps_where = 0.02, 0.05  # generic slack: nothing is ever impossible
        self.priors: dict[str, list[float]] = {"*": [1.0 / o.n] * o.n}
        self.fitted_wording: dict[
            str, tuple[float, float]
        ] = {}  # segment -> (mean, sd) of the short's effect
        self.people: dict[int, PersonState] = {}
        self.log: list[Send] = []
        self.outcomes = 0
        self.last_propensity = 1.0
        self.segment_cfg = LearningConfig(segment_by=["age_band", "language"])
        self.segments: dict[int, str] = {}
        # r x w x s per option, computed once
        self.prod: dict[sim.Option, list[float]] = {}
        for c in sim.ORDER:
            for w in self.windows:
                rw = list(map(operator.mul, self.pool.rate[c], self.pool.when[w]))
                self.prod[(c, w, "default")] = rw
                self.prod[(c, w, "short")] = list(map(operator.mul, rw, self.pool.short))

    # ------------------------------------------------------------------ beliefs

    def _window_of(self, at: datetime) -> str:
        w = learning.engaged_window(at, self.tz, self.cfg)
        assert w is not None
        return w

    def _prior(self, seg: str) -> list[float]:
        return self.priors.get(seg, self.priors["*"])

    def _state(self, p: sim.SimPerson, now: datetime) -> PersonState:
        if p.id not in self.segments:
            self.segments[p.id] = learning.segment_key(
                self.segment_cfg, birth=p.birth, language=p.lang, reach=[], today=now.date()
            )
        seg = self.segments[p.id]
        st = self.people.get(p.id)
        if st is None:
            st = self.people[p.id] = PersonState(seg, list(self._prior(seg)), self._prior(seg), now)
        new = self._prior(seg)
        if st.prior is not new:  # the prior was refitted: swap it under the likelihood
            b = [x * nw / o if o > 0 else 0.0 for x, nw, o in zip(st.belief, new, st.prior, strict=True)]
            t = sum(b)
            st.belief = [x / t for x in b] if t > 0 else list(new)
            st.prior = new
        return st

    def _drifted(self, st: PersonState, at: datetime) -> list[float]:
        days = max(0.0, (at - st.updated).total_seconds() / 86400.0)
        rho = 1.0 - math.exp(-self.hazard * days)
        if rho <= 1e-9:
            return st.belief
        return [(1 - rho) * x + rho * y for x, y in zip(st.belief, self._prior(st.seg), strict=True)]

    # ------------------------------------------------------------------ the Policy calls

    def choose(
        self,
        p: sim.SimPerson,
        now: datetime,
        allowed: list[str],
        windows: dict[str, datetime],
        verdict: gate.Verdict,
        rng: random.Random,
    ) -> sim.Option:
        b = self._drifted(self._state(p, now), now)
        wof = {wn: self._window_of(at) for wn, at in windows.items()}
        vals = {
            (c, wn, v): sum(map(operator.mul, b, self.prod[(c, wof[wn], v)]))
            for c in allowed
            for wn in windows
            for v in sim.VARIANTS
        }
        greedy = max(vals, key=lambda o: vals[o])
        if self.floor <= 0:
            self.last_propensity = 1.0
            return greedy
        chosen, self.last_propensity = with_floor(
            greedy, (allowed, list(windows), sim.VARIANTS), self.floor, rng
        )
        return chosen

    def sent(self, p: sim.SimPerson, opt: sim.Option, at: datetime) -> None:
        st = self._state(p, at)
        b = self._drifted(st, at)
        w = self._window_of(at)
        q = sum(map(operator.mul, b, self.prod[(opt[0], w, opt[2])]))
        j = self.windows.index(w)
        s = Send(st.seg, q, sum(x for x, pr in zip(b, self.pool.pref, strict=True) if pr == j))
        st.sends[(*opt, at)] = s
        self.log.append(s)

    def _timing(self, j: int, k: int, late: bool) -> list[float]:
        """P(a response to a send in window j came when it did, in window k | active window)."""
        L, e1, e2 = self.late, self.eps_prompt, self.eps_where
        spread = e2 / (len(self.windows) - 1)
        if late:
            here, there_k, there_other = e1 * (1 - e2 if k == j else spread), L * (1 - e2), L * spread
        else:
            here, there_k, there_other = 1 - e1, 1 - L, 1 - L
        return [
            here if pr == j else (there_k if (pr == k or not late) else there_other) for pr in self.pool.pref
        ]

    def outcome(self, p: sim.SimPerson, opt: sim.Option, sent: datetime, at: datetime, reward: float) -> None:
        st = self._state(p, at)
        b = self._drifted(st, max(sent, st.updated))
        reply, read = reward >= 1.0, 0.0 < reward < 1.0
        w = self._window_of(sent)
        q = self.prod[(opt[0], w, opt[2])]
        a, bb, c = self.a, self.b, self.c
        late = (reply or read) and at - sent > timedelta(hours=self.cfg.prompt_hours)
        if reply or read:
            tim = self._timing(self.windows.index(w), self.windows.index(self._window_of(at)), late)
            if reply:
                lik = [min(0.99, x) * t for x, t in zip(q, tim, strict=True)]
            else:
                lik = [
                    max(1e-3, min(c, a + bb * min(0.99, x)) - min(0.99, x)) * t
                    for x, t in zip(q, tim, strict=True)
                ]
        else:
            lik = [max(1e-3, 1.0 - min(c, a + bb * min(0.99, x))) for x in q]
        nb = list(map(operator.mul, b, lik))
        t = sum(nb)
        st.belief = [x / t for x in nb] if t > 0 else list(self._prior(st.seg))
        st.updated = max(sent, st.updated)
        s = st.sends.pop((*opt, sent), None)
        if s is not None:
            s.kind = "reply" if reply else ("read" if read else "none")
            s.late = late
        self.outcomes += 1
        if self.outcomes % self.refit_every == 0:
            self.refit()

    # ------------------------------------------------------------------ empirical Bayes

    def refit(self) -> None:
        done = [s for s in self.log if s.kind]
        if len(done) < 200:
            return
        # the read link and lateness, fitted as the product's belief model fits them
        settled = [belief.Settled(s.q_hat, s.p_pref, s.kind, s.late) for s in done]
        fit = belief.fit_link(settled, belief.Link(self.a, self.b, self.c, self.late))
        if not self.read_fixed:
            self.a, self.b, self.c = fit.floor, fit.slope, fit.cap
        self.late = fit.late
        if self.fit_prior == "wording":
            self._fit_wording()
        elif self.fit_prior == "em":
            self._fit_em()

    def _fit_em(self) -> None:
        """Priors: one EM step over the people's current beliefs, segments shrunk to the population."""
        n = self.n
        pop = [0.0] * n
        by_seg: dict[str, tuple[list[float], int]] = {}
        for st in self.people.values():
            acc, k = by_seg.setdefault(st.seg, ([0.0] * n, 0))
            for i, x in enumerate(st.belief):
                acc[i] += x
                pop[i] += x
            by_seg[st.seg] = (acc, k + 1)
        pop = [0.9 * x / len(self.people) + 0.1 / n for x in pop]
        self.priors = {"*": pop} | {
            seg: [(x + self.m_seg * y) / (k + self.m_seg) for x, y in zip(acc, pop, strict=True)]
            for seg, (acc, k) in by_seg.items()
        }

    def _tilt(self, mu: float, sd: float) -> list[float]:
        """Pool weights that turn the pool's short-wording spread N(1, .15) into N(mu, sd)."""
        w = [math.exp(-0.5 * ((x - mu) / sd) ** 2 + 0.5 * ((x - 1.0) / 0.15) ** 2) for x in self.pool.short]
        t = sum(w)
        return [x / t for x in w]

    def _fit_wording(self) -> None:
        """Empirical Bayes for the short wording's effect by segment: the segment's prior is the
        pool tilted to N(mu_seg, sd); mu_seg (and sd, population-wide) maximise the marginal
        likelihood of the people's outcomes, mu_seg penalised toward the population's
        (generic sd 0.1 between segments). The marginal likelihood of person p under a new
        prior pi' is sum_i belief_p(i) pi'(i) / pi_p(i)."""
        grid_mu = [0.8 + 0.025 * k for k in range(17)]
        tilts = {(m, s): self._tilt(m, s) for m in grid_mu for s in (0.04, 0.08, 0.15)}
        by_seg: dict[str, list[PersonState]] = {}
        for st in self.people.values():
            by_seg.setdefault(st.seg, []).append(st)
        ll: dict[str, dict[tuple[float, float], float]] = {}
        for seg, sts in by_seg.items():
            ratios = [
                [x / pr if pr > 0 else 0.0 for x, pr in zip(st.belief, st.prior, strict=True)] for st in sts
            ]
            ll[seg] = {
                key: sum(math.log(max(1e-300, sum(map(operator.mul, r, t)))) for r in ratios)
                for key, t in tilts.items()
            }
        pop_mu, sd = max(tilts, key=lambda k: sum(v[k] for v in ll.values()))
        self.fitted_wording = {"*": (pop_mu, sd)}
        for seg, v in ll.items():
            mu = max(grid_mu, key=lambda m: v[(m, sd)] - 0.5 * ((m - pop_mu) / 0.1) ** 2)
            self.fitted_wording[seg] = (mu, sd)
        self.priors = {seg: tilts[key] for seg, key in self.fitted_wording.items()}


# ---------------------------------------------------------------------- the runs


@dataclass(frozen=True)
class Size:
    people: int = 300
    requests: int = 10000
    after: int = 5000  # "after N sends": the requests after the learner's Nth decision


Metrics = dict[str, dict[str, float]]  # policy -> learning_sim.one_seed's figures


def ablate_seed(seed: int, size: Size, specs: list[str], particles: int) -> Metrics:
    """The learner, the oracle and one Ablated per spec, on one seed's world."""

    def variant(spec: str) -> sim.Factory:
        return lambda c, s: Ablated(c, s, spec, particles)

    makers: list[sim.Factory] = [lambda c, s: sim.Learner(c), lambda c, s: sim.Oracle()]
    return sim.one_seed(seed, size.people, size.requests, size.after, makers + [variant(s) for s in specs])


def model_seed(seed: int, size: Size, opts: ModelOptions) -> Metrics:
    """The fixed policy, the learner, the oracle and the prototype, on one seed's world; the
    prototype's fitted read model and lateness go in as ``fit``."""
    made: list[ModelLearner] = []

    def model(cfg: LearningConfig, s: int) -> sim.Policy:
        made.append(ModelLearner(cfg, s, opts))
        return made[-1]

    makers: list[sim.Factory] = [
        lambda c, s: sim.Fixed(),
        lambda c, s: sim.Learner(c),
        lambda c, s: sim.Oracle(),
        model,
    ]
    out = sim.one_seed(seed, size.people, size.requests, size.after, makers)
    m = made[0]
    out["fit"] = {"a": m.a, "b": m.b, "c": m.c, "L": m.late}
    return out


def _map(job: Callable[[int], Metrics], seeds: list[int], jobs: int) -> list[Metrics]:
    """``job`` over the seeds, ``jobs`` at a time, saying when each seed is done."""
    t0, out = time.perf_counter(), []
    with Pool(min(jobs, len(seeds))) if jobs > 1 and len(seeds) > 1 else nullcontext() as pool:
        for seed, r in zip(seeds, pool.imap(job, seeds) if pool else map(job, seeds), strict=True):
            print(f"  seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
            out.append(r)
    return out


def _row(label: str, xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return (
        f"  {label:48} {statistics.mean(xs):8.3f} ± {sd:6.3f}  [{min(xs):.3f}, {max(xs):.3f}]  "
        + " ".join(f"{x:.3f}" for x in xs)
    )


def _ratio(per_seed: list[Metrics], a: str, b: str, key: str) -> list[float]:
    return [r[a][key] / r[b][key] for r in per_seed]


def _violations(per_seed: list[Metrics], names: list[str]) -> int:
    return sum(int(r[name]["violations"]) for r in per_seed for name in names)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="command", required=True)
    ab = sub.add_parser("ablate", help="InformedBayes with one piece of exact knowledge replaced at a time")
    md = sub.add_parser("model", help="the prototype model-based learner")
    for p in (ab, md):
        p.add_argument("--seeds", type=int, nargs="+", default=[11, 22, 33])
        p.add_argument("--jobs", type=int, default=2, help="seeds run in parallel")
        p.add_argument("--people", type=int, default=Size.people)
        p.add_argument("--requests", type=int, default=Size.requests)
        p.add_argument("--after", type=int, default=Size.after)
    knobs = "; ".join(f"{k}: {f.description}" for k, f in Knobs.model_fields.items())
    ab.add_argument(
        "--variants",
        nargs="+",
        default=["exact"],
        help=f"'exact' or knob=value[,knob=value...]; the first value of each is exact. {knobs}",
    )
    ab.add_argument("--particles", type=int, default=300)
    options = "; ".join(f"{k} ({f.default})" for k, f in ModelOptions.model_fields.items())
    md.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"JSON values: {options}")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv or ["model"])  # bare, as `make bench` runs every bench script: the prototype
    size = Size(args.people, args.requests, args.after)
    t0 = time.perf_counter()
    print(
        f"learning_research {args.command}: {size.people} people, {size.requests} send requests; "
        f"'after {size.after}' = after the learner's {size.after}th decision; seeds {args.seeds}; "
        "ratios to the oracle's engagement (mean ± sd [min, max]  per seed)"
    )
    try:
        if args.command == "ablate":
            for spec in args.variants:
                Knobs.parse(spec)
            job = partial(ablate_seed, size=size, specs=args.variants, particles=args.particles)
        else:
            opts = ModelOptions.model_validate(
                {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.set)}
            )
            job = partial(model_seed, size=size, opts=opts)
    except (ValidationError, json.JSONDecodeError) as e:
        raise SystemExit(f"learning_research: {e}") from None
    per_seed = _map(job, args.seeds, args.jobs)
    n = size.after
    if args.command == "ablate":
        print(f"engagement after {n} sends / the oracle's ({args.particles} particles):")
        names = ["learner", *args.variants]
        for name in names:
            print(_row(name, _ratio(per_seed, name, "oracle", "post")))
    else:
        print(f"prototype options: {opts.model_dump()}")
        names = ["model", "learner", "fixed"]
        rows = {
            f"model/oracle engagement, after {n} sends": _ratio(per_seed, "model", "oracle", "post"),
            f"model/oracle expected engagement, after {n}": _ratio(
                per_seed, "model", "oracle", "expected_post"
            ),
            f"model/oracle engagement, first {n} (cumulative)": _ratio(per_seed, "model", "oracle", "pre"),
            "model/fixed engagement, all requests": _ratio(per_seed, "model", "fixed", "engagement"),
            f"learner/oracle engagement, after {n} sends": _ratio(per_seed, "learner", "oracle", "post"),
        }
        for label, xs in rows.items():
            print(_row(label, xs))
        for seed, r in zip(args.seeds, per_seed, strict=True):
            f = r["fit"]
            print(f"  seed {seed}: fitted a={f['a']:.3f} b={f['b']:.2f} c={f['c']:.2f} L={f['L']:.2f}")
    violations = _violations(per_seed, names)
    print(f"compliance-gate violations: {violations} {'OK' if violations == 0 else 'FAIL'}")
    print(f"wall time {time.perf_counter() - t0:.1f} s")
    return 1 if violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
