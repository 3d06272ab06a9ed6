"""The learner (issue 10): channel, send window and message variant chosen per person from
outcomes, only ever among the options the compliance gate allows.

Model. Each choice is factored into three dimensions (channel, window, variant); each
option of a dimension has a Beta posterior over its reward (orchestrator/outcomes.py turns
outcomes into a reward in [0, 1]). Posteriors are pooled in three levels, so a new patient
starts from people like them and then from their own history:

    population:  mu_pop = (1 + S_pop) / (2 + N_pop)
    segment:     mu_seg = (m_pop * mu_pop + S_seg) / (m_pop + N_seg)
    person:      Beta(m_seg * mu_seg + S_person, m_seg * (1 - mu_seg) + F_person)

with S/F the (half-life decayed) reward mass and N = S + F, m_pop and m_seg the configured
``population_strength`` and ``segment_strength``. Decay lets drifting preferences show.
A send is a trial (a failure until its outcomes arrive) for its channel, window and variant;
its reward moves mass to successes, but a read or reply that came later, in another
window's hours, credits that window instead (``engaged_window``, ``credit``): when people
engage says when to reach them.

Choice. Thompson sampling as probability matching: P(best) for every option is computed
by quadrature over the posteriors (``grid`` points), and the chosen option is sampled from
that distribution after two bounds, so the logged propensity is the exact probability of the choice:
``max_exploration`` caps the probability that the decision leaves the posterior-mean best
option in any dimension (each of the k dimensions that has a choice gets the cap
1 - (1 - max_exploration)^(1/k), so the product of "stays greedy" is at least
1 - max_exploration), then ``min_propensity`` gives every allowed option a floor
(inverse-propensity evaluation needs support everywhere; the floor wins over the cap). The
joint propensity is the product of the three dimensions'.

Two models (``learning.model``). ``beta`` is the above. ``belief``, the default
(orchestrator/belief.py), models each person jointly: engagement = channel rate x active
window x wording, reads linked to replies and late responses to the active window (the link,
and how often late responses come in a window at random, fitted from the logged
predictions, so a site whose receipts say nothing of either gets a model that reads
nothing into them), a belief over a shared candidate pool rebuilt at each
decision from the person's settled sends (``history``), its prior tilted by the segment's
pooled means above (``segment_strength`` pseudo-trials). Its P(best) is exact over the
belief; the choice is drawn channel first, then window and variant given those, each bounded
as above, so the logged propensity (their product) is exact for the option sent; offline
evaluation reads the window's and variant's probabilities as if they held for every channel,
an approximation for the options not sent. Its exploration defaults to the propensity floor
alone (careloop/config.py): it learns from every send's reads and timing, not only from what
it tries. bench/learning_sim.py measures both.

Why not MABWiser: its Thompson sampling keeps one flat posterior per arm (no pooled priors
from population to segment to person), has no per-decision arm set (the gate changes it),
persists by pickling, and pulls numpy/pandas/scikit-learn in for what is 200 lines here.

Pure except ``DbStats``/``record`` (SQL), which keep the evidence in ``learning_stat``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from sqlalchemy import and_, func, or_
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from careloop.clock import utc
from careloop.config import AppConfig, LearningConfig
from careloop.tables import Decision, LearningStat, OutreachOutcome, Person
from orchestrator import belief

DIMENSIONS = ("channel", "window", "variant")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ASAP = "asap"  # no configured window fits: send when the gate allows, as without learning


@dataclass
class Evidence:
    """Reward mass for one option at one level, decayed to the time it was read."""

    successes: float = 0.0
    failures: float = 0.0
    trials: int = 0
    engaged: int = 0


class StatsView(Protocol):
    def evidence(self, scope: str, key: str, dimension: str, option: str) -> Evidence:
        """The evidence for ``option`` at (``scope``, ``key``), decayed to now."""
        ...


class _Cell(Protocol):
    successes: float
    failures: float
    trials: int
    engaged: int
    updated_at: datetime


def _decay_factor(updated_at: datetime | None, now: datetime, half_life_days: float | None) -> float:
    if half_life_days is None or updated_at is None:
        return 1.0
    age = (utc(now) - utc(updated_at)).total_seconds() / 86400.0
    return 0.5 ** (age / half_life_days) if age > 0 else 1.0


def bump(
    cell: _Cell,
    now: datetime,
    cfg: LearningConfig,
    *,
    trial: bool,
    delta: float,
    engaged: int,
    credit: bool = False,
) -> None:
    """Decay ``cell`` to ``now``, then count a trial (a pending send counts as a failure
    until its outcomes arrive) and move ``delta`` reward mass from failures to successes.
    ``credit``: add ``delta`` to the successes alone, for an option that was not sent but
    that the outcome showed would have worked (see ``engaged_window``)."""
    f = _decay_factor(cell.updated_at, now, cfg.half_life_days)
    cell.successes *= f
    cell.failures *= f
    if trial:
        cell.trials += 1
        cell.failures += 1.0
    cell.successes = max(0.0, cell.successes + delta)
    if not credit:
        cell.failures = max(0.0, cell.failures - delta)
    cell.engaged = max(0, cell.engaged + engaged)
    cell.updated_at = max(utc(cell.updated_at), utc(now)) if cell.updated_at else utc(now)


@dataclass(frozen=True, slots=True)
class Posterior:
    alpha: float
    beta: float
    person: Evidence
    segment_mean: float

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)


def posterior(
    view: StatsView, person_key: str, segment: str, dimension: str, option: str, cfg: LearningConfig
) -> Posterior:
    """The person's Beta posterior for ``option``, its prior pooled from segment and population."""
    pop = view.evidence("population", "*", dimension, option)
    mu_pop = (1.0 + pop.successes) / (2.0 + pop.successes + pop.failures)
    seg = view.evidence("segment", segment, dimension, option)
    m1 = cfg.population_strength
    mu_seg = (m1 * mu_pop + seg.successes) / (m1 + seg.successes + seg.failures)
    per = view.evidence("person", person_key, dimension, option)
    m2 = cfg.segment_strength
    return Posterior(m2 * mu_seg + per.successes, m2 * (1.0 - mu_seg) + per.failures, per, mu_seg)


