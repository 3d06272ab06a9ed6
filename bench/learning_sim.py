"""Learning simulator (issue 10): a synthetic population with hidden per-person channel and
time-of-day preferences (some drifting), the same stream of send requests served by four
policies, every choice routed through the real compliance gate (orchestrator.gate.evaluate)
at decision time and again at send time, as the orchestrator does.

Policies: ``fixed`` (the site's channel order, send when the playbook says, default wording),
``heuristic`` (the person's most engaged channel so far, untried channels tried first, like
Braze's Intelligent Channel), ``learner`` (orchestrator.learning with the default
LearningConfig and the in-memory evidence store) and ``oracle`` (knows every person's current
true engagement probability for every allowed channel, window and variant).

Hidden world (per person): engagement probability = channel base rate x time-of-day
multiplier (1 in the person's preferred part of the day, 0.35-0.75 elsewhere) x variant
multiplier. Base rates come from the person's age band and language (logit-normal spread,
15% engage on one channel only); 25% of people swap their SMS and email rates at a random
time (drift). 4% have opted out of SMS, 1% are deceased (the gate must suppress them).
The outcome of a send is drawn with a common random number per request, so the policies
are compared on the same luck. A reply arrives one hour after the send.

Figures: engagement = engaged / requests (suppressed requests count as 0), over all requests
and over the trailing window before the 5,000th; regret = the oracle's expected engagements
minus the policy's; violations = executed sends that break a rule, checked independently of
the gate (quiet hours in local time, opt-outs, addresses, SMS caps, deceased, a channel the
gate did not allow). Run: ``.venv/bin/python bench/learning_sim.py [--seeds 11 22 33]``.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from careloop.config import LearningConfig
from orchestrator import gate, learning

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
DAYS = 120
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
OVERRIDES: dict[str, float] = {}
READS, READ_FLOOR, READ_SLOPE = True, 0.25, 2.5  # P(read or opened) = 0.25 + 2.5 x P(engaged), at most 0.95


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
    rates_after: dict[str, float] | None
    drift_at: datetime | None
    when: dict[str, float]
    variant: dict[str, float]

    def prob(self, channel: str, at: datetime, variant: str) -> float:
        rates = (
            self.rates_after
            if self.drift_at is not None and at >= self.drift_at and self.rates_after
            else self.rates
        )
        return min(0.95, rates[channel] * self.when[part_of_day(at)] * self.variant[variant])

    def facts(self) -> gate.PersonFacts:
        return gate.PersonFacts(
            deceased=self.deceased, timezone=TZ, addresses=self.addresses, opted_out=self.opted_out
        )


def population(rng: random.Random, n: int) -> list[SimPerson]:
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
        drift = rng.random() < 0.25
        pref = rng.choices(PARTS, weights=PREFERRED_PART[band])[0]
        when = {p: (1.0 if p == pref else rng.uniform(0.35, 0.75)) for p in PARTS}
        variant = {"default": 1.0, "short": max(0.6, min(1.4, 1 + rng.gauss(0.0, 0.15)))}
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
                rates_after={"sms": rates["email"], "email": rates["sms"]} if drift else None,
                drift_at=START + timedelta(days=rng.uniform(30, 90)) if drift else None,
                when=when,
                variant=variant,
            )
        )
    return out


@dataclass(frozen=True)
class Request:
    index: int
    at: datetime
    person: int
    luck: float  # the common random number that decides engagement, for every policy


def requests(rng: random.Random, people: list[SimPerson], n: int) -> list[Request]:
    times = sorted(START + timedelta(seconds=rng.uniform(0, DAYS * 86400)) for _ in range(n))
    return [Request(i, t, rng.randrange(len(people)), rng.random()) for i, t in enumerate(times)]


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

    def outcome(self, p: SimPerson, opt: Option, at: datetime, reward: float) -> None:
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

    def outcome(self, p: SimPerson, opt: Option, at: datetime, reward: float) -> None:
        if reward >= 1.0:  # replies: opens alone make every channel look engaged
            self.engaged_n[(p.id, opt[0])] = self.engaged_n.get((p.id, opt[0]), 0) + 1


class Learner(Policy):
    """orchestrator.learning, as the orchestrator calls it, over in-memory evidence."""

    name = "learner"

    def __init__(self, cfg: LearningConfig) -> None:
        self.cfg = cfg
        self.stats = learning.MemoryStats(cfg)
        self.segments: dict[int, str] = {}

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
        )
        return c.channel, c.window, c.variant

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

    def outcome(self, p: SimPerson, opt: Option, at: datetime, reward: float) -> None:
        if reward > 0:
            self._record(p, opt, at, trial=False, delta=reward, engaged=1)


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
                push(at + timedelta(hours=1), "outcome", (req, opt, signal))
            else:
                req, opt, got = payload
                assert isinstance(req, Request) and isinstance(opt, tuple) and isinstance(got, float)
                policy.outcome(people[req.person], opt, at, got)

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
        push(windows[opt[1]], "send", (req, opt, list(v.allowed), not_after))
    process(reqs[-1].at + timedelta(days=7))
    return res


def one_seed(
    seed: int, n_people: int, n_requests: int, window: int, policies: list[Callable[[LearningConfig], Policy]]
) -> dict[str, dict[str, float]]:
    cfg = LearningConfig(enabled=True, **OVERRIDES)
    world = random.Random(seed)
    people = population(world, n_people)
    reqs = requests(world, people, n_requests)
    results = {}
    for make in policies:
        policy = make(cfg)
        t0 = time.perf_counter()
        r = run(policy, people, reqs, cfg, seed)
        results[r.name] = (r, time.perf_counter() - t0)
    oracle_exp = sum(results["oracle"][0].expected)
    lo = max(0, n_requests - window)
    out: dict[str, dict[str, float]] = {}
    for name, (r, secs) in results.items():
        out[name] = {
            "engagement": sum(r.engaged) / n_requests,
            "trailing": sum(r.engaged[lo:]) / (n_requests - lo),
            "expected": sum(r.expected) / n_requests,
            "expected_trailing": sum(r.expected[lo:]) / (n_requests - lo),
            "regret": oracle_exp - sum(r.expected),
            "sends": r.sends,
            "suppressed": r.suppressed,
            "rechecked": r.rechecked,
            "violations": r.violations,
            "email_share": r.channels.get("email", 0) / max(1, r.sends),
            "seconds": secs,
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 22, 33])
    ap.add_argument("--people", type=int, default=300)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument(
        "--window", type=int, default=1000, help="trailing requests the 'after N sends' figure uses"
    )
    ap.add_argument(
        "--replies-only", action="store_true", help="no read/open receipts: learn from replies alone"
    )
    ap.add_argument("--max-exploration", type=float, default=None)
    args = ap.parse_args()
    global READS, OVERRIDES
    READS = not args.replies_only
    if args.max_exploration is not None:
        OVERRIDES["max_exploration"] = args.max_exploration
    policies: list[Callable[[LearningConfig], Policy]] = [
        lambda c: Fixed(),
        lambda c: MostEngaged(),
        Learner,
        lambda c: ChannelOracle(),
        lambda c: Oracle(),
    ]
    t0 = time.perf_counter()
    per_seed = [one_seed(s, args.people, args.requests, args.window, policies) for s in args.seeds]
    lo, hi = args.requests - args.window + 1, args.requests
    first = per_seed[0]
    print(
        f"learning_sim: {args.people} people, {args.requests} send requests over {DAYS} days, "
        f"seed {args.seeds[0]} (of {len(args.seeds)})"
    )
    print(
        f"{'policy':10} {'engaged':>8} {f'@{lo}-{hi}':>11} {'E[eng]':>7} {'regret':>7} {'sends':>6} "
        f"{'supp':>5} {'recheck':>7} {'email%':>6} {'viol':>4} {'secs':>5}"
    )
    for name, m in first.items():
        print(
            f"{name:10} {m['engagement']:8.4f} {m['trailing']:11.4f} {m['expected']:7.4f} {m['regret']:7.1f} "
            f"{m['sends']:6.0f} {m['suppressed']:5.0f} {m['rechecked']:7.0f} {100 * m['email_share']:6.1f} "
            f"{m['violations']:4.0f} {m['seconds']:5.1f}"
        )

    def spread(f: Callable[[dict[str, dict[str, float]]], float]) -> tuple[float, float, float, float]:
        xs = [f(r) for r in per_seed]
        return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), min(xs), max(xs)

    print(f"over seeds {args.seeds} (mean, sd, min, max):")
    rows = {
        f"learner/oracle engagement, requests {lo}-{hi}": lambda r: (
            r["learner"]["trailing"] / r["oracle"]["trailing"]
        ),
        f"learner/oracle expected engagement, {lo}-{hi}": lambda r: (
            r["learner"]["expected_trailing"] / r["oracle"]["expected_trailing"]
        ),
        "learner/oracle engagement, all requests": lambda r: (
            r["learner"]["engagement"] / r["oracle"]["engagement"]
        ),
        "learner/fixed engagement, all requests": lambda r: (
            r["learner"]["engagement"] / r["fixed"]["engagement"]
        ),
        f"learner/fixed engagement, {lo}-{hi}": lambda r: r["learner"]["trailing"] / r["fixed"]["trailing"],
        "heuristic/fixed engagement, all requests": lambda r: (
            r["heuristic"]["engagement"] / r["fixed"]["engagement"]
        ),
        "learner regret (expected engagements)": lambda r: r["learner"]["regret"],
        "learner/oracle-ch expected engagement, all requests": lambda r: (
            r["learner"]["expected"] / r["oracle-ch"]["expected"]
        ),
        "heuristic regret": lambda r: r["heuristic"]["regret"],
        "fixed regret": lambda r: r["fixed"]["regret"],
    }
    stats = {}
    for label, f in rows.items():
        mean, sd, mn, mx = spread(f)
        stats[label] = (mean, mn)
        print(f"  {label:48} {mean:8.3f} ± {sd:6.3f}  [{mn:.3f}, {mx:.3f}]")
    violations = sum(int(m["violations"]) for r in per_seed for m in r.values())
    vs_oracle = stats[f"learner/oracle engagement, requests {lo}-{hi}"][0]
    vs_fixed = stats["learner/fixed engagement, all requests"][0]
    print(
        f"target learner >= 0.90 x oracle after {hi} sends: {vs_oracle:.3f} "
        f"{'MET' if vs_oracle >= 0.9 else 'MISSED'}"
    )
    print(f"target learner >= 1.30 x fixed: {vs_fixed:.3f} {'MET' if vs_fixed >= 1.3 else 'MISSED'}")
    print(
        f"compliance-gate violations, all policies and seeds: {violations} "
        f"{'OK' if violations == 0 else 'FAIL'}"
    )
    print(f"wall time {time.perf_counter() - t0:.1f} s")
    return 1 if violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
