"""CRM signals through replay (the real pipeline on a virtual clock, channels capturing),
with the example playbooks: a refund for a product suppresses the discount offer for
that product, not for another; CRM contacts link to the patients the HL7 feed created.
Offers are marketing, so each feed first records the person's opt-in, as the CRM sends it
(``consent.granted`` with data.channel and data.purpose; see fixtures/mapping/crm.yaml)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from careloop import config as cfgmod
from careloop.replay import Replayer, build_report, read_feed
from tests.conftest import FIXTURES
from tests.kernel_plugins import register

register()
CONFIG = FIXTURES / "config" / "crm-test.yaml"
ADMIT = (FIXTURES / "hl7" / "adt_a01_admit.hl7").read_text().replace("\r\n", "\r").replace("\n", "\r")


def crm(at: str, eid: str, etype: str, product: str, **contact: Any) -> str:
    contact = contact or {"mrn": "NW100003", "email": "carla.fictivo@example.org"}
    body = {"id": eid, "type": etype, "occurred_at": at, "contact": contact, "data": {"product": product}}
    return json.dumps({"at": at, "connector": "crm", "body": body})


def crm_consent(at: str, eid: str, etype: str = "consent.granted", **contact: Any) -> str:
    """The CRM's record of an SMS marketing opt-in (or, with consent.revoked, its withdrawal)."""
    contact = contact or {"mrn": "NW100003", "email": "carla.fictivo@example.org"}
    data = {"channel": "sms", "purpose": "marketing"}
    body = {"id": eid, "type": etype, "occurred_at": at, "contact": contact, "data": data}
    return json.dumps({"at": at, "connector": "crm", "body": body})


def adt(at: str) -> str:
    return json.dumps({"at": at, "connector": "adt", "body": ADMIT})


def run_feed(tmp_path: Path, lines: list[str]) -> dict[str, Any]:
    feed = tmp_path / "feed.jsonl"
    feed.write_text("\n".join(lines) + "\n")
    parsed = read_feed(feed)
    rp = Replayer(cfgmod.load(CONFIG), start=parsed[0].at)
    try:
        asyncio.run(rp.feed(parsed))
        return build_report(rp.store)
    finally:
        rp.close()


def test_refund_suppresses_discount_offer_for_that_product_only(tmp_path: Path) -> None:
    rep = run_feed(
        tmp_path,
        [
            adt("2026-03-02T08:15:00-05:00"),
            crm_consent("2026-03-02T09:00:00-05:00", "evt_c1"),
            crm("2026-03-03T10:00:00-05:00", "evt_r1", "refund.initiated", "dental-plan"),
            crm("2026-03-04T10:00:00-05:00", "evt_o1", "offer.eligible", "dental-plan"),
            crm("2026-03-05T10:00:00-05:00", "evt_o2", "offer.eligible", "vision-plan"),
        ],
    )
    assert [(d["template"], d["playbook"], d["channel"], d["at"]) for d in rep["deliveries"]] == [
        ("discount-offer", "discount-offer", "sms", "2026-03-05T15:00:00+00:00")
    ]
    assert [(s["playbook"], s["template"], s["reason"], s["at"]) for s in rep["suppressed"]] == [
        ("discount-offer", "discount-offer", "refund-in-progress", "2026-03-04T15:00:00+00:00")
    ]
    # One person: the CRM events found the patient the ADT feed created, by MRN NWH|NW100003.
    assert len(rep["people"]) == 1
    [(person, idents)] = rep["people"].items()
    assert "NWH|NW100003" in idents and "phone|+15555550103" in idents
    assert {e["type"] for e in rep["events"]} >= {
        "consent.granted",
        "crm.refund.initiated",
        "crm.offer.eligible",
    }
    assert all(e["person"] == person for e in rep["events"])


def test_offer_without_refund_is_delivered_and_refund_after_30_days_no_longer_blocks(tmp_path: Path) -> None:
    rep = run_feed(
        tmp_path,
        [
            crm_consent("2026-01-02T10:00:00-05:00", "evt_c1", mrn="NW100001", phone="+15555550101"),
            crm(
                "2026-01-05T10:00:00-05:00",
                "evt_r1",
                "refund.initiated",
                "dental-plan",
                mrn="NW100001",
                phone="+15555550101",
            ),
            crm(
                "2026-03-04T10:00:00-05:00",
                "evt_o1",
                "offer.eligible",
                "dental-plan",
                mrn="NW100001",
                phone="+15555550101",
            ),
        ],
    )
    assert [d["template"] for d in rep["deliveries"]] == ["discount-offer"]
    assert rep["suppressed"] == []


def test_replayed_crm_delivery_counts_once(tmp_path: Path) -> None:
    line = crm(
        "2026-03-04T10:00:00-05:00",
        "evt_o1",
        "offer.eligible",
        "vision-plan",
        mrn="NW100002",
        phone="+15555550102",
    )
    consent = crm_consent("2026-03-04T09:00:00-05:00", "evt_c1", mrn="NW100002", phone="+15555550102")
    rep = run_feed(
        tmp_path,
        [
            consent,
            line,
            line.replace('"at": "2026-03-04T10:00:00-05:00"', '"at": "2026-03-04T10:01:00-05:00"'),
        ],
    )
    assert [e["type"] for e in rep["events"]] == ["consent.granted", "crm.offer.eligible"]
    assert len(rep["deliveries"]) == 1


def test_unmapped_crm_type_is_stored_and_skipped(tmp_path: Path) -> None:
    from sqlmodel import Session, select

    from careloop.tables import RawMessage

    feed = tmp_path / "feed.jsonl"
    feed.write_text(crm("2026-03-04T10:00:00-05:00", "evt_n1", "newsletter.opened", "none") + "\n")
    parsed = read_feed(feed)
    rp = Replayer(cfgmod.load(CONFIG), start=parsed[0].at)
    try:
        asyncio.run(rp.feed(parsed))
        with Session(rp.store.engine) as s:
            [raw] = s.exec(select(RawMessage)).all()
        assert (raw.status, raw.status_reason) == ("skipped", "event type 'newsletter.opened' is not mapped")
        assert build_report(rp.store)["events"] == []
    finally:
        rp.close()