@dataclass(frozen=True, slots=True)
class DimensionChoice:
    dimension: str
    options: tuple[str, ...]
    p_best: dict[str, float]  # Thompson estimate of P(option is best)
    probs: dict[str, float]  # the distribution actually sampled (after cap and floor)
    means: dict[str, float]
    greedy: str
    chosen: str
    person: dict[str, tuple[int, int]]  # option -> (engaged, trials) for this person

    @property
    def propensity(self) -> float:
        return self.probs[self.chosen]

    def to_json(self) -> dict[str, Any]:
        return {
            "options": list(self.options),
            "chosen": self.chosen,
            "greedy": self.greedy,
            "propensity": self.propensity,  # exact: OPE divides by it
            "p_best": {k: round(v, 4) for k, v in self.p_best.items()},
            "probs": dict(self.probs),
            "mean": {k: round(v, 4) for k, v in self.means.items()},
            "person": {k: list(v) for k, v in self.person.items()},
        }


def dimension_cap(max_exploration: float, dimensions: int) -> float:
    """The per-dimension cap that keeps P(any dimension leaves its mean-best option) within
    ``max_exploration`` when ``dimensions`` dimensions each have a choice to make."""
    if dimensions <= 1:
        return max_exploration
    return 1.0 - math.pow(1.0 - max_exploration, 1.0 / dimensions)


def bounded_probs(
    p_best: Mapping[str, float], greedy: str, cfg: LearningConfig, cap: float | None = None
) -> dict[str, float]:
    """Cap exploration (P(not greedy) <= ``cap``, by default max_exploration), then floor
    every option."""
    cap = cfg.max_exploration if cap is None else cap
    probs = dict(p_best)
    k = len(probs)
    if k == 1:
        return {greedy: 1.0}
    explore = 1.0 - probs[greedy]
    if explore > cap:
        scale = cap / explore
        probs = {o: (p * scale if o != greedy else 0.0) for o, p in probs.items()}
        probs[greedy] = 1.0 - cap
    floor = min(cfg.min_propensity, 1.0 / k)
    return {o: floor + (1.0 - floor * k) * p for o, p in probs.items()}


def _sample(rng: random.Random, probs: Mapping[str, float]) -> str:
    u = rng.random()
    acc = 0.0
    last = ""
    for o, p in probs.items():
        acc += p
        last = o
        if u < acc:
            return o
    return last  # rounding: the mass left over belongs to the last option


