"""Composition: turns a validated AppConfig into plugins and stages.

This is the one kernel module that knows the plugin packages; everything else meets in
the kernel's model and tables. ``check`` collects every configuration problem with its
dotted path; ``build_*`` instantiate what the config enables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from careloop import plugins
from careloop.config import AppConfig, format_errors
from careloop.errors import ConfigError
from careloop.tables import RawMessage
from channels.base import Channel, ChannelCaps, max_phi
from orchestrator import templates as tmpl
from orchestrator.gate import ChannelFacts
from orchestrator.playbooks import PlaybookConfig, templates_used
from orchestrator.templates import TemplateConfig

if TYPE_CHECKING:
    from careloop.pipeline import MapperLike
    from connectors.base import Connector


@dataclass
class Checked:
    """The config with every plugin section validated by its plugin's model."""

    app: AppConfig
    connectors: dict[str, tuple[type[Any], Any]] = field(default_factory=dict)
    channels: dict[str, tuple[type[Any], Any]] = field(default_factory=dict)
    templates: dict[str, TemplateConfig] = field(default_factory=dict)
    playbooks: dict[str, PlaybookConfig] = field(default_factory=dict)


def _plugin_section(
    kind: str, section: str, entries: Mapping[str, dict[str, Any]], problems: list[str]
) -> dict[str, tuple[type[Any], Any]]:
    out: dict[str, tuple[type[Any], Any]] = {}
    known = plugins.names(kind)
    for pid, raw in entries.items():
        if not isinstance(raw, dict):
            problems.append(f"{section}.{pid}: must be a mapping")
            continue
        name = raw.get("plugin")
        if not name:
            problems.append(f"{section}.{pid}.plugin: required (known: {', '.join(known)})")
            continue
        try:
            cls = plugins.load(kind, name)
        except KeyError:
            problems.append(f"{section}.{pid}.plugin: unknown plugin {name!r} (known: {', '.join(known)})")
            continue
        try:
            out[pid] = (cls, cls.Config.model_validate(raw))
        except ValidationError as err:
            problems.extend(format_errors(err, (section, pid)))
    return out


def _port_clashes(app: AppConfig, connectors: Mapping[str, tuple[type[Any], Any]]) -> list[str]:
    """Two listeners of this hub on one TCP port: the second would fail only at start."""
    taken: dict[int, str] = {app.server.port: "server.port"}
    out = []
    for cid, (_cls, cfg) in connectors.items():
        port = getattr(cfg, "port", None)
        if not isinstance(port, int) or port == 0:
            continue
        where = f"connectors.{cid}.port"
        if port in taken:
            out.append(f"{where}: {port} is already {taken[port]}")
        else:
            taken[port] = where
    return out


