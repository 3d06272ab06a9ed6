"""The learning simulator (bench/learning_sim.py, issue 10): its rule checker sees a send the
gate would refuse, so "0 violations" in its figures means something; people read and reply
when they are active."""

from __future__ import annotations

import importlib.util
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from careloop.config import LearningConfig
from orchestrator import gate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sim() -> ModuleType:
    spec = importlib.util.spec_from_file_location("learning_sim", ROOT / "bench" / "learning_sim.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["learning_sim"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _world(sim: Any, n_people: int = 60, n_requests: int = 1200) -> tuple[list[Any], list[Any]]:
    import random

    days = n_requests / (n_people * sim.RATE)
    rng = random.Random(5)
    people = sim.population(rng, n_people, days)
    return people, sim.requests(rng, people, n_requests, days)


def test_policies_break_no_rule_and_the_checker_sees_a_send_the_gate_would_refuse(
    sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = LearningConfig(enabled=True)
    people, reqs = _world(sim)
    assert any(p.deceased or p.opted_out for p in people)  # the world has people to protect
    beta = sim.Learner(sim.as_model(cfg, "beta"), "beta")
    for policy in (sim.Fixed(), sim.Learner(cfg), beta, sim.Oracle()):
        r = sim.run(policy, people, reqs, cfg, 5)
        assert r.violations == 0 and r.sends > 0, policy.name

    class Rogue(sim.Policy):  # type: ignore[misc]
        name = "rogue"

        def choose(
            self, p: Any, now: datetime, allowed: list[str], windows: dict[str, datetime], *_: Any
        ) -> tuple[str, str, str]:
            return "sms", next(iter(windows)), "default"  # whatever the gate allowed

    def waved_through(p: Any, now: datetime, channels: list[str], *_: Any) -> gate.Verdict:
        return gate.Verdict("send", "waved through", channel=channels[0], allowed=tuple(channels))

    monkeypatch.setattr(sim, "_gate", waved_through)
    r = sim.run(Rogue(), people, reqs, cfg, 5)
    assert r.violations > 10, r.violations  # caps, opt-outs, night sends, the deceased: all counted


def test_a_read_comes_when_the_person_is_active(sim: Any) -> None:
    people, _ = _world(sim)
    p = next(x for x in people if x.pref == "evening")
    morning = datetime(2026, 3, 4, 14, 0, tzinfo=UTC)  # 09:00 in New York
    assert sim.part_of_day(morning) == "morning"
    assert p.engaged_at(morning, late=0.9, spot=0.5) == morning + timedelta(hours=1)  # saw it now
    later = p.engaged_at(morning, late=0.1, spot=0.5)
    assert sim.part_of_day(later) == "evening" and later - morning < timedelta(hours=12)
    evening = datetime(2026, 3, 4, 23, 0, tzinfo=UTC)  # 18:00 local: already their time
    assert p.engaged_at(evening, late=0.1, spot=0.5) == evening + timedelta(hours=1)
    midday = datetime(2026, 3, 4, 18, 0, tzinfo=UTC)  # 13:00 local: read when the evening starts
    assert p.engaged_at(midday, late=0.1, spot=0.0) == datetime(2026, 3, 4, 22, 0, tzinfo=UTC)