@functools.lru_cache(maxsize=8)
def _grid(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xs = [(k + 0.5) / n for k in range(n)]  # midpoints: finite log-densities even when alpha < 1
    return tuple(math.log(x) for x in xs), tuple(math.log1p(-x) for x in xs)


def p_best_exact(posts: list[Posterior], n: int = 256) -> list[float]:
    """P(option i has the highest mean) under independent Beta posteriors, by quadrature:
    sum over a grid of pdf_i(x) * prod_j CDF_j(x). This is exactly Thompson sampling's
    action distribution, so sampling from it *is* Thompson sampling, with known propensities
    and no Monte-Carlo noise in the log."""
    lx, l1x = _grid(n)
    pmfs: list[list[float]] = []
    cdfs: list[list[float]] = []
    exp = math.exp
    for p in posts:
        am1, bm1 = p.alpha - 1.0, p.beta - 1.0
        logs = [am1 * a + bm1 * b for a, b in zip(lx, l1x, strict=True)]
        top = max(logs)
        # cells below e^-40 of the peak are dropped: they hold no mass, and subnormal floats are slow
        cut = top - 40.0
        w = [exp(v - top) if v > cut else 0.0 for v in logs]
        scale = 1.0 / sum(w)
        pmf = [v * scale for v in w]
        # P(X_j < x_k): the mass below cell k plus half of cell k (ties split evenly)
        below = itertools.accumulate(pmf, initial=0.0)
        pmfs.append(pmf)
        cdfs.append([b + 0.5 * m for b, m in zip(below, pmf, strict=False)])
    if len(posts) == 2:
        p0 = sum(m * c for m, c in zip(pmfs[0], cdfs[1], strict=True))
        return [p0, 1.0 - p0]
    out: list[float] = []
    for i, pmf in enumerate(pmfs):
        acc = pmf
        for j, cdf in enumerate(cdfs):
            if j != i:
                acc = [a * c for a, c in zip(acc, cdf, strict=True)]
        out.append(sum(acc))
    total = sum(out)
    return [v / total for v in out] if total > 0 else [1.0 / len(out)] * len(out)


def choose_dimension(
    rng: random.Random,
    dimension: str,
    options: Iterable[str],
    posts: Mapping[str, Posterior],
    cfg: LearningConfig,
    cap: float | None = None,
) -> DimensionChoice:
    opts = tuple(options)
    if not opts:
        raise ValueError(f"no options for {dimension}")
    means = {o: posts[o].mean for o in opts}
    greedy = max(opts, key=lambda o: means[o])  # first in preference order on ties
    person = {o: (posts[o].person.engaged, posts[o].person.trials) for o in opts}
    if len(opts) == 1:
        return DimensionChoice(
            dimension, opts, {opts[0]: 1.0}, {opts[0]: 1.0}, means, greedy, opts[0], person
        )
    p_best = dict(zip(opts, p_best_exact([posts[o] for o in opts], cfg.grid), strict=True))
    probs = bounded_probs(p_best, greedy, cfg, cap)
    return DimensionChoice(dimension, opts, p_best, probs, means, greedy, _sample(rng, probs), person)


@dataclass(frozen=True, slots=True)
class Choice:
    """One decision's channel, window (and when it opens) and variant, with the evidence."""

    channel: str
    window: str
    at: datetime
    variant: str
    template: str
    segment: str
    dims: dict[str, DimensionChoice] = field(default_factory=dict)
    tz: str = "UTC"
    model: dict[str, Any] | None = None  # learning.model belief: what it predicted, for the link's refit

    @property
    def propensity(self) -> float:
        p = 1.0
        for d in self.dims.values():
            p *= d.propensity
        return p

    def arms(self) -> list[tuple[str, str]]:
        return arms(self.channel, self.window, self.template, self.variant)

    def explain(self) -> str:
        ch = self.dims["channel"]
        local = self.at.astimezone(ZoneInfo(self.tz)).strftime("%H:%M")
        head = f"{self.channel} at {local} ({self.window})"
        if self.variant != "default":
            head += f", variant {self.variant}"
        parts = [f"{head}: P(best)={ch.p_best[self.channel]:.2f}"]
        seen = {o: en for o, en in ch.person.items() if en[1]}
        hist = "engaged with " + ", ".join(f"{e} of {n} {o}" for o, (e, n) in seen.items()) if seen else ""
        parts.append(hist or f"no history yet: prior from segment {self.segment}")
        win = self.dims.get("window")
        if win is not None and len(win.options) > 1:
            engaged_in = {o: e for o, (e, _) in win.person.items() if e}
            if engaged_in:  # reads, clicks and replies, by the window they came in
                parts.append("engaged in " + ", ".join(f"{o} {e}x" for o, e in engaged_in.items()))
        explored = [d.dimension for d in self.dims.values() if d.chosen != d.greedy]
        if explored:
            parts.append("exploring " + "+".join(explored))
        parts.append(f"propensity {self.propensity:.3f}")
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "window": self.window,
            "at": utc(self.at).isoformat(),
            "variant": self.variant,
            "template": self.template,
            "segment": self.segment,
            "propensity": self.propensity,  # exact: OPE divides by it
            "explain": self.explain(),
            "dims": {k: d.to_json() for k, d in self.dims.items()},
            **({"belief": self.model} if self.model is not None else {}),
        }


def arms(channel: str, window: str, template: str, variant: str) -> list[tuple[str, str]]:
    """The (dimension, option) pairs a send is evidence for."""
    return [("channel", channel), ("window", window), ("variant", f"{template}/{variant}")]


