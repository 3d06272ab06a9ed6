"""``careloop outbox list|resolve``: staff settle the items the deliver stage could not
(``unknown``: a send that may have reached a provider with no status API). The items are
made unknown by a real DeliverStage (a send in doubt, then recovery after the lease), and
the commands run through the Typer CliRunner against the same SQLite or PostgreSQL
database. Synthetic people only."""

from __future__ import annotations

import asyncio
import getpass
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from typer.testing import CliRunner

from audit.disclosures import accounting
from audit.fhir_export import audit_event
from audit.records import from_row
from audit.verify import verify_database
from careloop import cli as careloop_cli
from careloop import config as cfgmod
from careloop.clock import VirtualClock, utc
from careloop.hub import Hub
from careloop.store import Store
from careloop.tables import AuditRecord, DeliveryReceipt, OutboxItem, Person
from channels import outbox_cli
from channels.base import DeliveryUncertain
from channels.outbox import DeliverStage
from tests.conftest import FIXTURES
from tests.test_channels_outbox import PHONE, TEXT, ScriptChannel, add_items, cfg, drain
from tests.test_orchestrator_send_time import arrive_with, prep_queued

runner = CliRunner()
ACTOR = f"cli:{getpass.getuser()}"


def cli_url(engine: Engine) -> str:
    """The URL the CLI must be given to open the test's database (on PostgreSQL, the
    test's own schema rides along as the connection's search_path)."""
    url = engine.url
    if url.get_backend_name() == "postgresql":
        with engine.connect() as c:
            schema = c.execute(text("select current_schema()")).scalar_one()
        url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@pytest.fixture
