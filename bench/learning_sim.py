"""Learning simulator (issue 10): a synthetic population with hidden per-person channel and
time-of-day preferences (some drifting), the same stream of send requests served by several
policies, every choice routed through the real compliance gate (orchestrator.gate.evaluate)
at decision time and again at send time, as the orchestrator does.

Policies: ``fixed`` (the site's channel order, send when the playbook says, default wording),
``heuristic`` (the person's most engaged channel so far, untried channels tried first, like
Braze's Intelligent Channel), ``learner`` (orchestrator.learning with the default
LearningConfig, ``model: belief``, and the in-memory evidence store), ``beta`` (the same with
``model: beta``; ``--no-beta`` leaves it out) and ``oracle`` (knows every person's current
true engagement probability for every allowed channel, window and variant). Reference
points, not contenders: ``oracle-ch`` (knows the person's current best channel only),
``oracle-seg`` (that, plus the part of the day the person's age band most often prefers),
``oracle-cw`` (the person's best channel and window, default wording) and,
with ``--informed N``, ``informed``: a learner told the world's generative model exactly,
inferring each person's hidden preferences by importance sampling (N particles each). It is
the practical ceiling for learning from outcomes in this world.

Hidden world (per person): engagement probability = channel base rate x time-of-day
multiplier (1 in the person's preferred part of the day, 0.35-0.75 elsewhere) x variant
multiplier (default 1; short 1.10 for 18-39, 1.0 for 40-64, 0.90 for 65+, each person
+-N(0, 0.05) around their band's; ``--variant-taste person``: N(1, 0.15) with no trend).
Base rates come from the person's age band and language (logit-normal spread, 15% engage on
one channel only). Drift: a person's SMS and email rates swap at a constant hazard (25%
within 120 days; a person can swap back later). 4% have opted out of SMS, 1% are deceased
(the gate must suppress them). The outcome of a send is drawn with a common random number
per request, so the policies are compared on the same luck. A reply, or else a read
receipt / open (P = 0.25 + 2.5 x P(engaged), at most 0.95; ``--replies-only`` drops them),
arrives one hour after the send, or, for a send outside the person's active part of the day,
with probability 0.5 (``--late``) at a moment of their next active part, when they look at
their phone or inbox (``--no-timing``: always an hour later). When people read and reply is
what send-time optimisers learn from (Braze Intelligent Timing, Infobip and Mapp STO use
open and click times); the belief learner reads late responses as the person's active
window (orchestrator/belief.py), the beta learner credits the window the person engaged in
(orchestrator/learning.py ``engaged_window``).

Scale: 300 people (a care-management cohort, or a small practice's actively messaged
patients) each getting about one send request a week (RATE), so 10,000 requests span about
240 days. The horizon grows with ``--requests`` at that rate rather than packing more sends
per person into a fixed 120 days; a real clinic sends appointment reminders less often than
weekly, so per-person learning here is, if anything, easier than in practice.
Changes from the first version (2026-11): the horizon now extends past the 5,000th send at a
fixed weekly rate (previously 5,000 requests in 120 days, and the "after 5,000" figure was
the trailing 1,000 *before* the 5,000th); drift became a constant hazard (previously 25%
swapped once between day 30 and 90, which would leave a longer run drift-free).
Changes of 2026-11-22: reads and replies carry the person's timing (above; before, every
outcome came an hour after its send, so a world where people act when they look at their
phone looked like one where they never do); the short wording's effect got a trend by age
band with a small personal spread (before: a +-15% personal taste with no trend, which no
learner can find in ~17 sends and which alone put the oracle 6% out of reach; A/B tests of
message wording measure population effects). ``--no-timing --variant-taste person`` runs
the old world.

Figures: engagement = engaged / requests (suppressed requests count as 0). "After N sends"
(the issue's target, ``--after``, default 5,000) is the engagement on the requests after
the learner's Nth decision, for every policy over those same requests: its steady state once
it has learned; "first N" and "all requests" are the cumulative figures including the cold
start. Regret = the oracle's expected engagements minus the policy's. Violations = executed
sends that break a rule, checked independently of the gate (quiet hours in local time,
opt-outs, addresses, SMS caps, deceased, a channel the gate did not allow).
Run: ``.venv/bin/python bench/learning_sim.py [--seeds 11 22 33] [--informed 300] [--set KEY=VALUE]``
(``--set``: any LearningConfig field for the learner, e.g. ``--set segment_strength=2``).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from careloop.config import LearningConfig
from orchestrator import belief, gate, learning

TZ = "America/New_York"
ZONE = ZoneInfo(TZ)
QUIET = gate.parse_quiet_hours("08:00-21:00")
CAPS = {"sms": gate.Cap(1, 3)}
FACTS = {
    "sms": gate.ChannelFacts("sms", "phone", "sms", "none"),
    "email": gate.ChannelFacts("email", "email", "email", "limited"),
}
ORDER = ["sms", "email"]
VARIANTS = ["default", "short"]
START = datetime(2026, 1, 5, 5, 0, tzinfo=UTC)
RATE = 5000 / (300 * 120)  # send requests per person per day: about one a week
DRIFT_HAZARD = -math.log(0.75) / 120  # per person per day: 25% swap within 120 days
PURPOSE = "appointment-reminder"
TEMPLATE = "appointment-reminder"
BANDS = {"18-39": (0.35, 1990), "40-64": (0.40, 1970), "65+": (0.25, 1950)}
BASE = {
    "18-39": {"sms": 0.28, "email": 0.12},
    "40-64": {"sms": 0.20, "email": 0.22},
    "65+": {"sms": 0.10, "email": 0.28},
}
PREFERRED_PART = {"18-39": (0.2, 0.3, 0.5), "40-64": (0.3, 0.4, 0.3), "65+": (0.6, 0.3, 0.1)}
PARTS = ("morning", "midday", "evening")
OVERRIDES: dict[str, object] = {}
TIMING = True  # reads and replies come when the person is active (--no-timing: always an hour later)
READS, READ_FLOOR, READ_SLOPE = True, 0.25, 2.5  # P(read or opened) = 0.25 + 2.5 x P(engaged), at most 0.95
PART_HOURS = {"morning": (8, 12), "midday": (12, 17), "evening": (17, 21)}  # local, inside 08:00-21:00
LATE = 0.5  # P(a read or reply to a send outside the person's active part comes in that part)
LATE_ANYWHERE = False  # --late-anywhere: a late read or reply comes in any part of the day


# The short wording's multiplier: a trend by age band and a person's own taste around it
# (--variant-taste person: no trend, a wide personal spread, the world before 2026-11-22).
SHORT_TREND = {"18-39": 1.10, "40-64": 1.0, "65+": 0.90}
SHORT_SD = 0.05


def short_wording(rng: random.Random, band: str) -> float:
    return max(0.6, min(1.4, SHORT_TREND[band] + rng.gauss(0.0, SHORT_SD)))


def part_of_day(at: datetime) -> str:
    h = at.astimezone(ZONE).hour
    return "morning" if h < 12 else ("midday" if h < 17 else "evening")


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _expit(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@dataclass
class SimPerson:
    id: int
    band: str
    lang: str
    birth: str
    addresses: dict[str, list[str]]
    opted_out: frozenset[tuple[str, str]]
    deceased: bool
    rates: dict[str, float]
    swaps: tuple[datetime, ...]  # when the SMS and email rates swap (drift)
    when: dict[str, float]
    variant: dict[str, float]
    pref: str  # the part of the day the person is active in

    def engaged_at(self, sent: datetime, late: float, spot: float) -> datetime:
        """When a read or reply to a message sent at ``sent`` arrives: an hour later, or, for
        a message sent outside the person's active part of the day, with probability LATE
        at a moment (``spot``) of the next active part, when they look at their phone
        (``--late-anywhere``: of a part drawn at random)."""
        if part_of_day(sent) == self.pref or late >= LATE:
            return sent + timedelta(hours=1)
        part = self.pref
        if LATE_ANYWHERE:  # the part from the spot's first digit, the moment from the rest
            part, spot = PARTS[min(len(PARTS) - 1, int(spot * len(PARTS)))], spot * len(PARTS) % 1.0
        lo, hi = PART_HOURS[part]
        local = sent.astimezone(ZONE)
        start = datetime.combine(local.date(), dtime(lo), tzinfo=ZONE)
        if start <= local:
            start = datetime.combine(local.date() + timedelta(days=1), dtime(lo), tzinfo=ZONE)
        return (start + timedelta(hours=(hi - lo) * spot)).astimezone(UTC)

    def prob(self, channel: str, at: datetime, variant: str) -> float:
        swapped = sum(1 for t in self.swaps if t <= at) % 2 == 1
        rate = self.rates[{"sms": "email", "email": "sms"}[channel] if swapped else channel]
        return min(0.95, rate * self.when[part_of_day(at)] * self.variant[variant])

    def facts(self) -> gate.PersonFacts:
        return gate.PersonFacts(
            deceased=self.deceased, timezone=TZ, addresses=self.addresses, opted_out=self.opted_out
        )


def _swaps(rng: random.Random, days: float) -> tuple[datetime, ...]:
    out: list[datetime] = []
    t = rng.expovariate(DRIFT_HAZARD)
    while t < days:
        out.append(START + timedelta(days=t))
        t += rng.expovariate(DRIFT_HAZARD)
    return tuple(out)


def population(rng: random.Random, n: int, days: float) -> list[SimPerson]:
    out = []
    for i in range(n):
        band = rng.choices(list(BANDS), weights=[w for w, _ in BANDS.values()])[0]
        lang = "es" if rng.random() < 0.2 else "en"
        phone, email = rng.random() < 0.92, rng.random() < 0.8
        if not (phone or email):
            phone = True
        addresses = {
            k: [v]
            for k, v, ok in (("phone", f"+1555{i:07d}", phone), ("email", f"p{i}@example.test", email))
            if ok
        }
        rates = {}
        for ch in ORDER:
            mean = BASE[band][ch] * ((1.2 if ch == "sms" else 0.8) if lang == "es" else 1.0)
            rates[ch] = _expit(_logit(mean) + rng.gauss(0, 0.9))
        if rng.random() < 0.15:  # engages on one channel only
            rates[rng.choice(ORDER)] *= 0.1
        pref = rng.choices(PARTS, weights=PREFERRED_PART[band])[0]
        when = {p: (1.0 if p == pref else rng.uniform(0.35, 0.75)) for p in PARTS}
        variant = {"default": 1.0, "short": short_wording(rng, band)}
        out.append(
            SimPerson(
                id=i,
                band=band,
                lang=lang,
                birth=f"{BANDS[band][1] + rng.randint(0, 15)}-06-15",
                addresses=addresses,
                opted_out=frozenset({("sms", "*")}) if rng.random() < 0.04 else frozenset(),
                deceased=rng.random() < 0.01,
                rates=rates,
                swaps=_swaps(rng, days),
                when=when,
                variant=variant,
                pref=pref,
            )
        )
    return out


@dataclass(frozen=True)
class Request:
    index: int
    at: datetime
    person: int
    luck: float  # the common random number that decides engagement, for every policy
    late: float  # and those that decide when a read or reply comes (Person.engaged_at)
    spot: float


def requests(rng: random.Random, people: list[SimPerson], n: int, days: float) -> list[Request]:
    times = sorted(START + timedelta(seconds=rng.uniform(0, days * 86400)) for _ in range(n))
    return [
        Request(i, t, rng.randrange(len(people)), rng.random(), rng.random(), rng.random())
        for i, t in enumerate(times)
    ]


# ---------------------------------------------------------------------- policies

Option = tuple[str, str, str]  # channel, window, variant


class Policy:
    name = "?"

    def choose(
        self,
        p: SimPerson,
        now: datetime,
        allowed: list[str],
        windows: dict[str, datetime],
        verdict: gate.Verdict,
        rng: random.Random,
    ) -> Option:
        raise NotImplementedError

    def sent(self, p: SimPerson, opt: Option, at: datetime) -> None:
        return None

    def outcome(self, p: SimPerson, opt: Option, sent: datetime, at: datetime, reward: float) -> None:
        return None


class Fixed(Policy):
    """The site's order, at the playbook's time (the gate's deferral only), default wording."""

    name = "fixed"

    def choose(
        self,
        p: SimPerson,
        now: datetime,
        allowed: list[str],
        windows: dict[str, datetime],
        verdict: gate.Verdict,
        rng: random.Random,
    ) -> Option:
        assert verdict.channel is not None
        return verdict.channel, learning.ASAP, "default"


class MostEngaged(Policy):
    """The person's channel with the best engaged/sent ratio; untried channels are tried
    while nothing has engaged yet. Playbook time, default wording."""

    name = "heuristic"

    def __init__(self) -> None:
        self.sent_n: dict[tuple[int, str], int] = {}
        self.engaged_n: dict[tuple[int, str], int] = {}

    def choose(
        self,
        p: SimPerson,
        now: datetime,
        allowed: list[str],
        windows: dict[str, datetime],
        verdict: gate.Verdict,
        rng: random.Random,
    ) -> Option:
        ratio = {
            c: self.engaged_n.get((p.id, c), 0) / n for c in allowed if (n := self.sent_n.get((p.id, c), 0))
        }
        if ratio and max(ratio.values()) > 0:
            best = max(allowed, key=lambda c: ratio.get(c, -1.0))
        else:
            best = min(allowed, key=lambda c: self.sent_n.get((p.id, c), 0))
        return best, learning.ASAP, "default"

    def sent(self, p: SimPerson, opt: Option, at: datetime) -> None:
        self.sent_n[(p.id, opt[0])] = self.sent_n.get((p.id, opt[0]), 0) + 1

    def outcome(self, p: SimPerson, opt: Option, sent: datetime, at: datetime, reward: float) -> None:
        if reward >= 1.0:  # replies: opens alone make every channel look engaged
            self.engaged_n[(p.id, opt[0])] = self.engaged_n.get((p.id, opt[0]), 0) + 1


@dataclass
class _Sent:
    """One learned send as ``outreach_outcome`` keeps it, for ``learning.model: belief``."""

    at: datetime
    channel: str
    window: str  # the window whose hours held the send time
    variant: str  # template/variant
    q: float  # what the model predicted (P(reply)) when it chose
    p_active: float
    active: dict[str, float]  # what it predicted of each window being the active one
    response: str | None = None  # reply | read; None until one comes
    late: bool = False
    seen: str | None = None

    def observed(self, now: datetime, cfg: LearningConfig) -> belief.Observed | None:
        """As the orchestrator reads it: a response, or none once the reply window has passed."""
        response = self.response
        if response is None:
            if now - self.at < timedelta(hours=cfg.reply_window_hours):
                return None  # not settled yet
            response = "none"
        return belief.Observed(
            self.at, self.channel, self.window, self.variant, response, self.late, self.seen
        )

    def settled(self, now: datetime, cfg: LearningConfig) -> belief.Settled | None:
        o = self.observed(now, cfg)
        if o is None:
            return None
        return belief.Settled(self.q, self.p_active, o.response, o.late, belief.seen_share(self.active, o))


class Learner(Policy):
    """orchestrator.learning, as the orchestrator calls it, over in-memory evidence."""

    name = "learner"

    def __init__(self, cfg: LearningConfig, name: str = "learner") -> None:
        self.cfg, self.name = cfg, name
        self.stats = learning.MemoryStats(cfg)
        self.segments: dict[int, str] = {}
        # learning.model belief: each person's sends as the store keeps them (outreach_outcome),
        # what the model predicted for each (for the link's refit), and the fitted link
        self.sends: dict[int, list[_Sent]] = {}
        self.predicted: dict[tuple[int, Option], list[dict[str, Any]]] = {}
        self.link = belief.Link()
        self.n_sent = 0

    def _segment(self, p: SimPerson, now: datetime) -> str:
        if p.id not in self.segments:
            reach = [k for k in ("phone", "email") if p.addresses.get(k)]
            self.segments[p.id] = learning.segment_key(
                self.cfg, birth=p.birth, language=p.lang, reach=reach, today=now.date()
            )
        return self.segments[p.id]

    def choose(
        self,
        p: SimPerson,
        now: datetime,
        allowed: list[str],
        windows: dict[str, datetime],
        verdict: gate.Verdict,
        rng: random.Random,
    ) -> Option:
        self.stats.now = now
        model = None
        if self.cfg.model == "belief":
            settled = [o for x in self.sends.get(p.id, []) if (o := x.observed(now, self.cfg)) is not None]
            model = learning.Model(settled[-self.cfg.belief_history :], self.link, self.cfg.rewards["read"])
        c = learning.choose(
            self.stats,
            person_key=str(p.id),
            segment=self._segment(p, now),
            channels=allowed,
            windows=windows,
            variants_for=lambda ch: VARIANTS,
            template=TEMPLATE,
            rng=rng,
            cfg=self.cfg,
            tz=TZ,
            model=model,
        )
        opt = (c.channel, c.window, c.variant)
        if c.model is not None:
            self.predicted.setdefault((p.id, opt), []).append(c.model)
        return opt

    def _record(
        self, p: SimPerson, opt: Option, at: datetime, *, trial: bool, delta: float, engaged: int
    ) -> None:
        self.stats.record(
            person_key=str(p.id),
            segment=self._segment(p, at),
            arms=learning.arms(opt[0], opt[1], TEMPLATE, opt[2]),
            now=at,
            trial=trial,
            delta=delta,
            engaged=engaged,
        )

    def sent(self, p: SimPerson, opt: Option, at: datetime) -> None:
        self._record(p, opt, at, trial=True, delta=0.0, engaged=0)
        waiting = self.predicted.get((p.id, opt))
        if waiting:
            said = waiting.pop(0)
            # as the store keeps it: the window chosen, else the one whose hours held the send
            window = opt[1] if opt[1] in self.cfg.windows else learning.engaged_window(at, TZ, self.cfg)
            assert window is not None
            self.sends.setdefault(p.id, []).append(
                _Sent(
                    at,
                    opt[0],
                    window,
                    f"{TEMPLATE}/{opt[2]}",
                    float(said["q"]),
                    float(said["p_active"]),
                    said["active"],
                )
            )
            self.n_sent += 1
            if self.n_sent % self.cfg.refit_every == 0:
                done = [st for x in self.sends.values() for y in x if (st := y.settled(at, self.cfg))]
                self.link = belief.fit_link(done, self.link, len(self.cfg.windows))

    def outcome(self, p: SimPerson, opt: Option, sent: datetime, at: datetime, reward: float) -> None:
        if reward <= 0:
            return
        for x in reversed(self.sends.get(p.id, [])):
            if x.at == sent and x.response is None:
                x.response = "reply" if reward >= 1.0 else "read"
                x.late = at - sent > timedelta(hours=self.cfg.prompt_hours)
                x.seen = learning.engaged_window(at, TZ, self.cfg)
                break
        prompt = at - sent <= timedelta(hours=self.cfg.prompt_hours)
        seen = None if prompt else learning.engaged_window(at, TZ, self.cfg)
        if seen is None or seen == opt[1]:
            self._record(p, opt, at, trial=False, delta=reward, engaged=1)
            return
        # as orchestrator/learning_steps.py does: the window the person engaged in gets the credit
        arms = [a for a in learning.arms(opt[0], opt[1], TEMPLATE, opt[2]) if a[0] != "window"]
        seg = self._segment(p, at)
        self.stats.record(
            person_key=str(p.id), segment=seg, arms=arms, now=at, trial=False, delta=reward, engaged=1
        )
        self.stats.record(
            person_key=str(p.id),
            segment=seg,
            arms=[("window", seen)],
            now=at,
            trial=False,
            delta=reward,
            engaged=1,
            credit=True,
        )


class InformedBayes(Policy):
    """A reference ceiling, not a contender (``--informed``): a learner told the world's
    generative model (the priors by age band and language, the one-channel share, the
    time-of-day and wording spreads, the read and timing model, the drift hazard) that infers
    each person's hidden preferences by importance sampling over ``particles`` draws from
    that prior, tracks drift exactly (each particle's SMS/email swap is a two-state Markov
    chain at DRIFT_HAZARD, filtered forward), and sends the option with the best posterior
    mean. No real learner knows this much; what it cannot reach, none can in this world."""

    name = "informed"

    def __init__(self, cfg: LearningConfig, seed: int, particles: int = 300) -> None:
        self.rng = random.Random(seed * 31 + 7)
        self.n = particles
        self.particles: dict[int, list[tuple[dict[str, float], dict[str, float], dict[str, float]]]] = {}
        # per person: when last filtered, and P(particle i, swapped s) as two lists
        self.belief: dict[int, tuple[datetime, list[float], list[float]]] = {}

    def _draw(self, p: SimPerson) -> list[tuple[dict[str, float], dict[str, float], dict[str, float]]]:
        if p.id not in self.particles:
            rng, out = self.rng, []
            for _ in range(self.n):
                rates = {}
                for ch in ORDER:
                    mean = BASE[p.band][ch] * ((1.2 if ch == "sms" else 0.8) if p.lang == "es" else 1.0)
                    rates[ch] = _expit(_logit(mean) + rng.gauss(0, 0.9))
                if rng.random() < 0.15:
                    rates[rng.choice(ORDER)] *= 0.1
                pref = rng.choices(PARTS, weights=PREFERRED_PART[p.band])[0]
                when = {q: (1.0 if q == pref else rng.uniform(0.35, 0.75)) for q in PARTS}
                var = {"default": 1.0, "short": short_wording(rng, p.band)}
                out.append((rates, when, var))
            self.particles[p.id] = out
        return self.particles[p.id]

    def _belief(self, p: SimPerson, at: datetime) -> tuple[list[float], list[float]]:
        """P(particle, not swapped) and P(particle, swapped) at ``at``: the last filtered
        belief carried forward through the swap chain."""
        if p.id not in self.belief:
            return [1.0 / self.n] * self.n, [0.0] * self.n
        then, b0, b1 = self.belief[p.id]
        days = max(0.0, (at - then).total_seconds() / 86400)
        flip = (1.0 - math.exp(-2.0 * DRIFT_HAZARD * days)) / 2.0
        return (
            [x * (1 - flip) + y * flip for x, y in zip(b0, b1, strict=True)],
            [x * flip + y * (1 - flip) for x, y in zip(b0, b1, strict=True)],
        )

    def choose(
        self,
        p: SimPerson,
        now: datetime,
        allowed: list[str],
        windows: dict[str, datetime],
        verdict: gate.Verdict,
        rng: random.Random,
    ) -> Option:
        parts = self._draw(p)
        b0, b1 = self._belief(p, now)
        other = {"sms": "email", "email": "sms"}
        best, value = (allowed[0], next(iter(windows)), "default"), -1.0
        for c in allowed:
            for wn, at in windows.items():
                part = part_of_day(at)
                for v in VARIANTS:
                    val = sum(
                        x * min(0.95, r[c] * w[part] * va[v]) + y * min(0.95, r[other[c]] * w[part] * va[v])
                        for x, y, (r, w, va) in zip(b0, b1, parts, strict=True)
                    )
                    if val > value:
                        best, value = (c, wn, v), val
        return best

    def outcome(self, p: SimPerson, opt: Option, sent: datetime, at: datetime, reward: float) -> None:
        parts = self._draw(p)
        b0, b1 = self._belief(p, max(sent, self.belief[p.id][0]) if p.id in self.belief else sent)
        part = part_of_day(sent)
        soon = at - sent == timedelta(hours=1)
        other = {"sms": "email", "email": "sms"}[opt[0]]

        def likelihood(rate: float, w: dict[str, float], va: dict[str, float]) -> float:
            q = min(0.95, rate * w[part] * va[opt[2]])
            rd = min(0.95, READ_FLOOR + READ_SLOPE * q) if READS else q
            pr = q if reward >= 1.0 else (rd - q if reward > 0 else 1.0 - rd)
            if reward > 0 and TIMING:  # when it came says where they are active
                if w[part] == 1.0:
                    pr *= 1.0 if soon else 0.0
                else:
                    pr *= (1.0 - LATE) if soon else (LATE if w[part_of_day(at)] == 1.0 else 0.0)
            return pr

        n0 = [x * likelihood(r[opt[0]], w, va) for x, (r, w, va) in zip(b0, parts, strict=True)]
        n1 = [y * likelihood(r[other], w, va) for y, (r, w, va) in zip(b1, parts, strict=True)]
        total = sum(n0) + sum(n1)
        if total <= 0:  # every particle ruled out: start again from the prior
            n0, n1, total = [1.0] * self.n, [0.0] * self.n, float(self.n)
        self.belief[p.id] = (
            max(sent, self.belief[p.id][0]) if p.id in self.belief else sent,
            [x / total for x in n0],
            [y / total for y in n1],
        )


class Oracle(Policy):
    name = "oracle"

    def choose(
        self,
        p: SimPerson,
        now: datetime,
        allowed: list[str],
        windows: dict[str, datetime],
        verdict: gate.Verdict,
        rng: random.Random,
    ) -> Option:
        return max(
            ((c, w, v) for c in allowed for w in windows for v in VARIANTS),
            key=lambda o: p.prob(o[0], windows[o[1]], o[2]),
        )


class ChannelOracle(Policy):
    """A reference point, not a contender: knows each person's current best channel, but sends
    at the playbook's time with the default wording. The gap between it and the oracle is
    what time of day and wording are worth in this world."""

    name = "oracle-ch"

    def choose(
        self,
        p: SimPerson,
        now: datetime,
        allowed: list[str],
        windows: dict[str, datetime],
        verdict: gate.Verdict,
        rng: random.Random,
    ) -> Option:
        at = windows[learning.ASAP]
        return max(allowed, key=lambda c: p.prob(c, at, "default")), learning.ASAP, "default"


class SegmentOracle(Policy):
    """A reference point, not a contender: knows each person's current best channel and the
    part of the day most people of their age band prefer (the world's PREFERRED_PART), not
    the person's own; default wording. What pooling alone can reach on time of day."""

    name = "oracle-seg"

    def choose(
        self,
        p: SimPerson,
        now: datetime,
        allowed: list[str],
        windows: dict[str, datetime],
        verdict: gate.Verdict,
        rng: random.Random,
    ) -> Option:
        share = dict(zip(PARTS, PREFERRED_PART[p.band], strict=True))
        w = max(windows, key=lambda k: share.get(part_of_day(windows[k]), 0.0))
        return max(allowed, key=lambda c: p.prob(c, windows[w], "default")), w, "default"


class TimeOracle(Policy):
    """A reference point, not a contender: knows each person's current best channel and
    send window, but uses the default wording. The gap between it and the oracle is what
    choosing the wording is worth."""

    name = "oracle-cw"

    def choose(
        self,
        p: SimPerson,
        now: datetime,
        allowed: list[str],
        windows: dict[str, datetime],
        verdict: gate.Verdict,
        rng: random.Random,
    ) -> Option:
        return max(
            ((c, w, "default") for c in allowed for w in windows),
            key=lambda o: p.prob(o[0], windows[o[1]], o[2]),
        )


# ---------------------------------------------------------------------- the run


@dataclass
class Result:
    name: str
    engaged: list[float]  # realized engagement per request (0 when nothing was sent)
    expected: list[float]  # the true engagement probability of what was sent, per request
    sends: int = 0
    suppressed: int = 0  # at decision time (the gate refused everything)
    rechecked: int = 0  # a send the gate refused at its (later) send time
    violations: int = 0
    channels: dict[str, int] = field(default_factory=dict)
    decided: list[int] = field(default_factory=list)  # request index of each decision, in order


def _counts(history: list[tuple[datetime, str]], now: datetime) -> tuple[dict[str, int], dict[str, int]]:
    day: dict[str, int] = {}
    week: dict[str, int] = {}
    for at, ch in history:
        if now - timedelta(days=7) < at <= now:
            week[ch] = week.get(ch, 0) + 1
            if now - timedelta(days=1) < at:
                day[ch] = day.get(ch, 0) + 1
    return day, week


def _gate(
    p: SimPerson, now: datetime, channels: list[str], history: list[tuple[datetime, str]], not_after: datetime
) -> gate.Verdict:
    day, week = _counts(history, now)
    return gate.evaluate(
        gate.GateInput(
            now=now,
            person=p.facts(),
            template_kinds=frozenset({"sms", "email", "text"}),
            phi_class="none",
            purpose=PURPOSE,
            channels=[FACTS[c] for c in channels],
            sent_day=day,
            sent_week=week,
            caps=CAPS,
            quiet_hours=QUIET,
            not_after=not_after,
        )
    )


def _violates(
    p: SimPerson, channel: str, at: datetime, allowed: list[str], history: list[tuple[datetime, str]]
) -> bool:
    """The rules, checked without the gate."""
    local = at.astimezone(ZONE)
    sms = [t for t, c in history if c == "sms"]
    return (
        p.deceased
        or channel not in allowed
        or (channel, "*") in p.opted_out
        or not p.addresses.get(FACTS[channel].address_kind)
        or not 8 <= local.hour < 21
        or (
            channel == "sms"
            and (
                any(at - t < timedelta(days=1) for t in sms)
                or sum(1 for t in sms if at - t < timedelta(days=7)) >= 3
            )
        )
    )


def run(
    policy: Policy, people: list[SimPerson], reqs: list[Request], cfg: LearningConfig, seed: int
) -> Result:
    res = Result(policy.name, [0.0] * len(reqs), [0.0] * len(reqs))
    history: dict[int, list[tuple[datetime, str]]] = {}
    heap: list[tuple[datetime, int, str, tuple[object, ...]]] = []
    seq = 0
    rng = random.Random(seed * 7919 + 1)

    def push(at: datetime, kind: str, payload: tuple[object, ...]) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (at, seq, kind, payload))

    def process(until: datetime) -> None:
        while heap and heap[0][0] <= until:
            at, _, kind, payload = heapq.heappop(heap)
            if kind == "send":
                req, opt, allowed, not_after = payload
                assert isinstance(req, Request) and isinstance(opt, tuple) and isinstance(allowed, list)
                assert isinstance(not_after, datetime)
                p = people[req.person]
                hist = history.setdefault(p.id, [])
                v = _gate(p, at, [opt[0]], hist, not_after)  # the gate again, at send time
                if v.outcome == "defer":
                    assert v.deliver_at is not None
                    push(v.deliver_at, "send", payload)
                    continue
                if v.outcome != "send":
                    res.rechecked += 1
                    continue
                res.violations += _violates(p, opt[0], at, allowed, hist)
                hist.append((at, opt[0]))
                prob = p.prob(opt[0], at, opt[2])
                reward = 1.0 if req.luck < prob else 0.0
                # The outcome events the orchestrator would see: a reply (engaged), else a read
                # receipt or open, which is likelier the more the message suits the person.
                read = READS and req.luck < min(0.95, READ_FLOOR + READ_SLOPE * prob)
                signal = reward if reward else (cfg.rewards.get("read", 0.0) if read else 0.0)
                res.sends += 1
                res.channels[opt[0]] = res.channels.get(opt[0], 0) + 1
                res.expected[req.index] = prob
                res.engaged[req.index] = reward
                policy.sent(p, opt, at)
                seen = p.engaged_at(at, req.late, req.spot) if TIMING else at + timedelta(hours=1)
                push(seen, "outcome", (req, opt, signal, at))
            else:
                req, opt, got, sent = payload
                assert isinstance(req, Request) and isinstance(opt, tuple) and isinstance(got, float)
                assert isinstance(sent, datetime)
                policy.outcome(people[req.person], opt, sent, at, got)

    for req in reqs:
        process(req.at)
        p = people[req.person]
        not_after = req.at + timedelta(days=3)
        v = _gate(p, req.at, ORDER, history.setdefault(p.id, []), not_after)
        if v.outcome == "suppress":
            res.suppressed += 1
            continue
        earliest = req.at if v.outcome == "send" else v.deliver_at
        assert earliest is not None
        windows = learning.window_options(earliest, req.at, TZ, cfg, not_after) or {learning.ASAP: earliest}
        if isinstance(policy, Fixed | MostEngaged | ChannelOracle):
            windows = {learning.ASAP: earliest}
        opt = policy.choose(p, req.at, list(v.allowed), windows, v, rng)
        res.decided.append(req.index)
        push(windows[opt[1]], "send", (req, opt, list(v.allowed), not_after))
    process(reqs[-1].at + timedelta(days=7))
    return res