def choose(
    view: StatsView,
    *,
    person_key: str,
    segment: str,
    channels: list[str],
    windows: Mapping[str, datetime],
    variants_for: Callable[[str], list[str]],
    template: str,
    rng: random.Random,
    cfg: LearningConfig,
    tz: str = "UTC",
    model: Model | None = None,
) -> Choice:
    """Pick channel (among ``channels``, the gate's allowed list), window and variant; with
    ``model`` (``learning.model: belief``), from the person's joint belief."""
    if not channels:
        raise ValueError("the gate allowed no channel")
    if not windows:
        raise ValueError("no send window")

    # max_exploration bounds the whole decision: split it over the dimensions that have a choice
    n_variants = max(len(variants_for(c) or ["default"]) for c in channels)
    cap = dimension_cap(cfg.max_exploration, sum(n > 1 for n in (len(channels), len(windows), n_variants)))
    if model is not None:
        return _choose_joint(
            model, view, person_key, segment, channels, windows, variants_for, template, rng, cfg, tz, cap
        )

    def dim(name: str, opts: list[str], key: Callable[[str], str] = str) -> DimensionChoice:
        posts = {o: posterior(view, person_key, segment, name, key(o), cfg) for o in opts}
        return choose_dimension(rng, name, opts, posts, cfg, cap)

    ch = dim("channel", list(channels))
    win = dim("window", list(windows))
    var = dim("variant", variants_for(ch.chosen) or ["default"], lambda v: f"{template}/{v}")
    return Choice(
        ch.chosen,
        win.chosen,
        windows[win.chosen],
        var.chosen,
        template,
        segment,
        {"channel": ch, "window": win, "variant": var},
        tz,
    )


@dataclass(frozen=True, slots=True)
class Model:
    """What ``choose`` needs for the joint belief (orchestrator/belief.py): the person's
    settled sends, the fitted link, and the reward a read alone earns."""

    history: list[belief.Observed]
    link: belief.Link
    read_reward: float


def model_counts(history: Iterable[belief.Observed]) -> dict[tuple[str, str], tuple[int, int]]:
    """(dimension, option) -> (engaged, sends) from a person's settled sends, for explanations;
    a window counts the responses that came in its hours."""
    out: dict[tuple[str, str], list[int]] = {}
    for o in history:
        engaged = o.response != "none"
        moved = o.late and o.seen not in (None, o.window)  # it came in another window's hours
        keys: list[tuple[str, str]] = [("channel", o.channel), ("window", o.window), ("variant", o.variant)]
        for key in keys:
            c = out.setdefault(key, [0, 0])
            c[1] += 1
            if engaged and not (key[0] == "window" and moved):
                c[0] += 1
        if engaged and moved:
            out.setdefault(("window", str(o.seen)), [0, 0])[0] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


@dataclass(frozen=True, slots=True)
class Joint:
    """The joint belief about one person at one moment (orchestrator/belief.py), as a
    decision builds it: the shared pool, each option with the window whose hours hold its
    send time, the channels' variant keys, the prior tilted toward the segment and the
    belief (weights over the pool) after the person's settled sends."""

    pool: belief.Pool
    options: dict[belief.Option, str]
    variants: dict[str, list[str]]  # channel -> its variant keys (template/variant)
    prior: list[float]
    weights: list[float]
    link: belief.Link


