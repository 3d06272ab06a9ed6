"""Declarative CRM mapping: the example mapping file, its validation at config check, and
``careloop mapping test`` on the CRM samples."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from careloop import config as cfgmod
from careloop.errors import ConfigError, PermanentError, SkipMessage
from careloop.model import Identifier
from careloop.wiring import check
from mapping.declarative import DeclarativeMapper, load_spec
from tests.conftest import FIXTURES, ROOT

CRM_MAPPING = FIXTURES / "mapping" / "crm.yaml"
SAMPLES = FIXTURES / "crm"


@pytest.fixture(scope="module")
def mapper() -> DeclarativeMapper:
    return DeclarativeMapper(load_spec(CRM_MAPPING, "mapping"))


def sample(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((SAMPLES / name).read_text())
    return doc


def test_refund_sample_maps_to_crm_event_with_normalised_identifiers(mapper: DeclarativeMapper) -> None:
    ev = mapper.map_document(sample("refund_initiated.json"))
    assert ev.type == "crm.refund.initiated"
    assert ev.occurred_at == datetime(2026, 3, 2, 14, 15, tzinfo=UTC)
    # MRN with the HL7 feed's assigning authority; phone to E.164; email lower-cased.
    assert [(i.kind, i.token()) for i in ev.identifiers] == [
        ("mrn", "NWH|NW100003"),
        ("phone", "phone|+15555550103"),
        ("email", "email|carla.fictivo@example.org"),
    ]
    assert ev.attributes == {"product": "dental-plan", "crm_event_id": "evt_0001"}
    assert ev.subject is not None and ev.subject_ref == "Basic/evt-0001"


def test_crm_contact_id_and_verified_flags_are_read_from_the_payload(mapper: DeclarativeMapper) -> None:
    doc = sample("offer_eligible.json")
    doc["contact"] = {
        "id": "C-778",
        "email": "Pat@Example.org",
        "email_verified": True,
        "phone": "+15555550188",
    }
    ev = mapper.map_document(doc)
    by_kind = {i.kind: i for i in ev.identifiers}
    assert by_kind["crm"] == Identifier("urn:careloop:example:crm:contact", "C-778", "crm")
    assert by_kind["email"].verified is True and by_kind["phone"].verified is False


def test_unmapped_event_type_is_skipped_with_reason(mapper: DeclarativeMapper) -> None:
    with pytest.raises(SkipMessage, match=r"'newsletter\.opened' is not mapped"):
        mapper.map_document(sample("unmapped_type.json"))


def test_invalid_phone_is_left_out_and_named_without_its_value(mapper: DeclarativeMapper) -> None:
    doc = sample("refund_initiated.json")
    doc["contact"]["phone"] = "12"
    ev = mapper.map_document(doc)
    assert [i.kind for i in ev.identifiers] == ["mrn", "email"]
    assert ev.attributes["invalid_identifiers"] == ["phone"]


@pytest.mark.parametrize(
    "value,expected",
    [
        (1772460900000, datetime(2026, 3, 2, 14, 15, tzinfo=UTC)),
        (1772460900, datetime(2026, 3, 2, 14, 15, tzinfo=UTC)),
        ("2026-03-02T14:15:00Z", datetime(2026, 3, 2, 14, 15, tzinfo=UTC)),
    ],
)
def test_occurred_at_accepts_iso_and_epoch(mapper: DeclarativeMapper, value: Any, expected: datetime) -> None:
    assert (
        mapper.map_document({**sample("refund_initiated.json"), "occurred_at": value}).occurred_at == expected
    )


@pytest.mark.parametrize("value", [None, "2026-03-02T14:15:00", "yesterday"])
def test_missing_or_naive_time_is_a_permanent_error(mapper: DeclarativeMapper, value: Any) -> None:
    with pytest.raises(PermanentError, match="occurred_at"):
        mapper.map_document({**sample("refund_initiated.json"), "occurred_at": value})


# --------------------------------------------------------------------------- config check


def write_config(tmp_path: Path, mapping: dict[str, Any] | None, ref: str = "maps/crm.yaml") -> Path:
    if mapping is not None:
        (tmp_path / "maps").mkdir(exist_ok=True)
        (tmp_path / "maps" / "crm.yaml").write_text(yaml.safe_dump(mapping))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "site": {"channels": []},
                "connectors": {
                    "crm": {
                        "plugin": "webhook",
                        "path": "/webhooks/crm",
                        "signature": "standard-webhooks",
                        "secret": "whsec_Y2FyZWxvb3AtZGV2LWNybS13ZWJob29rLXNlY3JldA==",
                        "mapping": ref,
                    }
                },
            }
        )
    )
    return cfg


GOOD: dict[str, Any] = yaml.safe_load(CRM_MAPPING.read_text())


@pytest.mark.parametrize(
    "change,problem",
    [
        (
            {"type_map": {"refund.initiated": "refund.initiated"}},
            "type_map.refund.initiated: 'refund.initiated' is not a journey event type",
        ),
        ({"occurred_at": "occurred_at[["}, "occurred_at: not a valid JMESPath expression"),
        (
            {"identifiers": [{"kind": "mrn", "value": "contact.mrn"}]},
            "identifiers.0: system: required for kind mrn",
        ),
        (
            {"identifiers": [{"kind": "phone", "value": "p", "system": "tel"}]},
            "identifiers.0: system: phone identifiers always use system 'phone'",
        ),
        (
            {"subject": {"resourceType": "Refund", "id": "id"}},
            "subject.resourceType: is not a FHIR R4B resource type",
        ),
        ({"typo": 1}, "typo: unknown key"),
    ],
)
def test_mapping_errors_are_reported_at_config_check_with_their_path(
    tmp_path: Path, change: dict[str, Any], problem: str
) -> None:
    path = write_config(tmp_path, {**GOOD, **change})
    with pytest.raises(ConfigError) as exc:
        check(cfgmod.load(path))
    where = f"connectors.crm.mapping: {tmp_path / 'maps' / 'crm.yaml'}: "
    assert any(p.startswith(where + problem) for p in exc.value.problems), exc.value.problems


def test_missing_mapping_file_is_reported_with_its_path(tmp_path: Path) -> None:
    path = write_config(tmp_path, None, ref="maps/none.yaml")
    with pytest.raises(ConfigError) as exc:
        check(cfgmod.load(path))
    assert exc.value.problems == [
        f"connectors.crm.mapping: {tmp_path / 'maps' / 'none.yaml'}: file not found"
    ]


def test_relative_mapping_path_resolves_against_the_config_folder(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    old = os.getcwd()
    os.chdir(elsewhere)
    try:
        assert "crm" in check(cfgmod.load(path)).connectors
    finally:
        os.chdir(old)


def test_bad_secret_is_reported_without_the_secret(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "site": {"channels": []},
                "connectors": {
                    "crm": {
                        "plugin": "webhook",
                        "path": "/webhooks/crm",
                        "signature": "standard-webhooks",
                        "secret": "hunter2-plain",
                    }
                },
            }
        )
    )
    with pytest.raises(ConfigError) as exc:
        check(cfgmod.load(cfg))
    assert exc.value.problems == ["connectors.crm: secret: must be whsec_ followed by base64"]
    assert "hunter2" not in str(exc.value)


# --------------------------------------------------------------------------- careloop mapping test


def test_cli_mapping_test_prints_events_and_resources_for_crm_sample(tmp_path: Path) -> None:
    # The real console script, with a config holding the example's crm block only.
    cfg = tmp_path / "example-crm.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "site": {"channels": []},
                "connectors": {
                    "crm": {
                        "plugin": "webhook",
                        "path": "/webhooks/crm",
                        "signature": "standard-webhooks",
                        "secret": "${CRM_WEBHOOK_SECRET:-whsec_Y2FyZWxvb3AtZGV2LWNybS13ZWJob29rLXNlY3JldA==}",
                        "mapping": str(CRM_MAPPING),
                    }
                },
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_")}
    out = subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "careloop"),
            "mapping",
            "test",
            "--config",
            str(cfg),
            "--connector",
            "crm",
            "--sample",
            str(SAMPLES / "refund_initiated.json"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    [ev] = doc["events"]
    assert ev["type"] == "crm.refund.initiated" and ev["subject"] == "Basic/evt-0001"
    assert ev["occurred_at"] == "2026-03-02T09:15:00-05:00"
    assert {"system": "NWH", "value": "NW100003", "kind": "mrn"} in ev["identifiers"]
    assert ev["attributes"]["product"] == "dental-plan"
    assert doc["resources"] == [
        {
            "resourceType": "Basic",
            "id": "evt-0001",
            "code": {
                "coding": [{"system": "urn:careloop:example:crm:event-type", "code": "refund.initiated"}]
            },
        }
    ]
    # The same path in-process for the unmapped sample (one subprocess is enough).
    from careloop.mapping_test import map_sample

    skipped = map_sample(cfgmod.load(cfg), "crm", (SAMPLES / "unmapped_type.json").read_bytes())
    assert skipped == {
        "events": [],
        "resources": [],
        "skipped": ["message 1: event type 'newsletter.opened' is not mapped"],
        "errors": [],
    }