Factory = Callable[[LearningConfig, int], Policy]


def one_seed(
    seed: int, n_people: int, n_requests: int, after: int, policies: list[Factory]
) -> dict[str, dict[str, float]]:
    cfg = LearningConfig(enabled=True, **OVERRIDES)
    days = n_requests / (n_people * RATE)
    world = random.Random(seed)
    people = population(world, n_people, days)
    reqs = requests(world, people, n_requests, days)
    results = {}
    for make in policies:
        policy = make(cfg, seed)
        t0 = time.perf_counter()
        r = run(policy, people, reqs, cfg, seed)
        results[r.name] = (r, time.perf_counter() - t0)
    # "after N sends": the requests after the learner's Nth decision, for every policy alike
    decided = results["learner"][0].decided
    if len(decided) <= after:
        raise SystemExit(f"the learner made only {len(decided)} decisions; raise --requests above --after")
    cut = decided[after - 1] + 1
    oracle_exp = sum(results["oracle"][0].expected)
    oracle_exp_post = sum(results["oracle"][0].expected[cut:])
    out: dict[str, dict[str, float]] = {}
    for name, (r, secs) in results.items():
        out[name] = {
            "engagement": sum(r.engaged) / n_requests,
            "pre": sum(r.engaged[:cut]) / cut,
            "post": sum(r.engaged[cut:]) / (n_requests - cut),
            "expected": sum(r.expected) / n_requests,
            "expected_pre": sum(r.expected[:cut]) / cut,
            "expected_post": sum(r.expected[cut:]) / (n_requests - cut),
            "regret": oracle_exp - sum(r.expected),
            "regret_post": oracle_exp_post - sum(r.expected[cut:]),
            "sends": r.sends,
            "suppressed": r.suppressed,
            "rechecked": r.rechecked,
            "violations": r.violations,
            "email_share": r.channels.get("email", 0) / max(1, r.sends),
            "seconds": secs,
            "cut": cut,
            "days": days,
        }
    return out


