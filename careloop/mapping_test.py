"""Offline mapping of one sample: connector accept -> mapper, touching no store."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from careloop.config import AppConfig
from careloop.errors import ConfigError, PermanentError, SkipMessage
from careloop.tables import RawMessage
from careloop.wiring import MapperRegistry, build_connectors, check


def map_sample(config: AppConfig, connector: str, sample: bytes) -> dict[str, Any]:
    """``{"events": [...], "resources": [...], "skipped": [...]}`` for one sample."""
    checked = check(config)
    if connector not in checked.connectors:
        raise ConfigError(
            [
                f"--connector: unknown connector {connector!r} (config has: "
                f"{', '.join(sorted(checked.connectors))})"
            ]
        )
    conns = build_connectors(checked, app_config=config)
    mappers = MapperRegistry(conns)
    events: list[dict[str, Any]] = []
    resources: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    errors: list[str] = []
    now = datetime.now(UTC)
    for i, item in enumerate(conns[connector].accept(sample, {})):
        raw = RawMessage(
            id=i + 1,
            connector=connector,
            kind=item.kind,
            content_type=item.content_type,
            dedup_key=item.dedup_key,
            received_at=now,
            body=item.body,
            headers=dict(item.headers),
        )
        mapper = mappers(raw)
        if mapper is None:
            skipped.append(f"message {i + 1}: no mapper for {item.kind}")
            continue
        try:
            mapped = mapper.map(raw)
        except SkipMessage as exc:
            skipped.append(f"message {i + 1}: {exc}")
            continue
        except PermanentError as exc:
            errors.append(f"message {i + 1}: {exc}")
            continue
        for ev in mapped:
            events.append(
                {
                    "type": ev.type,
                    "occurred_at": ev.occurred_at.isoformat(),
                    "subject": ev.subject_ref,
                    "identifiers": [
                        {"system": x.system, "value": x.value, "kind": x.kind} for x in ev.identifiers
                    ],
                    "attributes": ev.attributes,
                }
            )
            if ev.patient:
                pid = next((x.value for x in ev.identifiers if x.kind == "mrn"), None) or f"sample-{i + 1}"
                patient = {
                    "resourceType": "Patient",
                    "id": _safe_id(pid),
                    **{k: v for k, v in ev.patient.items() if k != "resourceType"},
                }
                resources[f"Patient/{patient['id']}"] = patient
            if ev.subject and ev.subject_ref:
                resources[ev.subject_ref] = ev.subject
    return {"events": events, "resources": list(resources.values()), "skipped": skipped, "errors": errors}


def _safe_id(v: str) -> str:
    out = "".join(c if c.isalnum() or c in "-." else "-" for c in v)[:64]
    return out or "unknown"
