"""Plugin discovery through entry-point groups; built-ins register the same way.

Entry points are listed without importing them; a plugin module is imported only when
a config enables it (no registration as a side effect of import).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

GROUPS = {
    "connector": "careloop.connectors",
    "mapper": "careloop.mappers",
    "channel": "careloop.channels",
}


class PluginConfig(BaseModel):
    """Base of every plugin's Config: unknown keys are errors; ``plugin`` names the plugin."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    plugin: str


class Plugin:
    """What every plugin class declares: its registered name and its Config model."""

    name: ClassVar[str]
    Config: ClassVar[type[PluginConfig]] = PluginConfig


@dataclass(frozen=True, slots=True)
class Health:
    """A plugin's state for ``/readyz`` and status pages (connectors must report it; channels
    may, see ``channels.base.Channel``). ``ok``: it works (a connector takes messages in, a
    channel can send). ``degraded``: it works, but something it depends on is not in place (an
    EHR subscription, the last poll, a channel's credentials that the provider rejected);
    ``detail`` says what, or carries plain counters when all is well. Never PHI or secrets."""

    ok: bool
    detail: str = ""
    degraded: bool = False


@cache
def _entry_points(kind: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUPS[kind])}


def names(kind: str) -> list[str]:
    """The registered plugin names of ``kind``, sorted."""
    return sorted(set(_entry_points(kind)) | {n for k, n in _added if k == kind})


# Explicitly added plugins (tests, embedding applications): checked before entry points.
_added: dict[tuple[str, str], Any] = {}


def add(kind: str, name: str, cls: Any) -> None:
    """Register ``cls`` as plugin ``name`` of ``kind`` for this process."""
    _added[(kind, name)] = cls


def load(kind: str, name: str) -> Any:
    """The plugin class registered as ``name``; KeyError if there is none."""
    if (kind, name) in _added:
        return _added[(kind, name)]
    return _load_entry_point(kind, name)


@cache
def _load_entry_point(kind: str, name: str) -> Any:
    eps = _entry_points(kind)
    if name not in eps:
        raise KeyError(name)
    return eps[name].load()


def build(cls: Any, id: str, config: PluginConfig, **deps: Any) -> Any:
    """Instantiate a plugin: ``cls(id, config, **wanted)`` where ``wanted`` are the
    dependencies (store, clock, http, app_config, ...) its constructor names."""
    import inspect

    params = inspect.signature(cls).parameters
    return cls(id, config, **{k: v for k, v in deps.items() if k in params})


@dataclass(frozen=True, slots=True)
class MapperChoice:
    """A connector's own mapper, named rather than imported: the ``careloop.mappers``
    plugin ``plugin`` built with ``options`` (plugin packages never import each other;
    DESIGN.md). A connector offers one through ``mapper_choice()``."""

    plugin: str
    options: Mapping[str, Any] = field(default_factory=dict)


def build_mapper(choice: MapperChoice) -> Any:
    """The mapper ``choice`` names; KeyError for an unknown plugin, ConfigError (from the
    mapper) for bad options."""
    return load("mapper", choice.plugin)(**dict(choice.options))
