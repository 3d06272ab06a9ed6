"""The learner's exploration bound is per decision (issue 10): ``max_exploration`` caps the
probability that a decision leaves the posterior-mean best option in any of its dimensions
(channel, window, variant), not each dimension separately."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from careloop.config import LearningConfig
from orchestrator import learning

NOW = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)
OPTIONS = {
    "channel": ["sms", "email"],
    "window": ["morning", "midday", "evening"],
    "variant": ["t/default", "t/short"],
}


def _stats(cfg: LearningConfig, evidence: dict[tuple[str, str], tuple[float, float]]) -> learning.MemoryStats:
    stats = learning.MemoryStats(cfg)
    for (dimension, option), (s, f) in evidence.items():
        cell = stats.cells.setdefault(("person", "p", dimension, option), learning.MemoryStats.Cell())
        cell.successes, cell.failures = s, f
    return stats


def _choose(stats: learning.MemoryStats, cfg: LearningConfig, seed: int) -> learning.Choice:
    windows = {w: NOW + timedelta(hours=i) for i, w in enumerate(OPTIONS["window"])}
    return learning.choose(
        stats,
        person_key="p",
        segment="s",
        channels=list(OPTIONS["channel"]),
        windows=windows,
        variants_for=lambda c: ["default", "short"],
        template="t",
        rng=random.Random(seed),
        cfg=cfg,
    )


@given(
    st.dictionaries(
        st.sampled_from([(d, o) for d, opts in OPTIONS.items() for o in opts]),
        st.tuples(st.floats(0, 20), st.floats(0, 20)),
    ),
    st.floats(0, 1),
    st.integers(0, 2**32),
)
@settings(max_examples=200, deadline=None)
def test_exploration_is_bounded_per_decision(
    evidence: dict[tuple[str, str], tuple[float, float]], max_exp: float, seed: int
) -> None:
    cfg = LearningConfig(enabled=True, max_exploration=max_exp, min_propensity=0.0, grid=64)
    choice = _choose(_stats(cfg, evidence), cfg, seed)
    stays = 1.0
    for d in choice.dims.values():
        assert abs(sum(d.probs.values()) - 1.0) < 1e-9
        stays *= d.probs[d.greedy]
    assert 1.0 - stays <= max_exp + 1e-9


def test_no_evidence_explores_within_the_configured_bound() -> None:
    """With nothing learned every option is equally likely to be best; the per-dimension cap
    alone would let 1 - 0.9^3 = 27% of decisions explore, the decision-level one 10%."""
    cfg = LearningConfig(enabled=True, max_exploration=0.1, min_propensity=0.0, grid=64)
    stats = _stats(cfg, {})
    choice = _choose(stats, cfg, 1)
    stays = 1.0
    for d in choice.dims.values():
        assert 1.0 - d.probs[d.greedy] > 0.0  # each dimension still explores a little
        stays *= d.probs[d.greedy]
    assert abs((1.0 - stays) - 0.1) < 1e-9
    explored = sum(
        any(d.chosen != d.greedy for d in _choose(stats, cfg, seed).dims.values()) for seed in range(2000)
    )
    assert 120 <= explored <= 280  # 10% of 2,000, with room for chance (sd ~13)


def test_the_floor_still_reaches_every_option() -> None:
    cfg = LearningConfig(enabled=True, max_exploration=0.0, min_propensity=0.02, grid=64)
    stats = _stats(cfg, {("channel", "sms"): (20.0, 0.0), ("channel", "email"): (0.0, 20.0)})
    choice = _choose(stats, cfg, 7)
    for d in choice.dims.values():
        assert min(d.probs.values()) >= 0.02 - 1e-12
