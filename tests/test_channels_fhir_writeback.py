"""fhir_writeback: the conformance kit, conditional create against a local FHIR server that
honours If-None-Exist, Task for escalations, and recovery by identifier search."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import httpx
import pytest
from fhir.resources.R4B.communication import Communication
from fhir.resources.R4B.task import Task
from sqlmodel import select

from careloop.errors import ChannelUnavailable, PermanentError
from careloop.store import Store
from careloop.tables import Escalation, OutboxItem, Person
from channels.base import ABSENT
from channels.fhir_writeback import (
    FhirWritebackChannel,
    FhirWritebackConfig,
    communication_content,
    condition,
    task_content,
)
from channels.outbox import DeliverStage
from channels.testing import Behaviour, ChannelConformance, Provider, ScriptedHTTP
from tests.fake_fhir import FakeFhir

TOKEN = "ehr-access-token-0001"
SENT = datetime(2026, 3, 2, 14, 5, tzinfo=UTC)


def delivered_sms(key: str = "sms-1") -> OutboxItem:
    return OutboxItem(
        id=9,
        key=key,
        person_id=1,
        channel="sms",
        template="appointment-reminder",
        purpose="treatment",
        phi_class="none",
        recipient="+15550100001",
        subject_ref="Appointment/appt-1",
        content={"text": "Reminder: visit on Mar 5."},
        created_at=SENT,
    )


def item(key: str, content: dict[str, Any] | None = None) -> OutboxItem:
    return OutboxItem(
        id=10,
        key=key,
        person_id=1,
        channel="ehr-writeback",
        template="appointment-reminder",
        purpose="treatment",
        phi_class="none",
        recipient="Patient/pat-1",
        subject_ref="Appointment/appt-1",
        content=content or communication_content(delivered_sms(), "sms", SENT),
        created_at=SENT,
    )


def config(base_url: str = "https://ehr.example.org/fhir", **kw: Any) -> dict[str, Any]:
    return {
        "plugin": "fhir_writeback",
        "base_url": base_url,
        "bearer_token": TOKEN,
        "sender": "Organization/clinic-1",
        **kw,
    }


def created(request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        201,
        json={"resourceType": "Communication", "id": "c1"},
        headers={"Location": "https://ehr.example.org/fhir/Communication/c1/_history/1"},
    )


class TestFhirWritebackConformance(ChannelConformance):
    channel_class = FhirWritebackChannel
    secrets = (TOKEN,)
    bad_configs: ClassVar[list[tuple[dict[str, Any], str]]] = [
        ({"base_url": "ehr.example.org"}, "base_url"),
        ({"base_url": "http://ehr.example.org/fhir"}, "base_url"),
        ({"sender": "not a reference"}, "sender"),
        ({"timeout_seconds": -1}, "timeout_seconds"),
    ]

    def config(self) -> dict[str, Any]:
        return config()

    def item(self, key: str) -> OutboxItem:
        return item(key)

    @asynccontextmanager
    async def provider(self, behaviour: Behaviour) -> AsyncIterator[Provider]:
        http = ScriptedHTTP(behaviour, created)
        ch = FhirWritebackChannel(
            "ehr-writeback", FhirWritebackConfig.model_validate(config()), http=http.client
        )
        try:
            yield Provider(ch, lambda: http.accepted)
        finally:
            await http.client.aclose()


@pytest.fixture
def ehr() -> Iterator[FakeFhir]:
    f = FakeFhir(token=TOKEN)
    f.start()
    yield f
    f.stop()


def run_channel(ehr: FakeFhir, fn: Any, **cfg: Any) -> Any:
    async def go() -> Any:
        ch = FhirWritebackChannel(
            "ehr-writeback", FhirWritebackConfig.model_validate(config(ehr.base_url, **cfg))
        )
        try:
            return await fn(ch)
        finally:
            await ch.aclose()

    return asyncio.run(go())


def test_communication_is_created_once_even_when_resent_by_a_new_process(ehr: FakeFhir) -> None:
    first = run_channel(ehr, lambda ch: ch.send(item("wb-1")))
    again = run_channel(ehr, lambda ch: ch.send(item("wb-1")))  # no memory of the first send
    assert ehr.posts == 2 and ehr.creates == 1
    assert first.provider_id == again.provider_id == "Communication/1"
    assert first.detail["created"] is True and again.detail["created"] is False
    [res] = ehr.resources["Communication"].values()
    Communication.model_validate(res)
    assert res["identifier"][0] == {"system": "urn:careloop:outbox", "value": "wb-1"}
    assert res["identifier"][1] == {"system": "urn:careloop:outbox:delivered", "value": "sms-1"}
    assert res["subject"] == {"reference": "Patient/pat-1"} and res["about"] == [
        {"reference": "Appointment/appt-1"}
    ]
    assert res["medium"][0]["coding"][0]["code"] == "SMSWRIT" and res["sent"] == SENT.isoformat()
    assert res["sender"] == {"reference": "Organization/clinic-1"} and "payload" not in res


def test_payload_text_only_when_configured(ehr: FakeFhir) -> None:
    run_channel(ehr, lambda ch: ch.send(item("wb-text")), include_text=True)
    [res] = ehr.resources["Communication"].values()
    assert res["payload"] == [{"contentString": "Reminder: visit on Mar 5."}]


def test_identifier_with_search_delimiters_is_escaped_and_matched(ehr: FakeFhir) -> None:
    key = "odd|key,with$chars\\"
    run_channel(ehr, lambda ch: ch.send(item(key)))
    run_channel(ehr, lambda ch: ch.send(item(key)))
    assert ehr.creates == 1
    assert condition("urn:careloop:outbox", "a|b") == "identifier=urn%3Acareloop%3Aoutbox%7Ca%5C%7Cb"


def test_several_matches_is_permanent(ehr: FakeFhir) -> None:
    for _ in range(2):
        ehr.put(
            "Communication",
            {
                "resourceType": "Communication",
                "status": "completed",
                "identifier": [{"system": "urn:careloop:outbox", "value": "dup"}],
            },
        )
    with pytest.raises(PermanentError, match="412"):
        run_channel(ehr, lambda ch: ch.send(item("dup")))


def test_a_rejected_token_is_the_channels_outage_not_the_items(ehr: FakeFhir) -> None:
    with pytest.raises(ChannelUnavailable, match="rejected the channel's credentials"):
        run_channel(ehr, lambda ch: ch.send(item("wb-auth")), bearer_token="stale-token")


def test_escalation_becomes_a_task(ehr: FakeFhir) -> None:
    esc = Escalation(
        id=5,
        person_id=1,
        created_at=SENT,
        severity="urgent",
        reason="symptom-report",
        due_at=SENT + timedelta(hours=1),
    )
    receipt = run_channel(ehr, lambda ch: ch.record_escalation(esc, "Patient/pat-1"))
    again = run_channel(ehr, lambda ch: ch.record_escalation(esc, "Patient/pat-1"))
    assert receipt.provider_id == again.provider_id == "Task/1" and ehr.creates == 1
    [task] = ehr.resources["Task"].values()
    Task.model_validate(task)
    assert task["priority"] == "urgent" and task["status"] == "requested" and task["intent"] == "order"
    assert task["for"] == {"reference": "Patient/pat-1"}
    assert {"system": "urn:careloop:escalation", "value": "5"} in task["identifier"]
    assert task["code"]["coding"][0]["code"] == "symptom-report"


def test_task_content_through_the_outbox_row(ehr: FakeFhir) -> None:
    esc = Escalation(id=6, person_id=1, created_at=SENT, severity="emergency", reason="chest-pain")
    run_channel(ehr, lambda ch: ch.send(item("wb-task", task_content(esc, "Call the patient"))))
    [task] = ehr.resources["Task"].values()
    assert task["priority"] == "stat" and task["description"] == "Call the patient"
    assert task["focus"] == {"reference": "Appointment/appt-1"}


def test_invalid_content_is_permanent_naming_the_field() -> None:
    ch = FhirWritebackChannel("ehr-writeback", FhirWritebackConfig.model_validate(config()))
    with pytest.raises(PermanentError, match="medium"):
        ch.resource(item("bad", {"medium": "pigeon"}))
    with pytest.raises(PermanentError, match="severity"):
        ch.resource(item("bad", {"kind": "task", "reason": "x", "severity": "whenever"}))
    bad = item("bad")
    bad.recipient = "+15550100001"
    with pytest.raises(PermanentError, match="Patient reference") as err:
        ch.resource(bad)
    assert "+1555" not in str(err.value)
    asyncio.run(ch.aclose())


def test_status_finds_the_resource_or_says_absent(ehr: FakeFhir) -> None:
    run_channel(ehr, lambda ch: ch.send(item("wb-s")))
    found = run_channel(ehr, lambda ch: ch.status(item("wb-s")))
    missing = run_channel(ehr, lambda ch: ch.status(item("wb-none")))
    assert found.provider_id == "Communication/1" and found.status == "delivered"
    assert missing.status == ABSENT


def test_outbox_recovery_adopts_a_written_communication_and_resends_a_missing_one(
    store: Store, ehr: FakeFhir
) -> None:
    with store.session() as s:
        p = Person(created_at=store.clock.now())
        s.add(p)
        s.flush()
        assert p.id is not None
        long_ago = store.clock.now() - timedelta(hours=1)
        for key in ("wb-written", "wb-lost"):
            row = item(key)
            row.id, row.person_id, row.status, row.attempts, row.next_attempt_at = (
                None,
                p.id,
                "sending",
                1,
                long_ago,
            )
            s.add(row)
    run_channel(ehr, lambda ch: ch.send(item("wb-written")))  # reached the EHR before the crash
    ch = FhirWritebackChannel("ehr-writeback", FhirWritebackConfig.model_validate(config(ehr.base_url)))
    stage = DeliverStage(store, {"ehr-writeback": ch})

    async def go() -> Any:
        report = await stage.recover()
        while await stage.run_once():
            pass
        await ch.aclose()
        return report

    report = asyncio.run(go())
    assert (report.adopted, report.resend, report.unknown) == (1, 1, 0)
    with store.session() as s:
        rows = {r.key: r for r in s.exec(select(OutboxItem)).all()}
    assert rows["wb-written"].status == rows["wb-lost"].status == "delivered"
    assert ehr.creates == 2