def cli_db(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Engine:
    monkeypatch.setenv("CARELOOP_DATABASE_URL", cli_url(engine))
    return engine


@pytest.fixture
def person(store: Store) -> int:
    with store.session() as s:
        p = Person(created_at=store.clock.now())
        s.add(p)
        s.flush()
        assert p.id is not None
        return p.id


def make_unknown(store: Store, stage: DeliverStage) -> None:
    """Run ``stage`` until its sends are in doubt, then recover them after the lease."""
    drain(stage)
    clock = cast(VirtualClock, store.clock)
    clock.set(clock.now() + stage.sending_lease + timedelta(minutes=1))
    asyncio.run(stage.recover())


def unknown_item(store: Store, person: int) -> tuple[int, ScriptChannel, DeliverStage]:
    """One reminder whose send timed out on a channel with no status API: ``unknown``."""
    [item_id] = add_items(store, person)
    ch = ScriptChannel("sms", cfg(), script=[DeliveryUncertain("read timeout")])
    stage = DeliverStage(store, {"sms": ch})
    make_unknown(store, stage)
    assert item(store, item_id).status == "unknown"
    return item_id, ch, stage


def item(store: Store, item_id: int) -> OutboxItem:
    with Session(store.engine) as s:
        got = s.get(OutboxItem, item_id)
        assert got is not None
        return got


def records(store: Store, action: str) -> list[AuditRecord]:
    with Session(store.engine) as s:
        q = select(AuditRecord).where(AuditRecord.action == action).order_by(col(AuditRecord.seq))
        return list(s.exec(q).all())


def receipts(store: Store, item_id: int) -> list[DeliveryReceipt]:
    with Session(store.engine) as s:
        return list(s.exec(select(DeliveryReceipt).where(DeliveryReceipt.outbox_id == item_id)).all())


def invoke(*args: str) -> Any:
    return runner.invoke(outbox_cli.app, list(args))


def table(output: str) -> list[dict[str, str]]:
    header, *lines = output.rstrip("\n").split("\n")
    cols = header.split("\t")
    assert cols == list(outbox_cli.COLUMNS)
    return [dict(zip(cols, line.split("\t"), strict=True)) for line in lines]


# ----------------------------------------------------------------------------- list


def test_list_shows_the_unknown_item_for_review_without_address_or_text(
    store: Store, cli_db: Engine, person: int
) -> None:
    item_id, _, stage = unknown_item(store, person)
    [sent_id] = add_items(store, person)
    drain(stage)  # a later reminder goes out normally
    assert item(store, sent_id).status == "sent"

    got = invoke("list", "--status", "unknown")
    assert got.exit_code == 0, got.output
    [line] = table(got.output)
    assert line["id"] == str(item_id) and line["person"] == str(person)
    assert (line["channel"], line["template"], line["playbook"], line["purpose"]) == (
        "sms",
        "appointment-reminder",
        "appointment-reminders",
        "treatment",
    )
    assert (line["status"], line["attempts"]) == ("unknown", "1")
    assert "staff review" in line["last_error"]
    assert line["created_at"] == utc(item(store, item_id).created_at).isoformat(timespec="seconds")
    assert PHONE not in got.output and TEXT not in got.output

    everything = table(invoke("list").output)
    assert [r["id"] for r in everything] == [str(sent_id), str(item_id)]  # newest first
    assert [r["id"] for r in table(invoke("list", "--limit", "1").output)] == [str(sent_id)]
    assert table(invoke("list", "--status", "dead").output) == []


def test_list_rejects_a_status_that_does_not_exist(cli_db: Engine) -> None:
    got = invoke("list", "--status", "lost")
    assert got.exit_code == 2 and "not one of" in got.output


def test_outbox_is_a_careloop_command(store: Store, cli_db: Engine, person: int) -> None:
    item_id, _, _ = unknown_item(store, person)
    got = runner.invoke(careloop_cli.app, ["outbox", "list", "--status", "unknown"])
    assert got.exit_code == 0, got.output
    assert [r["id"] for r in table(got.output)] == [str(item_id)]


# ----------------------------------------------------------------------------- resolve --sent


def test_resolve_sent_records_receipt_disclosure_and_staff_action(
    store: Store, cli_db: Engine, person: int
) -> None:
    item_id, ch, stage = unknown_item(store, person)
    got = invoke("resolve", str(item_id), "--sent")
    assert got.exit_code == 0, got.output

    row = item(store, item_id)
    assert (row.status, row.last_error) == ("sent", None)
    [receipt] = receipts(store, item_id)
    assert receipt.status == "sent" and receipt.detail == {"resolved_by": "staff", "actor": ACTOR}

    # The deliver stage's own success record, after its 'uncertain' and 'unknown' ones.
    disclosures = [r for r in records(store, "disclosure") if r.entity == f"outbox/{item_id}"]
    assert [(d.outcome, d.detail["outcome"]) for d in disclosures] == [
        ("failure", "uncertain"),
        ("failure", "unknown"),
        ("success", "sent"),
    ]
    last = disclosures[-1]
    assert last.actor == "channel:sms" and last.person_id == person
    assert last.detail["recipient_kind"] == "phone" and last.detail["attempt"] == 1
    with Session(store.engine) as s:
        report = accounting(s, person, now=last.at + timedelta(seconds=1))
    assert [e.outcome for e in report.entries][-1] == "sent"

    [staff] = records(store, "outbox.resolve")
    assert (staff.actor, staff.outcome, staff.person_id, staff.entity) == (
        ACTOR,
        "success",
        person,
        f"outbox/{item_id}",
    )
    assert staff.detail == {"choice": "sent", "channel": "sms", "template": "appointment-reminder"}
    exported = audit_event(from_row(staff))
    assert exported["agent"][0]["type"]["coding"][0]["code"] == "humanuser"

    drain(stage)  # nothing is resent
    assert ch.sent == [] and item(store, item_id).status == "sent"
    assert verify_database(store.engine).ok
    everything = [r.detail for r in records(store, "outbox.resolve") + records(store, "disclosure")]
    assert PHONE not in repr(everything) and TEXT not in repr(everything)


# ----------------------------------------------------------------------------- resolve --not-sent


def test_resolve_not_sent_puts_it_back_and_the_deliver_stage_sends_it_again(
    store: Store, cli_db: Engine, person: int
) -> None:
    item_id, ch, stage = unknown_item(store, person)
    got = invoke("resolve", str(item_id), "--not-sent")
    assert got.exit_code == 0, got.output

    back = item(store, item_id)
    assert (back.status, back.next_attempt_at, back.attempts) == ("pending", None, 1)
    assert back.last_error == outbox_cli.NOT_SENT_NOTE
    assert receipts(store, item_id) == []
    [staff] = records(store, "outbox.resolve")
    assert (staff.actor, staff.outcome) == (ACTOR, "success")
    assert staff.detail["choice"] == "not-sent"

    drain(stage)  # the channel answers this time
    done = item(store, item_id)
    assert ch.sent == [done.key] and (done.status, done.attempts) == ("sent", 2)
    assert [r.status for r in receipts(store, item_id)] == ["queued"]
    assert verify_database(store.engine).ok


@pytest.fixture
def hub(engine: Engine, clock: VirtualClock) -> Hub:
    return Hub(
        cfgmod.load(FIXTURES / "config" / "kernel-test.yaml"), store=Store(engine, clock), capture=True
    )


def test_a_stop_while_in_doubt_still_cancels_the_resend_at_send_time(
    hub: Hub, clock: VirtualClock, cli_db: Engine
) -> None:
    queued = prep_queued(hub, clock)
    sms = ScriptChannel("sms", cfg(), script=[DeliveryUncertain("read timeout")])
    stage = DeliverStage(hub.store, {"sms": sms}, recover_every=1e9, check=hub.orchestrator.send_check)
    make_unknown(hub.store, stage)
    assert item(hub.store, cast(int, queued.id)).status == "unknown"
    arrive_with(hub, clock)(
        type="consent.revoked", attributes={"channel": "sms", "purpose": "*", "keyword": "stop"}
    )
    assert item(hub.store, cast(int, queued.id)).status == "unknown"  # a STOP cancels only what is queued

    assert invoke("resolve", str(queued.id), "--not-sent").exit_code == 0
    asyncio.run(stage.run_once())
    gone = item(hub.store, cast(int, queued.id))
    assert (gone.status, gone.last_error) == ("cancelled", "opted-out")
    assert sms.sent == [] and len(sms.send_times) == 1  # only the send in doubt, never a second


# ----------------------------------------------------------------------------- refusals


def test_only_unknown_items_can_be_resolved(store: Store, cli_db: Engine, person: int) -> None:
    item_id, _, _ = unknown_item(store, person)
    assert invoke("resolve", str(item_id), "--sent").exit_code == 0

    again = invoke("resolve", str(item_id), "--not-sent")  # a second member of staff, too late
    assert again.exit_code == 1
    assert f"outbox {item_id}: status is sent; only unknown items can be resolved" in again.output
    assert item(store, item_id).status == "sent"
    assert [(r.outcome, r.detail) for r in records(store, "outbox.resolve")] == [
        ("success", {"choice": "sent", "channel": "sms", "template": "appointment-reminder"}),
        ("rejected", {"choice": "not-sent", "reason": "status is sent"}),
    ]

    [pending_id] = add_items(store, person)
    refused = invoke("resolve", str(pending_id), "--sent")
    assert refused.exit_code == 1 and "status is pending" in refused.output
    assert item(store, pending_id).status == "pending" and receipts(store, pending_id) == []

    missing = invoke("resolve", "99999", "--sent")
    assert missing.exit_code == 1 and "outbox 99999: not found" in missing.output


@pytest.mark.parametrize("flags", [[], ["--sent", "--not-sent"]])
def test_resolve_needs_exactly_one_choice(
    store: Store, cli_db: Engine, person: int, flags: list[str]
) -> None:
    item_id, _, _ = unknown_item(store, person)
    got = invoke("resolve", str(item_id), *flags)
    assert got.exit_code == 2 and "exactly one of --sent or --not-sent" in got.output
    assert item(store, item_id).status == "unknown" and records(store, "outbox.resolve") == []


@pytest.mark.parametrize("args", [["list"], ["resolve", "1", "--sent"]])
def test_commands_refuse_a_missing_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    where = tmp_path / "nowhere.db"
    monkeypatch.setenv("CARELOOP_DATABASE_URL", f"sqlite:///{where}")
    got = invoke(*args)
    assert got.exit_code == 2 and "no careloop database" in got.output
    assert not where.exists()  # not created empty
