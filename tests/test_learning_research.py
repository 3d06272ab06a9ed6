"""bench/learning_research.py (issue 10's research tools) on a tiny world: the ablation at
``exact`` is the sim's InformedBayes figure for figure, a knob it replaces costs engagement, and
the prototype model learner breaks no rule and beats the site's fixed policy."""

from __future__ import annotations

import pytest

from bench import learning_research as research
from bench import learning_sim as sim

TINY = research.Size(people=60, requests=1500, after=700)
TINY_ARGS = ["--people", "60", "--requests", "1500", "--after", "700", "--seeds", "5", "--jobs", "1"]


def test_the_ablation_at_exact_is_the_sims_informed_bayes_and_a_replaced_piece_costs() -> None:
    out = research.ablate_seed(5, TINY, ["exact", "reads=frac,timing=ignore"], particles=40)
    ref = sim.one_seed(
        5,
        TINY.people,
        TINY.requests,
        TINY.after,
        [lambda c, s: sim.Learner(c), lambda c, s: sim.Oracle(), lambda c, s: sim.InformedBayes(c, s, 40)],
    )
    exact, informed = out["exact"], ref["informed"]
    assert {k: v for k, v in exact.items() if k != "seconds"} == {
        k: v for k, v in informed.items() if k != "seconds"
    }  # every figure: the same sends, the same expected engagement, request by request
    assert out["oracle"]["post"] == ref["oracle"]["post"]
    blind = out["reads=frac,timing=ignore"]
    assert blind["violations"] == exact["violations"] == 0
    assert blind["post"] < exact["post"]  # without the read and timing likelihoods it learns less


def test_the_model_learner_breaks_no_rule_and_beats_the_fixed_policy(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert research.main(["model", *TINY_ARGS, "--set", "n=200", "--set", "refit_every=400"]) == 0
    text = capsys.readouterr().out
    assert "compliance-gate violations: 0 OK" in text
    row = next(line for line in text.splitlines() if "model/fixed engagement, all requests" in line)
    assert float(row.split("±")[0].split()[-1]) > 1.1, row  # the mean ratio to the fixed policy
    assert "fitted a=" in text


def test_a_bad_variant_or_option_is_refused_before_anything_runs() -> None:
    with pytest.raises(SystemExit, match="prior"):
        research.main(["ablate", *TINY_ARGS, "--variants", "prior=psychic"])
    with pytest.raises(SystemExit, match="floor"):
        research.main(["model", *TINY_ARGS, "--set", "floor=0.9"])
