"""Identity linking for CRM payloads (careloop.identity), through the real mapping stage:
CRM contacts link to patients by MRN, or by a verified phone or email that exactly one
person holds; anything ambiguous is held for staff, never guessed."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from sqlmodel import Session, col, select

from careloop import identity
from careloop.model import Identifier
from careloop.pipeline import IngestSink, MapStage
from careloop.store import Store
from careloop.tables import JourneyEvent, PersonIdentifier
from careloop.wiring import MapperRegistry
from connectors.webhook import WebhookConfig, WebhookConnector
from tests.conftest import FIXTURES

CRM_SYSTEM = "urn:careloop:example:crm:contact"
_EVENT_IDS = itertools.count(1)


def patient(store: Store, mrn: str, phone: str | None = None, email: str | None = None) -> int:
    """A person as the HL7 feed creates one: MRN with its authority, phone and email."""
    ids = [Identifier("NWH", mrn, "mrn")]
    if phone:
        ids.append(Identifier("phone", phone, "phone"))
    if email:
        ids.append(Identifier("email", email, "email"))
    with store.session() as s:
        res = identity.resolve(s, ids, store.clock.now())
    assert res.person_id is not None
    return res.person_id


def receive(store: Store, *contacts: dict[str, Any]) -> list[JourneyEvent]:
    """CRM events through accept -> sink -> mapping stage; returns their journey events."""
    conn = WebhookConnector(
        "crm",
        WebhookConfig(
            plugin="webhook",
            path="/webhooks/crm",
            signature="stripe",
            secret="whsec_x",
            mapping=FIXTURES / "mapping" / "crm.yaml",
        ),
    )
    sink = IngestSink(store)
    for contact in contacts:
        body = {
            "id": f"evt_{next(_EVENT_IDS)}",
            "type": "offer.eligible",
            "occurred_at": "2026-03-02T09:00:00-05:00",
            "contact": contact,
            "data": {"product": "vision-plan"},
        }
        sink.put_sync(conn.accept(json.dumps(body).encode(), {}))
    MapStage(store, MapperRegistry({"crm": conn})).run_once_sync()
    with Session(store.engine) as s:
        return list(s.exec(select(JourneyEvent).order_by(col(JourneyEvent.id))).all())


def identifiers(store: Store, person: int) -> set[tuple[str, bool]]:
    with Session(store.engine) as s:
        rows = s.exec(select(PersonIdentifier).where(PersonIdentifier.person_id == person)).all()
        return {(f"{r.system}|{r.value}", r.verified) for r in rows}


def test_crm_contact_with_mrn_links_to_the_hl7_patient(store: Store) -> None:
    pid = patient(store, "NW100003", "+15555550103")
    [ev] = receive(store, {"id": "C-1", "mrn": "NW100003", "email": "new.addr@example.org"})
    assert (ev.person_id, ev.status) == (pid, "pending")
    assert (f"{CRM_SYSTEM}|C-1", False) in identifiers(store, pid)


def test_new_crm_contact_links_through_verified_email_held_by_one_person(store: Store) -> None:
    pid = patient(store, "NW100003", email="carla.fictivo@example.org")
    patient(store, "NW100004", email="someone.else@example.org")
    [ev] = receive(store, {"id": "C-2", "email": "Carla.Fictivo@example.org", "email_verified": True})
    assert ev.person_id == pid
    assert (f"{CRM_SYSTEM}|C-2", False) in identifiers(store, pid)
    assert ("email|carla.fictivo@example.org", True) in identifiers(store, pid)  # now known verified


def test_later_events_of_a_linked_crm_contact_need_no_contact_point(store: Store) -> None:
    pid = patient(store, "NW100003", phone="+15555550103")
    first, later = receive(
        store, {"id": "C-3", "phone": "+1 (555) 555-0103", "phone_verified": True}, {"id": "C-3"}
    )
    assert first.person_id == later.person_id == pid


def test_unverified_email_does_not_bind_a_new_crm_contact_to_a_patient(store: Store) -> None:
    pid = patient(store, "NW100003", email="carla.fictivo@example.org")
    [ev] = receive(store, {"id": "C-4", "email": "carla.fictivo@example.org"})
    assert ev.person_id is not None and ev.person_id != pid
    assert (f"{CRM_SYSTEM}|C-4", False) not in identifiers(store, pid)


def test_verified_email_shared_by_two_people_holds_the_event_for_staff(store: Store) -> None:
    patient(store, "NW100005", email="family@example.org")
    patient(store, "NW100006", email="family@example.org")
    [ev] = receive(store, {"id": "C-5", "email": "family@example.org", "email_verified": True})
    assert (ev.person_id, ev.status, ev.status_reason) == (None, "held", "ambiguous-identity")
    with Session(store.engine) as s:
        linked = s.exec(select(PersonIdentifier).where(PersonIdentifier.value == "C-5")).all()
    assert linked == []  # nothing guessed, nothing linked


def test_verified_phone_and_email_of_different_people_is_ambiguous(store: Store) -> None:
    patient(store, "NW100007", phone="+15555550107")
    patient(store, "NW100008", email="other@example.org")
    [ev] = receive(
        store,
        {
            "id": "C-6",
            "phone": "+15555550107",
            "phone_verified": True,
            "email": "other@example.org",
            "email_verified": True,
        },
    )
    assert (ev.status, ev.status_reason) == ("held", "ambiguous-identity")


def test_contact_only_payload_with_shared_phone_is_held(store: Store) -> None:
    patient(store, "NW100009", phone="+15555550109")
    patient(store, "NW100010", phone="+15555550109")
    [ev] = receive(store, {"phone": "+15555550109"})
    assert (ev.status, ev.status_reason) == ("held", "ambiguous-identity")


def test_formatted_phone_matches_the_e164_phone_from_hl7(store: Store) -> None:
    pid = patient(store, "NW100011", phone="+15555550111")
    [ev] = receive(store, {"phone": "(555) 555-0111"})
    assert ev.person_id == pid


def test_mrn_and_crm_id_of_different_people_is_a_conflict(store: Store) -> None:
    patient(store, "NW100012")
    receive(store, {"id": "C-7", "mrn": "NW100013"})
    events = receive(store, {"id": "C-7", "mrn": "NW100012"})
    assert len(events) == 2
    assert (events[-1].status, events[-1].status_reason) == ("held", "identity-conflict")


@pytest.mark.parametrize("verified", [True, False])
def test_contact_only_payload_links_to_one_holder_whatever_the_verified_flag(
    store: Store, verified: bool
) -> None:
    # Contact-only payloads follow the kernel rule whatever the flag: one holder -> that person.
    pid = patient(store, "NW100014", email="solo@example.org")
    [ev] = receive(store, {"email": "solo@example.org", "email_verified": verified})
    assert ev.person_id == pid


def test_resolve_keeps_verified_out_of_identifier_equality() -> None:
    assert Identifier("email", "a@example.org", "email", verified=True) == Identifier(
        "email", "a@example.org", "email"
    )