def as_model(cfg: LearningConfig, model: str) -> LearningConfig:
    """``cfg`` with ``model``, as a file saying so would load: the fields it set are kept, the
    rest take that model's defaults (belief's exploration: careloop/config.py)."""
    return LearningConfig.model_validate(cfg.model_dump(exclude_unset=True) | {"model": model})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 22, 33])
    ap.add_argument("--people", type=int, default=300)
    ap.add_argument(
        "--requests", type=int, default=10000, help="send requests in all (about one a week each)"
    )
    ap.add_argument(
        "--after", type=int, default=5000, help="the 'after N sends' the steady-state figure uses"
    )
    ap.add_argument(
        "--replies-only", action="store_true", help="no read/open receipts: learn from replies alone"
    )
    ap.add_argument(
        "--no-timing",
        action="store_true",
        help="reads and replies always come an hour after the send (the world before 2026-11-22)",
    )
    ap.add_argument(
        "--late",
        type=float,
        default=0.5,
        help="P(a read or reply to a send outside the person's active part of the day comes in that part)",
    )
    ap.add_argument(
        "--variant-taste",
        choices=["band", "person"],
        default="band",
        help="band: the short wording works better for younger people, +/-5%% personal taste; "
        "person: no trend, +/-15%% personal taste (the world before 2026-11-22)",
    )
    ap.add_argument(
        "--late-anywhere",
        action="store_true",
        help="a late read or reply comes in any part of the day, not the person's active one "
        "(when a response came then says nothing of when they are active)",
    )
    ap.add_argument("--max-exploration", type=float, default=None)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a LearningConfig field for the learner (JSON value), e.g. --set half_life_days=90",
    )
    ap.add_argument(
        "--no-beta",
        action="store_true",
        help="leave out 'beta', the learner with learning.model beta (the default config's is belief)",
    )
    ap.add_argument(
        "--informed",
        type=int,
        default=0,
        metavar="PARTICLES",
        help="add the informed-Bayes ceiling with this many particles per person (slow; 300 is plenty)",
    )
    args = ap.parse_args()
    global READS, OVERRIDES, TIMING, LATE, SHORT_SD, LATE_ANYWHERE
    READS = not args.replies_only
    LATE_ANYWHERE = args.late_anywhere
    TIMING, LATE = not args.no_timing, args.late
    if args.variant_taste == "person":
        SHORT_TREND.update({b: 1.0 for b in SHORT_TREND})
        SHORT_SD = 0.15
    if args.max_exploration is not None:
        OVERRIDES["max_exploration"] = args.max_exploration
    for item in args.set:
        key, _, value = item.partition("=")
        OVERRIDES[key] = json.loads(value)
    LearningConfig(**OVERRIDES)  # a bad key or value fails here, naming the field
    policies: list[Factory] = [
        lambda c, s: Fixed(),
        lambda c, s: MostEngaged(),
        lambda c, s: Learner(c),
        lambda c, s: ChannelOracle(),
        lambda c, s: SegmentOracle(),
        lambda c, s: TimeOracle(),
        lambda c, s: Oracle(),
    ]
    if not args.no_beta:
        policies.insert(3, lambda c, s: Learner(as_model(c, "beta"), "beta"))
    if args.informed:
        policies.insert(3, lambda c, s: InformedBayes(c, s, args.informed))
    t0 = time.perf_counter()
    per_seed = [one_seed(s, args.people, args.requests, args.after, policies) for s in args.seeds]
    first = per_seed[0]
    f0 = first["learner"]
    print(
        f"learning_sim: {args.people} people, {args.requests} send requests over {f0['days']:.0f} days, "
        f"{'replies only' if args.replies_only else 'replies and read/open receipts'}; seed {args.seeds[0]} "
        f"(of {len(args.seeds)}); 'after {args.after}' = requests {f0['cut']:.0f}+ "
        f"(after the learner's {args.after}th decision)"
    )
    print(
        f"{'policy':10} {'engaged':>8} {'pre':>7} {'post':>7} {'E[eng]':>7} {'E[post]':>7} {'regret':>7} "
        f"{'sends':>6} {'supp':>5} {'recheck':>7} {'email%':>6} {'viol':>4} {'secs':>5}"
    )
    for name, m in first.items():
        print(
            f"{name:10} {m['engagement']:8.4f} {m['pre']:7.4f} {m['post']:7.4f} {m['expected']:7.4f} "
            f"{m['expected_post']:7.4f} {m['regret']:7.1f} {m['sends']:6.0f} {m['suppressed']:5.0f} "
            f"{m['rechecked']:7.0f} {100 * m['email_share']:6.1f} {m['violations']:4.0f} {m['seconds']:5.1f}"
        )

    def spread(f: Callable[[dict[str, dict[str, float]]], float]) -> tuple[float, float, float, float]:
        xs = [f(r) for r in per_seed]
        return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), min(xs), max(xs)

    def ratio(a: str, b: str, key: str) -> Callable[[dict[str, dict[str, float]]], float]:
        return lambda r: r[a][key] / r[b][key]

    n = args.after
    print(f"over seeds {args.seeds} (mean, sd, min, max):")
    rows = {
        f"learner/oracle engagement, after {n} sends": ratio("learner", "oracle", "post"),
        f"learner/oracle expected engagement, after {n}": ratio("learner", "oracle", "expected_post"),
        f"learner/oracle engagement, first {n} (cumulative)": ratio("learner", "oracle", "pre"),
        "learner/oracle engagement, all requests": ratio("learner", "oracle", "engagement"),
        "learner/fixed engagement, all requests": ratio("learner", "fixed", "engagement"),
        f"learner/fixed engagement, first {n}": ratio("learner", "fixed", "pre"),
        f"learner/fixed engagement, after {n}": ratio("learner", "fixed", "post"),
        **(
            {
                f"beta/oracle engagement, after {n} sends": ratio("beta", "oracle", "post"),
                f"beta/oracle expected engagement, after {n}": ratio("beta", "oracle", "expected_post"),
                "beta/fixed engagement, all requests": ratio("beta", "fixed", "engagement"),
            }
            if not args.no_beta
            else {}
        ),
        "heuristic/fixed engagement, all requests": ratio("heuristic", "fixed", "engagement"),
        "oracle-seg/oracle expected, all requests": ratio("oracle-seg", "oracle", "expected"),
        "oracle-ch/oracle expected, all requests": ratio("oracle-ch", "oracle", "expected"),
        "oracle-cw/oracle expected, all requests": ratio("oracle-cw", "oracle", "expected"),
        **(
            {
                f"informed/oracle engagement, after {n} sends": ratio("informed", "oracle", "post"),
                f"informed/oracle expected engagement, after {n}": ratio(
                    "informed", "oracle", "expected_post"
                ),
                "informed/fixed engagement, all requests": ratio("informed", "fixed", "engagement"),
            }
            if args.informed
            else {}
        ),
        "learner regret (expected engagements), all": lambda r: r["learner"]["regret"],
        f"learner regret, after {n}": lambda r: r["learner"]["regret_post"],
        "heuristic regret, all": lambda r: r["heuristic"]["regret"],
        "fixed regret, all": lambda r: r["fixed"]["regret"],
    }
    stats = {}
    for label, f in rows.items():
        mean, sd, mn, mx = spread(f)
        stats[label] = (mean, mn)
        print(f"  {label:48} {mean:8.3f} ± {sd:6.3f}  [{mn:.3f}, {mx:.3f}]")
    violations = sum(int(m["violations"]) for r in per_seed for m in r.values())
    vs_oracle = stats[f"learner/oracle engagement, after {n} sends"][0]
    vs_fixed = stats["learner/fixed engagement, all requests"][0]
    print(
        f"target learner >= 0.90 x oracle after {n} sends: {vs_oracle:.3f} "
        f"{'MET' if vs_oracle >= 0.9 else 'MISSED'}"
    )
    print(f"target learner >= 1.30 x fixed: {vs_fixed:.3f} {'MET' if vs_fixed >= 1.3 else 'MISSED'}")
    if not args.no_beta:
        b_oracle = stats[f"beta/oracle engagement, after {n} sends"][0]
        b_fixed = stats["beta/fixed engagement, all requests"][0]
        print(
            f"the same targets for learning.model beta: {b_oracle:.3f} of the oracle "
            f"{'MET' if b_oracle >= 0.9 else 'MISSED'}, "
            f"{b_fixed:.3f} x fixed {'MET' if b_fixed >= 1.3 else 'MISSED'}"
        )
    print(
        f"compliance-gate violations, all policies and seeds: {violations} "
        f"{'OK' if violations == 0 else 'FAIL'}"
    )
    print(f"wall time {time.perf_counter() - t0:.1f} s")
    return 1 if violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
