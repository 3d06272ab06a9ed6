"""The configuration file: YAML, ``${ENV}`` substitution, validated by pydantic.

The kernel validates its own sections here; plugin sections (connectors, channels) and
the orchestrator's (playbooks, templates) are validated by their owners' models, composed
in ``careloop.wiring.check``. Every error carries its dotted path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    model_validator,
)

from careloop.errors import ConfigError

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _port(v: int) -> int:
    if not 1 <= v <= 65535:
        raise ValueError("must be between 1 and 65535")
    return v


def _tz(v: str) -> str:
    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("is not a known IANA time zone") from None
    return v


def _hours(v: str) -> str:
    if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-4]):[0-5]\d", v):
        raise ValueError("must look like 08:00-21:00")
    start, end = v.split("-")
    if start >= end:  # same-width zero-padded text: compares as the times do
        raise ValueError(
            "is the allowed sending window (like 08:00-21:00): its start must be before its end "
            "on the same day, not the quiet period"
        )
    return v


Port = Annotated[int, AfterValidator(_port)]
TimeZoneName = Annotated[str, AfterValidator(_tz)]
QuietHours = Annotated[str, AfterValidator(_hours)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteConfig(Strict):
    timezone: TimeZoneName = "UTC"
    quiet_hours: QuietHours = Field("08:00-21:00", description="allowed sending window, local time")
    language: str = "en"
    channels: list[str] = Field(default_factory=lambda: ["sms", "email"], description="default preference")


class ServerConfig(Strict):
    host: str = "127.0.0.1"
    port: Port = 8080


class DatabaseConfig(Strict):
    url: str | None = None


class AuditConfig(Strict):
    signing_key: str | None = Field(None, description="Ed25519 private key (PEM) file for checkpoints")
    checkpoint_every: int = Field(1000, ge=1)
    checkpoint_minutes: int = Field(
        60, ge=1, description="also checkpoint after this many minutes if records were added"
    )
    retention_days: int = Field(6 * 366, ge=2190, description="never below six years")
    token_key: str | None = Field(
        None, description="HS256 secret file for auditor API tokens (careloop token keygen)"
    )
    raw_retention_days: int | None = Field(
        None, ge=1, description="blank finished raw message bodies after this many days (None: keep)"
    )


class CapConfig(Strict):
    per_day: int = Field(ge=0)
    per_week: int = Field(ge=0)

    @model_validator(mode="after")
    def _week_holds_a_day(self) -> CapConfig:
        if self.per_day > self.per_week:
            raise ValueError(f"per_day ({self.per_day}) cannot exceed per_week ({self.per_week})")
        return self


class DeliveryConfig(Strict):
    """How the outbox (channels/outbox.py) retries a transient failure (a provider or relay
    that is down): exponential backoff with jitter from ``retry_base_seconds`` up to
    ``retry_cap_seconds`` between attempts, at most ``max_attempts`` sends, then the item is
    dead-lettered. The defaults ride out an outage of a few hours (an escalation email must
    not be given up after a minute)."""

    max_attempts: int = Field(10, ge=1, le=100)
    retry_base_seconds: float = Field(30.0, gt=0)
    retry_cap_seconds: float = Field(3600.0, gt=0)

    @model_validator(mode="after")
    def _cap_holds_the_base(self) -> DeliveryConfig:
        if self.retry_cap_seconds < self.retry_base_seconds:
            raise ValueError("retry_cap_seconds cannot be less than retry_base_seconds")
        return self


def _default_caps() -> dict[str, CapConfig]:
    # The FCC healthcare exemption's limits for calls and texts.
    return {"sms": CapConfig(per_day=1, per_week=3), "voice": CapConfig(per_day=1, per_week=3)}


_PURPOSE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def _purposes(v: list[str]) -> list[str]:
    for p in v:
        if not _PURPOSE.fullmatch(p):
            raise ValueError(f"{p!r} is not a purpose name such as marketing (lower case, no '*')")
    if len(set(v)) != len(v):
        raise ValueError("lists a purpose twice")
    return v


class ComplianceConfig(Strict):
    """Rules the compliance gate (orchestrator/gate.py) applies to every outbound item."""

    frequency_caps: dict[str, CapConfig] = Field(default_factory=_default_caps)
    # TCPA: marketing texts need prior express written consent; HIPAA: marketing needs an
    # authorization. Treatment and operations messages (reminders) need neither.
    opt_in_required: Annotated[list[str], AfterValidator(_purposes)] = Field(
        default_factory=lambda: ["marketing"],
        description="purposes sent only to people with a recorded opt-in for that channel and "
        "purpose (a consent.granted event); others are suppressed with reason no-consent",
    )
    opt_in_max_age_days: int | None = Field(
        None, ge=1, description="an opt-in older than this many days no longer counts (None: never expires)"
    )
    shared_contact: Literal["hold", "send"] = Field(
        "hold",
        description="a phone or email that several people's records hold (a family phone): hold "
        "the message for staff (outbox status held, reason identity-unresolved; careloop outbox "
        "release|cancel), or send (a pediatric practice that texts parents about each child)",
    )


def _clock_time(v: str) -> str:
    if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", v):
        raise ValueError("must look like 12:00")
    return v


ClockTime = Annotated[str, AfterValidator(_clock_time)]


def _default_windows() -> dict[str, ClockTime]:
    return {"morning": "09:00", "midday": "12:00", "evening": "18:00"}


OUTCOMES = ("delivered", "read", "clicked", "replied", "confirmed", "attended", "noshow")


def _rewards(v: dict[str, float]) -> dict[str, float]:
    for k, w in v.items():
        if k not in OUTCOMES:
            raise ValueError(f"unknown outcome {k!r} (known: {', '.join(OUTCOMES)})")
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"reward for {k} must be between 0 and 1")
    return v


def _default_rewards() -> dict[str, float]:
    return {
        "delivered": 0.0,
        "read": 0.3,
        "clicked": 0.6,
        "replied": 1.0,
        "confirmed": 1.0,
        "attended": 1.0,
        "noshow": 0.0,
    }


SegmentBy = Literal["age_band", "language", "reach"]
SEGMENT_BY: tuple[SegmentBy, ...] = ("age_band", "language", "reach")


BELIEF_EXPLORATION: dict[str, float] = {"max_exploration": 0.0, "min_propensity": 0.005}


class LearningConfig(Strict):
    """Issue 10 (orchestrator/learning.py): learn channel, send window and template variant
    per person from outcomes, always among the options the compliance gate allows."""

    enabled: bool = False
    windows: dict[str, ClockTime] = Field(
        default_factory=_default_windows, description="send windows: name -> local opening time"
    )
    window_hours: float = Field(3.0, gt=0, le=12, description="how long each window stays open")
    max_delay_hours: float = Field(12.0, ge=0, le=72, description="longest a send may wait for a window")
    min_lead_hours: float = Field(2.0, ge=0, description="open windows this long before the visit")
    max_exploration: float = Field(
        0.1, ge=0, le=1, description="cap on P(not the mean-best option); belief's default is 0"
    )
    min_propensity: float = Field(
        0.02, ge=0, le=0.5, description="floor on each allowed option's P; belief's default is 0.005"
    )
    rewards: Annotated[dict[str, float], AfterValidator(_rewards)] = Field(
        default_factory=_default_rewards,
        description="outcome -> reward in [0, 1]; an outreach earns its best",
    )
    reply_window_hours: float = Field(48.0, gt=0, description="a reply within this long credits the send")
    prompt_hours: float = Field(
        1.0, ge=0, description="a read or reply this soon after the send credits the window it went in"
    )
    confirm_window_days: float = Field(7.0, gt=0, description="a confirmation within this long credits it")
    population_strength: float = Field(20.0, gt=0, description="pseudo-trials the population lends a segment")
    segment_strength: float = Field(4.0, gt=0, description="pseudo-trials the segment lends a person")
    half_life_days: float | None = Field(60.0, gt=0, description="older outcomes weigh half after this long")
    segment_by: list[SegmentBy] = Field(default_factory=lambda: list(SEGMENT_BY))
    grid: int = Field(128, ge=32, le=4096, description="quadrature points for P(best) per option")
    seed: int = 0
    model: Literal["beta", "belief"] = Field(
        "belief",
        description="belief (default): a joint model of each person (orchestrator/belief.py) rebuilt "
        "from their outcomes, its read and timing link fitted; beta: a pooled posterior per option "
        "of each dimension",
    )
    belief_pool: int = Field(400, ge=50, le=5000, description="belief: candidate people in the pool")
    belief_history: int = Field(60, ge=1, le=500, description="belief: a person's latest sends it reads")
    belief_change_days: float = Field(
        365.0, gt=0, description="belief: a person's preferences are redrawn about this often"
    )
    belief_exchange_days: float | None = Field(
        365.0,
        gt=0,
        description="belief: a person's attention moves from one of their channels to another "
        "(the two rates exchanged) about this often; null: never",
    )
    refit_every: int = Field(1000, ge=50, description="belief: refit the read and timing link every N sends")

    @model_validator(mode="wrap")
    @classmethod
    def _exploration_by_model(
        cls, data: Any, handler: ModelWrapValidatorHandler[LearningConfig]
    ) -> LearningConfig:
        """The belief model learns from every send's reads and timing, not only from what it
        tries, so exploring beyond the propensity floor costs more than it teaches (measured
        by bench/learning_sim.py: about 3 points of the oracle's engagement): its defaults are
        no exploration beyond a 0.005 floor. A value the file gives is kept; a default put in
        here is not counted as given (``model_fields_set``), so a copy for another model
        rebuilt from the fields given takes that model's defaults."""
        filled: list[str] = []
        if isinstance(data, dict) and data.get("model", "belief") == "belief":
            filled = [k for k in BELIEF_EXPLORATION if k not in data]
            data = {**BELIEF_EXPLORATION, **data}
        got = handler(data)
        got.model_fields_set.difference_update(filled)
        return got


class AppConfig(Strict):
    """The whole file. Plugin and playbook sections stay dicts here; see careloop.wiring."""

    site: SiteConfig = Field(default_factory=SiteConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    compliance: ComplianceConfig = Field(default_factory=ComplianceConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    connectors: dict[str, dict[str, Any]] = Field(default_factory=dict)
    channels: dict[str, dict[str, Any]] = Field(default_factory=dict)
    templates: dict[str, dict[str, Any]] = Field(default_factory=dict)
    playbooks: dict[str, dict[str, Any]] = Field(default_factory=dict)
    triage: dict[str, Any] = Field(default_factory=dict)  # orchestrator.triage.TriageConfig
    learning: LearningConfig = Field(default_factory=LearningConfig)  # issue 10
    base_dir: Path = Field(Path("."), exclude=True, description="folder of the file; set by load()")


def format_errors(err: ValidationError, prefix: tuple[str | int, ...] = ()) -> list[str]:
    """pydantic errors as ``dotted.path: message`` lines."""
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (*prefix, *e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        out.append(f"{loc}: {msg}" if loc else msg)
    return out


def substitute_env(value: Any, path: str = "", problems: list[str] | None = None) -> Any:
    """Replace ``${NAME}`` and ``${NAME:-default}`` in every string, recursively."""
    problems = problems if problems is not None else []

    def repl(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        problems.append(f"{path}: environment variable {name} is not set")
        return ""

    if isinstance(value, str):
        return _ENV.sub(repl, value)
    if isinstance(value, dict):
        return {k: substitute_env(v, f"{path}.{k}" if path else str(k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, f"{path}.{i}", problems) for i, v in enumerate(value)]
    return value


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. (YAML 1.1 reads ``on:``, ``no`` and ``off`` as
    booleans, which would turn a playbook's ``on:`` key into True.)"""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag != "tag:yaml.org,2002:bool"]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_raw(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError([f"{path}: not valid YAML{where}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping"])
    return data


def load(path: str | Path) -> AppConfig:
    """Parse and validate the kernel sections of a config file (ConfigError lists every problem)."""
    path = Path(path)
    problems: list[str] = []
    data = substitute_env(load_raw(path), problems=problems)
    try:
        cfg = AppConfig.model_validate({**data, "base_dir": path.parent.resolve()})
    except ValidationError as err:
        problems.extend(format_errors(err))
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return cfg
