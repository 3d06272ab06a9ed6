"""Config for issue 10: the ``learning:`` section and template ``variants``, checked with paths."""

from __future__ import annotations

from typing import Any

import pytest

from bench import learning_sim as sim
from careloop.config import AppConfig, LearningConfig
from careloop.errors import ConfigError
from careloop.wiring import check
from orchestrator.templates import TemplateConfig, render


def _problems(raw: dict[str, Any]) -> list[str]:
    try:
        check(AppConfig.model_validate({"site": {"channels": []}, **raw}))
    except ConfigError as exc:
        return exc.problems
    return []


BASE = {"sms": {"en": "Hi {{ person.language }}"}}


def test_learning_is_off_by_default_and_old_configs_need_no_change() -> None:
    cfg = AppConfig.model_validate({"templates": {"t": BASE}})
    assert cfg.learning.enabled is False
    assert _problems({"templates": {"t": BASE}}) == []


def test_variant_bodies_are_checked_like_the_others() -> None:
    probs = _problems(
        {
            "templates": {
                "t": {
                    **BASE,
                    "variants": {
                        "short": {"sms": {"en": "Hi {{ patient_name }}"}},
                        "html": {"email": {"en": {"subject": "s", "text": "t"}}},
                        "empty": {},
                    },
                }
            }
        }
    )
    bad_var = "templates.t.variants.short.sms.en: unknown variable 'patient_name'"
    assert any(p.startswith(bad_var) for p in probs)
    assert "templates.t.variants.html.email: the template has no email body to vary" in probs
    assert "templates.t.variants.empty: needs at least one body (sms, email or text)" in probs


def test_windows_must_sit_inside_the_allowed_sending_hours() -> None:
    probs = _problems({"learning": {"windows": {"late": "20:00", "dawn": "07:00", "ok": "12:00"}}})
    assert any(p.startswith("learning.windows.late:") for p in probs)
    assert any(p.startswith("learning.windows.dawn:") for p in probs)
    assert not any(p.startswith("learning.windows.ok") for p in probs)


@pytest.mark.parametrize(
    "raw,msg",
    [
        ({"rewards": {"opened_twice": 1.0}}, "unknown outcome 'opened_twice'"),
        ({"rewards": {"replied": 2.0}}, "reward for replied must be between 0 and 1"),
        ({"windows": {"m": "9am"}}, "must look like 12:00"),
        ({"segment_by": ["zodiac"]}, "Input should be"),
        ({"max_exploration": 1.5}, "less than or equal to 1"),
    ],
)
def test_bad_learning_settings_are_refused(raw: dict[str, Any], msg: str) -> None:
    with pytest.raises(Exception, match=msg):
        AppConfig.model_validate({"learning": raw})


def test_a_variant_renders_its_own_body_and_falls_back_for_other_kinds() -> None:
    tpl = TemplateConfig.model_validate(
        {
            "sms": {"en": "long {{ product }}"},
            "email": {"en": {"subject": "s", "text": "mail {{ product }}"}},
            "variants": {"short": {"sms": {"en": "short {{ product }}"}}},
        }
    )
    ctx = {"product": "p"}
    assert render(tpl.with_variant("short"), "sms", "en", ctx) == {"text": "short p"}
    assert render(tpl.with_variant("short"), "email", "en", ctx) == {"subject": "s", "text": "mail p"}
    assert render(tpl.with_variant("default"), "sms", "en", ctx) == {"text": "long p"}
    assert tpl.variants_for("sms") == ["default", "short"] and tpl.variants_for("email") == ["default"]


def test_the_belief_model_explores_only_to_its_floor_unless_the_file_says_otherwise() -> None:
    beta = AppConfig.model_validate({"learning": {"enabled": True, "model": "beta"}}).learning
    assert (beta.max_exploration, beta.min_propensity) == (0.1, 0.02)
    belief = AppConfig.model_validate({"learning": {"enabled": True}}).learning  # the default model
    assert belief.model == "belief" and (belief.max_exploration, belief.min_propensity) == (0.0, 0.005)
    told = {"enabled": True, "model": "belief", "max_exploration": 0.05, "min_propensity": 0.01}
    kept = AppConfig.model_validate({"learning": told}).learning
    assert (kept.max_exploration, kept.min_propensity) == (0.05, 0.01)
    # belief's defaults are not "given": rebuilt from what was given, another model takes its own
    again = LearningConfig.model_validate(belief.model_dump(exclude_unset=True) | {"model": "beta"})
    assert (again.max_exploration, again.min_propensity) == (0.1, 0.02)
    assert (sim.as_model(belief, "beta").max_exploration, sim.as_model(kept, "beta").max_exploration) == (
        0.1,
        0.05,
    )
