"""The learner's joint model of one person (issue 10; ``learning.model: belief``).

What it assumes, and nothing more (every number below is either fitted from the logged
outcomes or a generic default, never a fact about a population):

* a person engages with a message with probability q = rate[channel] x when[window] x
  wording[variant]: one rate per channel, a part of the day they are active in (when = 1
  there, less elsewhere) and a multiplier per wording (1 for the default);
* a read or open is likelier the likelier a reply: P(read or reply) = min(cap, floor +
  slope x q), the link (``Link``) fitted from the logged sends (``fit_link``);
* people act when they are active: a response to a send in their active window comes
  promptly; one to a send elsewhere comes late with probability ``late`` (fitted), in their
  active window, or, with probability ``where`` (fitted: 1 when late responses say nothing
  of when a person is active), in any window;
* preferences can change: at a generic hazard a person is redrawn from their prior, and at
  another a person's attention moves between two of their channels (their rates on the two
  exchanged: a new phone number, email read more than texts), their responsiveness kept.

The belief is a weight per candidate of one shared pool of candidate people drawn, from a
broad generic proposal, deterministically from the config's seed: nothing per person is
stored but their outcomes (``outreach_outcome``), so the belief is rebuilt from them at each
decision and survives restarts. The prior is the pool tilted toward the person's segment:
the segment's pooled mean reward for each option (orchestrator/learning.py) is lent as
``segment_strength`` pseudo-trials, as the per-option posteriors do. Choices are Thompson
sampling over the belief: P(best) of an option is the weight of the candidates for whom it
is best, exact, so the logged propensity is exact.

Pure: no I/O. orchestrator/learning_steps.py reads the history and the fit from the store;
bench/learning_sim.py feeds the same functions from memory.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from statistics import NormalDist
from typing import Any

PROMPT_SLACK = 0.02  # P(a prompt-looking response to a send outside the active window, or late in it)
MIN_P = 1e-3
MEMO_FLOATS = 2_000_000  # a pool's remembered vectors, at most (about 64 MB as Python floats)

Option = tuple[str, str, str]  # channel, window option name, variant key (template/variant)


@dataclass(frozen=True, slots=True)
class Link:
    """How reads and late responses relate to engagement (fitted by ``fit_link``)."""

    floor: float = 0.3
    slope: float = 1.0
    cap: float = 0.99
    late: float = 0.3
    # P(a late response comes in a window drawn at random, not the active one); never 0:
    # nothing is ruled out (the default puts 95% of late responses in the active window of 3)
    where: float = 0.075
    n: int = 0  # sends the fit used (0: the generic defaults)

    def lands(self, window: int, active: int, windows: int) -> float:
        """P(a late response comes in ``window`` if the person is active in ``active``)."""
        return (1.0 - self.where) * (window == active) + self.where / windows

    def p_any(self, q: float) -> float:
        """P(read or reply) for engagement probability ``q``."""
        return max(q, min(self.cap, self.floor + self.slope * q))


@dataclass(frozen=True, slots=True)
class Observed:
    """One settled send, as the model sees it."""

    at: datetime  # when it was sent
    channel: str
    window: str  # the window it was sent in: the one chosen, else the one whose hours held it
    variant: str  # template/variant
    response: str  # "reply" | "read" | "none"
    late: bool = False
    seen: str | None = None  # the window a late response came in


@dataclass(frozen=True, slots=True)
class Settled:
    """One settled send for ``fit_link``: what the model predicted when it chose, and what came."""

    q: float  # predicted P(reply) of the option sent
    p_active: float  # predicted P(the send's window is the person's active one)
    response: str
    late: bool
    # a late response: the predicted P(the window it came in is the person's active one),
    # given that it came late (``seen_share``)
    seen_active: float | None = None


def seen_share(active: Mapping[str, object], o: Observed) -> float | None:
    """For a late response ``o``: what its decision predicted (``active``: P(each window is
    the person's active one)) of the window it came in being the active one, given that it
    came late, so that the person is not active in the window it was sent in (a late
    response to a send in the active window is PROMPT_SLACK's, rare). None when ``o`` is not
    late, or the prediction does not cover its windows (logged before, or windows renamed)."""
    if not o.late or o.seen is None:
        return None
    seen, sent = active.get(o.seen), active.get(o.window)
    if not isinstance(seen, int | float) or not isinstance(sent, int | float):
        return None
    if o.seen == o.window:
        return 0.0
    return min(1.0, float(seen) / max(1e-9, 1.0 - float(sent)))


def _expit(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _strata(rng: random.Random, n: int) -> list[float]:
    """``n`` points of (0, 1), one in each of ``n`` equal strata, in random order (a Latin
    hypercube, one dimension at a time): a pool covers its proposal evenly, not by luck."""
    u = [(k + rng.random()) / n for k in range(n)]
    rng.shuffle(u)
    return u


_NORMAL = NormalDist()


class Pool:
    """Candidate people, drawn from a broad generic proposal by Latin hypercube sampling, the
    same for every person and every process with the same ``seed``: an equal share active in
    each window; rates per channel (logit normal, mean logit 0.15, sd 1.3) and wording
    multipliers (normal, 1 +- 0.15) drawn per name when first needed."""

    def __init__(self, seed: int, n: int, windows: Sequence[str]) -> None:
        self.seed, self.n, self.windows = seed, n, tuple(windows)
        rng = random.Random(f"{seed}|pool|{'|'.join(self.windows)}")
        self.active = [k % len(self.windows) for k in range(n)]
        rng.shuffle(self.active)
        self.when = {}
        for j, w in enumerate(self.windows):
            u = _strata(rng, n)
            self.when[w] = [1.0 if self.active[i] == j else 0.2 + 0.8 * u[i] for i in range(n)]
        self._rate: dict[str, list[float]] = {}
        self._partners: dict[tuple[str, str], list[int]] = {}
        self._wording: dict[str, list[float]] = {}
        self._q: dict[tuple[str, str, str], list[float]] = {}
        # vectors derived from the pool and the current link (rewards, likelihoods): dropped
        # when the link changes (a refit), and when they would hold more than MEMO_FLOATS
        self._memo: dict[tuple[object, ...], Any] = {}
        self._memo_link: Link | None = None
        self._memo_floats = 0

    def rate(self, channel: str) -> list[float]:
        got = self._rate.get(channel)
        if got is None:
            u = _strata(random.Random(f"{self.seed}|rate|{channel}"), self.n)
            got = self._rate[channel] = [_expit(-1.7 + 1.3 * _NORMAL.inv_cdf(x)) for x in u]
        return got

    def wording(self, variant: str) -> list[float]:
        got = self._wording.get(variant)
        if got is None:
            if variant.endswith("/default"):
                got = [1.0] * self.n
            else:
                u = _strata(random.Random(f"{self.seed}|wording|{variant}"), self.n)
                got = [max(0.5, min(1.5, 1.0 + 0.15 * _NORMAL.inv_cdf(x))) for x in u]
            self._wording[variant] = got
        return got

    def q(self, channel: str, window: str, variant: str) -> list[float]:
        """Each candidate's engagement probability for a send on ``channel`` in ``window``."""
        key = (channel, window, variant)
        got = self._q.get(key)
        if got is None:
            got = self._q[key] = [
                min(0.99, r * w * v)
                for r, w, v in zip(self.rate(channel), self.when[window], self.wording(variant), strict=True)
            ]
        return got

    def reward(
        self, channel: str, window: str, variant: str, link: Link, read_reward: float
    ) -> tuple[list[float], list[float], list[float]]:
        """Each candidate's expected reward for the send (``reward_of``), and its logs and
        those of its complement (for ``prior``), kept until the link changes."""
        key = ("reward", channel, window, variant, read_reward)
        got: tuple[list[float], list[float], list[float]] | None = self.recall(link, key)
        if got is None:
            v = [reward_of(x, link, read_reward) for x in self.q(channel, window, variant)]
            clipped = [min(0.999, max(0.001, x)) for x in v]
            got = (v, [math.log(x) for x in clipped], [math.log1p(-x) for x in clipped])
            self.remember(key, got, 3)
        return got

    def partners(self, a: str, b: str) -> list[int]:
        """For each candidate, the candidate most like it with its rates on channels ``a``
        and ``b`` exchanged (the same active window, the nearest rates in logit): where an
        exchange of attention between the two moves its weight."""
        key = (a, b) if a < b else (b, a)
        got = self._partners.get(key)
        if got is None:
            la = [math.log(x / (1.0 - x)) for x in self.rate(key[0])]
            lb = [math.log(x / (1.0 - x)) for x in self.rate(key[1])]
            by_window: dict[int, list[int]] = {}
            for j, act in enumerate(self.active):
                by_window.setdefault(act, []).append(j)
            got = [
                min(by_window[self.active[i]], key=lambda j: (la[j] - lb[i]) ** 2 + (lb[j] - la[i]) ** 2)
                for i in range(self.n)
            ]
            self._partners[key] = got
        return got

    def recall(self, link: Link, key: tuple[object, ...]) -> Any:
        """What was remembered under ``key`` for ``link``; None if nothing (a new link
        forgets everything remembered for the old one)."""
        if link != self._memo_link:
            self._memo.clear()
            self._memo_link, self._memo_floats = link, 0
        return self._memo.get(key)

    def remember(self, key: tuple[object, ...], value: Any, vectors: int) -> None:
        """Keep ``value`` (``vectors`` lists of ``n`` floats) for the current link."""
        if self._memo_floats + vectors * self.n > MEMO_FLOATS:
            self._memo.clear()
            self._memo_floats = 0
        self._memo[key] = value
        self._memo_floats += vectors * self.n


@functools.lru_cache(maxsize=2)
def pool(seed: int, n: int, windows: tuple[str, ...]) -> Pool:
    return Pool(seed, n, windows)


def reward_of(q: float, link: Link, read_reward: float) -> float:
    """Expected reward of a send with engagement probability ``q``: a reply earns 1, a read
    alone ``read_reward``."""
    return q + read_reward * (link.p_any(q) - q)


def likelihood(p: Pool, o: Observed, link: Link) -> list[float]:
    """P(what came of ``o``) for each candidate."""
    key = ("lik", o.channel, o.window, o.variant, o.response, o.late, o.seen)
    memo: list[float] | None = p.recall(link, key)
    if memo is not None:
        return memo
    got: list[float]
    q = p.q(o.channel, o.window, o.variant)
    if o.response == "none":
        got = [max(MIN_P, 1.0 - link.p_any(x)) for x in q]
    else:
        j = p.windows.index(o.window)
        k = p.windows.index(o.seen) if o.late and o.seen in p.windows else j
        n = len(p.windows)
        if o.late:  # had they been active in the window it went in (a == j), it would be prompt
            timing = [(PROMPT_SLACK if a == j else link.late) * link.lands(k, a, n) for a in range(n)]
            timing = [timing[a] for a in p.active]
        else:
            timing = [(1 - PROMPT_SLACK) if a == j else (1 - link.late) for a in p.active]
        if o.response == "reply":
            got = [max(MIN_P, x) * t for x, t in zip(q, timing, strict=True)]
        else:
            got = [max(MIN_P, link.p_any(x) - x) * t for x, t in zip(q, timing, strict=True)]
    p.remember(key, got, 1)
    return got


def _normalized(w: list[float], fallback: list[float]) -> list[float]:
    total = math.fsum(w)
    return [x / total for x in w] if total > 0 else list(fallback)


def prior(
    p: Pool,
    lent: Mapping[Option, float],
    strength: float,
    link: Link,
    read_reward: float,
) -> list[float]:
    """The pool tilted toward a segment: each entry of ``lent`` (an option and the segment's
    mean reward for it) counts as ``strength`` pseudo-trials with that mean."""
    logw = [0.0] * p.n
    for (channel, window, variant), mean in lent.items():
        mean = min(0.999, max(0.001, mean))
        a, b = strength * mean, strength * (1 - mean)
        _, logv, log1v = p.reward(channel, window, variant, link, read_reward)
        logw = [acc + a * x + b * y for acc, x, y in zip(logw, logv, log1v, strict=True)]
    top = max(logw)
    return _normalized([math.exp(x - top) for x in logw], [1.0 / p.n] * p.n)


def belief(
    p: Pool,
    base: list[float],
    history: Iterable[Observed],
    link: Link,
    hazard_per_day: float,
    now: datetime,
    exchange_per_day: float = 0.0,
    channels: Sequence[str] = (),
) -> list[float]:
    """The person's belief at ``now``: ``base`` (their prior) times the likelihood of their
    settled sends in time order, relaxed toward ``base`` at ``hazard_per_day`` between them,
    and their attention moved between two of ``channels`` at ``exchange_per_day``."""
    pairs = [p.partners(a, b) for k, a in enumerate(channels) for b in channels[k + 1 :]]
    w = list(base)
    last: datetime | None = None

    def drifted(w: list[float], days: float) -> list[float]:
        w = _exchanged(w, pairs, exchange_per_day, days)
        return _relaxed(w, base, hazard_per_day, days)

    for o in sorted(history, key=lambda o: o.at):
        if last is not None:
            w = drifted(w, (o.at - last).total_seconds() / 86400.0)
        w = _normalized([x * lk for x, lk in zip(w, likelihood(p, o, link), strict=True)], base)
        last = o.at
    if last is not None:
        w = drifted(w, (now - last).total_seconds() / 86400.0)
    return w


def _exchanged(w: list[float], pairs: list[list[int]], hazard: float, days: float) -> list[float]:
    """``w`` after ``days`` in which, at ``hazard``, a person's rates on one pair of their
    channels (each pair alike) were exchanged: each candidate's share moves to its partner."""
    rho = 1.0 - math.exp(-hazard * max(0.0, days)) if pairs else 0.0
    if rho <= 1e-9:
        return w
    out = [(1.0 - rho) * x for x in w]
    share = rho / len(pairs)
    for partner in pairs:
        for i, x in enumerate(w):
            out[partner[i]] += share * x
    return out


def _relaxed(w: list[float], base: list[float], hazard: float, days: float) -> list[float]:
    rho = 1.0 - math.exp(-hazard * max(0.0, days))
    if rho <= 1e-9:
        return w
    return [(1 - rho) * x + rho * b for x, b in zip(w, base, strict=True)]


@dataclass(frozen=True, slots=True)
class Assessment:
    """Posterior mean reward and P(best) of each option, over the belief."""

    mean: dict[Option, float]
    p_best: dict[Option, float]


def assess(
    p: Pool, w: list[float], options: Mapping[Option, str], link: Link, read_reward: float
) -> Assessment:
    """``options``: each option and the window whose hours hold its send time."""
    values = {o: p.reward(o[0], at_window, o[2], link, read_reward)[0] for o, at_window in options.items()}
    keys = list(values)
    mean = {o: math.fsum(a * b for a, b in zip(w, values[o], strict=True)) for o in keys}
    p_best = dict.fromkeys(keys, 0.0)
    columns = [values[o] for o in keys]
    for i, wi in enumerate(w):
        if wi <= 0.0:
            continue
        best = max(range(len(keys)), key=lambda k: columns[k][i])  # first on ties
        p_best[keys[best]] += wi
    return Assessment(mean, p_best)


def active_share(p: Pool, w: list[float], window: str) -> float:
    """P(``window`` is the person's active one), under the belief."""
    j = p.windows.index(window)
    return math.fsum(x for x, a in zip(w, p.active, strict=True) if a == j)


def fit_link(settled: Sequence[Settled], start: Link = Link(), windows: int = 3) -> Link:
    """The read link and the lateness that best explain ``settled`` (binned maximum
    likelihood over a grid; lateness: late responses over the responses expected outside the
    active window; ``where``: the maximum likelihood over a grid of the windows late responses
    came in, given what each decision predicted of them (``seen_share``), once 20 have come;
    ``windows``: how many are configured). Fewer than 200 settled sends: ``start`` unchanged."""
    if len(settled) < 200:
        return start
    bins: dict[int, list[float]] = {}
    for st in settled:
        b = bins.setdefault(min(39, int(st.q * 80)), [0.0, 0.0, 0.0, 0.0])
        b[0] += 1
        b[1] += st.response == "read"
        b[2] += st.response == "reply"
        b[3] += st.q
    best = (-math.inf, start.floor, start.slope, start.cap)
    for cap in (0.85, 0.9, 0.95, 0.99):
        for fi in range(1, 31):
            floor = fi * 0.025
            for si in range(25):
                slope = si * 0.25
                ll = 0.0
                for n, reads, replies, qs in bins.values():
                    q = qs / n
                    p_any = min(cap, floor + slope * q)
                    p_read = max(1e-4, (p_any - q) / (1 - q)) if p_any > q else 1e-4
                    rest = n - replies
                    ll += reads * math.log(p_read) + (rest - reads) * math.log(max(1e-4, 1 - p_read))
                if ll > best[0]:
                    best = (ll, floor, slope, cap)
    _, floor, slope, cap = best
    responded = [st for st in settled if st.response != "none"]
    off = math.fsum(1.0 - st.p_active for st in responded)
    late = start.late
    if off > 20:
        late = min(0.99, max(0.05, sum(st.late for st in responded) / off))
    seen = [st.seen_active for st in responded if st.late and st.seen_active is not None]
    where = start.where
    if len(seen) >= 20 and windows > 1:
        where = max(
            (0.025 * k for k in range(1, 41)),
            key=lambda e: math.fsum(math.log((1 - e) * a + e / windows) for a in seen),
        )
    return Link(floor, slope, cap, late, where, len(settled))