def check(app: AppConfig) -> Checked:
    """Validate every section; raise ConfigError listing all problems."""
    problems: list[str] = []
    checked = Checked(app)
    checked.connectors = _plugin_section("connector", "connectors", app.connectors, problems)
    for cid, (cls, cfg) in checked.connectors.items():
        # Checks a model cannot make alone (files a connector names, e.g. a mapping file).
        extra = getattr(cls, "check_config", None)
        if extra is not None:
            problems.extend(extra(cid, cfg, app))
    problems.extend(_port_clashes(app, checked.connectors))
    checked.channels = _plugin_section("channel", "channels", app.channels, problems)
    for name, raw in app.templates.items():
        try:
            t = TemplateConfig.model_validate(raw)
        except ValidationError as err:
            problems.extend(format_errors(err, ("templates", name)))
            continue
        problems.extend(tmpl.check(name, t))
        for cid, (cls, _cfg) in checked.channels.items():
            length_check = getattr(cls, "check_template", None)
            if length_check is not None:
                problems.extend(f"templates.{name}: {p} (channel {cid})" for p in length_check(t, _cfg))
                for vname in t.variants:  # issue 10: each variant is held to the same limits
                    problems.extend(
                        f"templates.{name}.variants.{vname}: {p} (channel {cid})"
                        for p in length_check(t.with_variant(vname), _cfg)
                    )
        checked.templates[name] = t
    for name, raw in app.playbooks.items():
        try:
            pb = PlaybookConfig.model_validate(raw)
        except ValidationError as err:
            problems.extend(format_errors(err, ("playbooks", name)))
            continue
        for i, step in enumerate(pb.steps):
            if step.send and step.send not in app.templates:
                problems.append(f"playbooks.{name}.steps.{i}.send: unknown template {step.send!r}")
            for ch in step.channels or []:
                if ch not in app.channels:
                    problems.append(f"playbooks.{name}.steps.{i}.channels: unknown channel {ch!r}")
        checked.playbooks[name] = pb
    for i, ch in enumerate(app.site.channels):
        if ch not in app.channels:
            problems.append(f"site.channels.{i}: unknown channel {ch!r}")
    if app.triage:  # issue 9: inbound triage and the escalation queue
        from orchestrator.triage import check_config as check_triage

        problems.extend(check_triage(app.triage, app.base_dir, set(app.templates), set(app.channels)))
    from orchestrator.learning import check_config as check_learning  # issue 10

    problems.extend(check_learning(app))
    if problems:
        raise ConfigError(problems)
    return checked


def channel_facts(channels: Mapping[str, Channel]) -> dict[str, ChannelFacts]:
    return {
        cid: ChannelFacts(cid, ch.capabilities.address_kind, ch.capabilities.template_kind, max_phi(ch))
        for cid, ch in channels.items()
    }


def build_channels(checked: Checked, *, capture: bool = False, **deps: Any) -> dict[str, Channel]:
    """The configured channels; with ``capture`` each is replaced by a capture channel that
    keeps the real one's capabilities (replay: decide as in production, send nothing)."""
    from channels.capture import CaptureChannel

    out: dict[str, Channel] = {}
    for cid, (cls, cfg) in checked.channels.items():
        if capture:
            caps: ChannelCaps = cls.capabilities
            ch = CaptureChannel(cid, cfg, imitate=caps)
            ch.config = cfg
            out[cid] = ch
        else:
            out[cid] = plugins.build(cls, cid, cfg, **deps)
    return out


def build_connectors(checked: Checked, **deps: Any) -> dict[str, Connector]:
    return {cid: plugins.build(cls, cid, cfg, **deps) for cid, (cls, cfg) in checked.connectors.items()}


class MapperRegistry:
    """Finds the mapper for a raw message: the connector's own (``mapper_choice()``, a
    ``plugins.MapperChoice``) first, else a registered mapper that accepts the message's
    kind."""

    def __init__(self, connectors: Mapping[str, Connector]) -> None:
        self._by_connector: dict[str, MapperLike | None] = {}
        for cid, conn in connectors.items():
            own = getattr(conn, "mapper_choice", None)
            if callable(own):
                choice = own()
                self._by_connector[cid] = plugins.build_mapper(choice) if choice is not None else None
        self._by_kind: dict[str, MapperLike | None] = {}

    def __call__(self, raw: RawMessage) -> MapperLike | None:
        if raw.connector in self._by_connector:
            return self._by_connector[raw.connector]
        if raw.kind not in self._by_kind:
            self._by_kind[raw.kind] = self._find(raw.kind)
        return self._by_kind[raw.kind]

    @staticmethod
    def _find(kind: str) -> MapperLike | None:
        from mapping.base import accepts

        for name in plugins.names("mapper"):
            cls = plugins.load("mapper", name)
            if accepts(cls, kind):
                mapper: MapperLike = cls()
                return mapper
        return None


def unused_templates(checked: Checked) -> list[str]:
    used = {t for pb in checked.playbooks.values() for t in templates_used(pb)}
    return sorted(set(checked.templates) - used)