def joint_belief(
    model: Model,
    view: StatsView,
    person_key: str,
    segment: str,
    channels: list[str],
    windows: Mapping[str, datetime],
    variants_for: Callable[[str], list[str]],
    template: str,
    cfg: LearningConfig,
    tz: str,
    now: datetime | None = None,
) -> Joint:
    """The person's joint belief over ``channels`` x ``windows`` x their variants at ``now``
    (by default the earliest window's send time, as a decision reads it): the prior is the
    pool tilted toward the segment's pooled means, the belief that prior after ``model``'s
    history (``belief.belief``). ``_choose_joint`` decides from it; ``careloop learning
    show`` prints it."""
    names = tuple(cfg.windows)
    pool = belief.pool(cfg.seed, cfg.belief_pool, names)

    def window_of(at: datetime) -> str:
        w = engaged_window(at, tz, cfg)
        assert w is not None  # windows are configured whenever learning chooses one
        return w

    variants = {c: [f"{template}/{v}" for v in (variants_for(c) or ["default"])] for c in channels}
    # each option's window: its own when it is a configured one (two may overlap), else
    # the one whose hours hold its send time (ASAP)
    options = {
        (c, wn, v): wn if wn in cfg.windows else window_of(at)
        for c in channels
        for wn, at in windows.items()
        for v in variants[c]
    }
    # the segment's pooled means, combined as the model assumes (channel x window x wording),
    # lent to the prior as segment_strength pseudo-trials per dimension
    seg = {
        (d, o): posterior(view, person_key, segment, d, o, cfg).segment_mean
        for d, opts in (
            ("channel", channels),
            ("window", list(windows)),
            ("variant", sorted({v for vs in variants.values() for v in vs})),
        )
        for o in opts
    }
    w_avg = math.fsum(seg[("window", wn)] for wn in windows) / len(windows)

    def lent_mean(c: str, wn: str, v: str) -> float:
        base = seg.get(("variant", f"{template}/default"), 0.0) or seg[("variant", v)]
        return (
            seg[("channel", c)]
            * seg[("window", wn)]
            / max(w_avg, 1e-6)
            * seg[("variant", v)]
            / max(base, 1e-6)
        )

    lent = {(c, options[(c, wn, v)], v): lent_mean(c, wn, v) for c, wn, v in options}
    strength = cfg.segment_strength * 3 / max(1, len(lent))
    base = belief.prior(pool, lent, strength, model.link, model.read_reward)
    hazard = 1.0 / cfg.belief_change_days
    exchange = 0.0 if cfg.belief_exchange_days is None else 1.0 / cfg.belief_exchange_days
    at = min(windows.values()) if now is None else now
    theirs = sorted({*channels, *(o.channel for o in model.history)})  # the pairs attention moves between
    w = belief.belief(pool, base, model.history, model.link, hazard, at, exchange, theirs)
    return Joint(pool, options, variants, base, w, model.link)


def _choose_joint(
    model: Model,
    view: StatsView,
    person_key: str,
    segment: str,
    channels: list[str],
    windows: Mapping[str, datetime],
    variants_for: Callable[[str], list[str]],
    template: str,
    rng: random.Random,
    cfg: LearningConfig,
    tz: str,
    cap: float,
) -> Choice:
    """Thompson sampling over the joint belief (``joint_belief``): P(best) of each (channel,
    window, variant) is exact (belief.assess); the choice is drawn dimension by dimension
    from its marginal, then the conditionals given what was drawn, each bounded as
    ``choose_dimension`` bounds it, so the logged propensity (their product) is exact for the
    option sent."""
    joint = joint_belief(model, view, person_key, segment, channels, windows, variants_for, template, cfg, tz)
    pool, options, variants, w = joint.pool, joint.options, joint.variants, joint.weights
    names = pool.windows
    a = belief.assess(pool, w, options, model.link, model.read_reward)
    counts = model_counts(model.history)

    drawn: dict[int, str] = {}  # dimension index -> the option drawn

    def pick(d: int, opts: list[str], shown: Callable[[str], str] = str) -> DimensionChoice:
        """Dimension ``d`` (0 channel, 1 window, 2 variant): P(best) of each option given the
        ones drawn before it (the rest marginalised), and its best mean reward over the rest."""
        dim = DIMENSIONS[d]
        mass = dict.fromkeys(opts, 0.0)
        best_mean = dict.fromkeys(opts, 0.0)
        for opt, pb in a.p_best.items():
            if opt[d] in mass and all(opt[k] == v for k, v in drawn.items()):
                mass[opt[d]] += pb
                best_mean[opt[d]] = max(best_mean[opt[d]], a.mean[opt])
        greedy = max(opts, key=lambda o: best_mean[o])  # first in preference order on ties
        total = math.fsum(mass.values())
        p_best = (
            {o: m / total for o, m in mass.items()} if total > 0 else {o: float(o == greedy) for o in opts}
        )
        probs = bounded_probs(p_best, greedy, cfg, cap) if len(opts) > 1 else {greedy: 1.0}
        chosen = _sample(rng, probs)
        drawn[d] = chosen
        return DimensionChoice(
            dim,
            tuple(shown(o) for o in opts),
            {shown(o): v for o, v in p_best.items()},
            {shown(o): v for o, v in probs.items()},
            {shown(o): v for o, v in best_mean.items()},
            shown(greedy),
            shown(chosen),
            {shown(o): counts.get((dim, o), (0, 0)) for o in opts},
        )

    ch = pick(0, list(channels))
    win = pick(1, list(windows))
    var = pick(2, variants[ch.chosen], lambda v: v.split("/", 1)[1])
    chosen: belief.Option = (ch.chosen, win.chosen, f"{template}/{var.chosen}")
    q = pool.q(chosen[0], options[chosen], chosen[2])
    top = max(a.mean, key=lambda o: a.mean[o])  # the joint best, whatever was drawn
    detail = {
        "q": round(math.fsum(x * y for x, y in zip(w, q, strict=True)), 6),
        "p_active": round(belief.active_share(pool, w, options[chosen]), 6),
        # P(each window is the person's active one): the fit of where late responses land
        "active": {wn: round(belief.active_share(pool, w, wn), 6) for wn in names},
        "link_n": model.link.n,
        "history": len(model.history),
        # offline evaluation's "greedy": the dims' own greedy window and wording are those
        # given the channel drawn, not the joint best when the channel was an exploration
        "greedy": [top[0], top[1], top[2].split("/", 1)[1]],
    }
    return Choice(
        ch.chosen,
        win.chosen,
        windows[win.chosen],
        var.chosen,
        template,
        segment,
        {"channel": ch, "window": win, "variant": var},
        tz,
        detail,
    )


def rng_for(cfg: LearningConfig, *parts: object) -> random.Random:
    """A generator seeded by the decision's identity: replaying a feed makes the same choices."""
    digest = hashlib.sha256("|".join(str(p) for p in (cfg.seed, *parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# ---------------------------------------------------------------------- windows and segments


def _hhmm(text: str) -> time:
    h, m = (int(x) for x in text.split(":"))
    return time(h, m)


def window_options(
    earliest: datetime, now: datetime, tz: str, cfg: LearningConfig, latest: datetime | None = None
) -> dict[str, datetime]:
    """Each configured window's send time: ``earliest`` when it falls inside the window,
    else the window's next opening; windows further than ``max_delay_hours`` from ``now`` or
    at/after ``latest`` (useful life, appointment lead) are left out. Sorted by time."""
    zone = ZoneInfo(tz)
    local = earliest.astimezone(zone)
    out: dict[str, datetime] = {}
    for name, opening_text in cfg.windows.items():
        opening_t = _hhmm(opening_text)
        at: datetime | None = None
        for d in range(3):
            opening = datetime.combine(local.date() + timedelta(days=d), opening_t, tzinfo=zone)
            if opening + timedelta(hours=cfg.window_hours) > local:
                at = max(opening, local)
                break
        if at is None:
            continue
        at = utc(at)
        if at - utc(now) > timedelta(hours=cfg.max_delay_hours):
            continue
        if latest is not None and at >= utc(latest):
            continue
        out[name] = at
    return dict(sorted(out.items(), key=lambda kv: (kv[1], kv[0])))


def engaged_window(at: datetime, tz: str, cfg: LearningConfig) -> str | None:
    """The send window a person showed themselves active in by engaging at ``at`` (reading,
    clicking, replying): the configured window whose span (opening + ``window_hours``, local
    time) holds that moment, else the one nearest to it; None without windows. Send-time
    optimisers learn from *when* people open, click and reply, not only from whether they
    did (Braze Intelligent Timing, Infobip and Mapp STO): a reminder sent at 09:00 and read
    at 19:30 is evidence for the evening window, not the morning one."""
    local = at.astimezone(ZoneInfo(tz))
    minute = local.hour * 60 + local.minute
    span = round(cfg.window_hours * 60)
    best: tuple[int, str] | None = None
    for name, opening_text in cfg.windows.items():
        t = _hhmm(opening_text)
        after = (minute - t.hour * 60 - t.minute) % 1440  # minutes since the window last opened
        if after < span:
            return name
        distance = min(after - span, 1440 - after)  # since it closed, or until it opens
        if best is None or distance < best[0]:
            best = (distance, name)
    return best[1] if best else None


def age_band(birth: str | None, today: date) -> str:
    if not birth:
        return "age?"
    try:
        b = date.fromisoformat(str(birth)[:10]) if len(str(birth)) >= 10 else date(int(str(birth)[:4]), 7, 1)
    except ValueError:
        return "age?"
    years = today.year - b.year - ((today.month, today.day) < (b.month, b.day))
    if years < 18:
        return "<18"
    if years < 40:
        return "18-39"
    if years < 65:
        return "40-64"
    return "65+"


def segment_key(
    cfg: LearningConfig, *, birth: str | None, language: str, reach: Iterable[str], today: date
) -> str:
    """The segment a person pools with: e.g. ``65+|en|email+phone``."""
    parts: list[str] = []
    for by in cfg.segment_by:
        if by == "age_band":
            parts.append(age_band(birth, today))
        elif by == "language":
            parts.append(language)
        elif by == "reach":
            parts.append("+".join(sorted(set(reach))) or "none")
    return "|".join(parts) or "*"


def check_config(app: AppConfig) -> list[str]:
    """Problems a model cannot see alone: windows must lie inside the allowed sending hours."""
    cfg = app.learning
    problems: list[str] = []
    start_s, end_s = app.site.quiet_hours.split("-")
    start = _hhmm(start_s)
    end_min = 24 * 60 if end_s == "24:00" else _hhmm(end_s).hour * 60 + _hhmm(end_s).minute
    if cfg.enabled and not cfg.windows:
        problems.append("learning.windows: at least one window is needed when learning is enabled")
    for name, opening_text in cfg.windows.items():
        t = _hhmm(opening_text)
        open_min = t.hour * 60 + t.minute
        if t < start or open_min + cfg.window_hours * 60 > end_min:
            problems.append(
                f"learning.windows.{name}: {opening_text} + {cfg.window_hours:g}h is not inside "
                f"the allowed sending hours {app.site.quiet_hours}"
            )
    return problems


# ---------------------------------------------------------------------- the store


class MemoryStats:
    """Evidence in a dict: the simulator's store, and the reference for ``DbStats``."""

    @dataclass
    class Cell:
        successes: float = 0.0
        failures: float = 0.0
        trials: int = 0
        engaged: int = 0
        updated_at: datetime = _EPOCH

    def __init__(self, cfg: LearningConfig) -> None:
        self.cfg = cfg
        self.cells: dict[tuple[str, str, str, str], MemoryStats.Cell] = {}
        self.now: datetime | None = None

    def evidence(self, scope: str, key: str, dimension: str, option: str) -> Evidence:
        c = self.cells.get((scope, key, dimension, option))
        if c is None:
            return Evidence()
        f = _decay_factor(c.updated_at, self.now, self.cfg.half_life_days) if self.now else 1.0
        return Evidence(c.successes * f, c.failures * f, c.trials, c.engaged)

    def record(
        self,
        *,
        person_key: str,
        segment: str,
        arms: list[tuple[str, str]],
        now: datetime,
        trial: bool,
        delta: float,
        engaged: int,
        credit: bool = False,
    ) -> None:
        for scope, key in (("population", "*"), ("segment", segment), ("person", person_key)):
            for dimension, option in arms:
                cell = self.cells.setdefault(
                    (scope, key, dimension, option), MemoryStats.Cell(updated_at=now)
                )
                bump(cell, now, self.cfg, trial=trial, delta=delta, engaged=engaged, credit=credit)


class DbStats:
    """The evidence one decision needs (population, its segment, the person), read in one query."""

    def __init__(
        self, s: Session, *, person_key: str, segment: str, now: datetime, cfg: LearningConfig
    ) -> None:
        self.now, self.cfg = now, cfg
        rows = s.exec(
            select(LearningStat).where(
                or_(
                    and_(col(LearningStat.scope) == "population", col(LearningStat.scope_key) == "*"),
                    and_(col(LearningStat.scope) == "segment", col(LearningStat.scope_key) == segment),
                    and_(col(LearningStat.scope) == "person", col(LearningStat.scope_key) == person_key),
                )
            )
        ).all()
        self.rows = {(r.scope, r.scope_key, r.dimension, r.option): r for r in rows}

    def evidence(self, scope: str, key: str, dimension: str, option: str) -> Evidence:
        r = self.rows.get((scope, key, dimension, option))
        if r is None:
            return Evidence()
        f = _decay_factor(r.updated_at, self.now, self.cfg.half_life_days)
        return Evidence(r.successes * f, r.failures * f, r.trials, r.engaged)


def _stat_row(s: Session, scope: str, key: str, dimension: str, option: str, now: datetime) -> LearningStat:
    q = select(LearningStat).where(
        LearningStat.scope == scope,
        LearningStat.scope_key == key,
        LearningStat.dimension == dimension,
        LearningStat.option == option,
    )
    row = s.exec(q.with_for_update()).first()
    if row is not None:
        return row
    row = LearningStat(scope=scope, scope_key=key, dimension=dimension, option=option, updated_at=now)
    try:
        with s.begin_nested():
            s.add(row)
            s.flush()
        return row
    except IntegrityError:  # another worker created it first: use theirs
        found = s.exec(q.with_for_update()).first()
        assert found is not None
        return found


def record(
    s: Session,
    cfg: LearningConfig,
    *,
    person_key: str,
    segment: str,
    arms: list[tuple[str, str]],
    now: datetime,
    trial: bool,
    delta: float,
    engaged: int,
    credit: bool = False,
) -> None:
    """Add a trial and/or move reward mass for ``arms`` at every pooling level (in ``s``'s
    transaction, so the evidence commits with the decision or outcome that caused it);
    ``credit``: see ``bump``."""
    for scope, key in (("population", "*"), ("segment", segment), ("person", person_key)):
        for dimension, option in arms:
            row = _stat_row(s, scope, key, dimension, option, now)
            bump(row, now, cfg, trial=trial, delta=delta, engaged=engaged, credit=credit)


# ---------------------------------------------------------------------- the belief model's store


def observed(row: OutreachOutcome, now: datetime, cfg: LearningConfig, tz: str) -> belief.Observed | None:
    """One learned send as the belief model sees it at ``now`` (orchestrator/belief.py): a
    reply (replied or confirmed), a read (read or clicked), or none once ``reply_window_hours``
    have passed with neither; None while it may still get one, or if it never arrived.
    Responses stamped after ``now`` are not seen yet. Late: the first response came more than
    ``prompt_hours`` after the message reached them. Its window: the configured window it was
    sent in (two windows may overlap), else the one whose hours held the send."""
    if row.failed_at is not None:
        return None
    stamps = (row.read_at, row.clicked_at, row.replied_at, row.confirmed_at)
    firsts = [utc(t) for t in stamps if t is not None and utc(t) <= now]
    sent = utc(row.sent_at)
    window = row.window if row.window in cfg.windows else engaged_window(sent, tz, cfg)
    if window is None:
        return None
    variant = f"{row.template}/{row.variant or 'default'}"
    if not firsts:
        if now - sent < timedelta(hours=cfg.reply_window_hours):
            return None
        return belief.Observed(sent, row.channel, window, variant, "none")
    first = min(firsts)
    came = max(t for t in (sent, utc(row.delivered_at) if row.delivered_at else None) if t is not None)
    late = first - came > timedelta(hours=cfg.prompt_hours)
    replied = [t for t in (row.replied_at, row.confirmed_at) if t is not None and utc(t) <= now]
    response = "reply" if replied else "read"
    return belief.Observed(sent, row.channel, window, variant, response, late, engaged_window(first, tz, cfg))


def history(s: Session, person_id: int, now: datetime, cfg: LearningConfig, tz: str) -> list[belief.Observed]:
    """The person's latest ``belief_history`` settled learned sends, oldest first."""
    rows = s.exec(
        select(OutreachOutcome)
        .where(OutreachOutcome.person_id == person_id, col(OutreachOutcome.learned).is_(True))
        .order_by(col(OutreachOutcome.sent_at).desc(), col(OutreachOutcome.id).desc())
        .limit(cfg.belief_history)
    ).all()
    out = [o for r in rows if (o := observed(r, now, cfg, tz)) is not None]
    return out[::-1]


FIT_ROWS = 5000  # the latest settled sends a refit reads


class LinkCache:
    """The fitted link (belief.fit_link) of one process, refitted each time ``refit_every``
    more learned sends have been logged, from the predictions their decisions logged. The
    fit is a function of the boundary (the last multiple of ``refit_every`` by id) alone: the
    sends up to it, seen as of the boundary sends' latest time (``observed``), so workers that
    refit at different moments, or after a restart, fit the same link (unless an outcome
    stamped before that time was recorded between their refits). Sends whose channel the gate
    changed at send time (``fallback_from``) are left out: their prediction was for another.
    The window a late response came in is read on the person's clock (their timezone, else
    ``site_tz``), as their decisions read it."""

    def __init__(self) -> None:
        self.boundary = -1
        self.link = belief.Link()

    def get(self, s: Session, cfg: LearningConfig, site_tz: str) -> belief.Link:
        top = s.exec(select(func.max(OutreachOutcome.id))).one() or 0
        boundary = top // cfg.refit_every * cfg.refit_every
        if boundary == self.boundary:
            return self.link
        latest = s.exec(
            select(func.max(OutreachOutcome.sent_at)).where(col(OutreachOutcome.id) <= boundary)
        ).one()
        settled: list[belief.Settled] = []
        if latest is not None:
            as_of = utc(latest)
            rows = s.exec(
                select(OutreachOutcome, Decision.detail, Person.timezone)
                .join(Decision, col(OutreachOutcome.decision_id) == col(Decision.id))
                .join(Person, col(OutreachOutcome.person_id) == col(Person.id))
                .where(
                    col(OutreachOutcome.learned).is_(True),
                    col(OutreachOutcome.id) <= boundary,
                    col(OutreachOutcome.sent_at) < as_of - timedelta(hours=cfg.reply_window_hours),
                )
                .order_by(col(OutreachOutcome.id).desc())
                .limit(FIT_ROWS)
            ).all()
            for row, detail, tz in rows:
                info = (detail or {}).get("learning", {})
                said = info.get("belief")
                o = observed(row, as_of, cfg, tz or site_tz)
                if isinstance(said, dict) and o is not None and not info.get("fallback_from"):
                    active = said.get("active")
                    seen = belief.seen_share(active, o) if isinstance(active, dict) else None
                    settled.append(
                        belief.Settled(float(said["q"]), float(said["p_active"]), o.response, o.late, seen)
                    )
        self.boundary, self.link = boundary, belief.fit_link(settled[::-1], windows=len(cfg.windows))
        return self.link
