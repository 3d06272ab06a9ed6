"""The send-time check of a group of items claimed together (a de-duplicating receiver):
one savepoint for the whole group, and only when something in it fails, the group again
item by item. The outcome is each item's own, as if each check had had its savepoint."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session

from audit.verify import verify_database
from careloop import audit_log
from careloop.model import Hold
from careloop.store import Store
from careloop.tables import OutboxItem
from channels.outbox import DeliverStage
from tests.test_channels_outbox import ScriptChannel, add_items, audits, cfg, drain, rows
from tests.test_channels_outbox import person as person  # the fixture


def _note(s: Session, action: str, item: OutboxItem, now: datetime) -> None:
    audit_log.append(s, at=now, actor="test", action=action, entity=f"outbox/{item.id}")


def test_a_failing_check_in_a_group_holds_its_own_item_and_keeps_what_the_others_did(
    store: Store, person: int
) -> None:
    ids = add_items(store, person, n=5)
    calls: list[int] = []

    def check(s: Session, item: OutboxItem, now: datetime) -> Hold | None:
        assert item.id is not None
        calls.append(item.id)
        k = ids.index(item.id)
        if k == 1:  # writes, then cancels: the write is kept once, the cancel too
            _note(s, "test.cancel-noted", item, now)
            return Hold("opted-out")
        if k == 2:  # writes, then fails: the write is gone, the item waits
            _note(s, "test.half-done", item, now)
            raise RuntimeError("a bug in the check")
        if k == 3:
            return Hold("quiet-hours", now + timedelta(hours=1))
        return None

    ch = ScriptChannel("sms", cfg(), idempotent=True)
    drain(DeliverStage(store, {"sms": ch}, group=5, recover_every=1e9, check=check))

    got = rows(store)
    assert sorted(ch.sent) == sorted([got[0].key, got[4].key])
    assert [r.status for r in got] == ["sent", "cancelled", "pending", "pending", "sent"]
    assert [r.attempts for r in got] == [1, 0, 1, 0, 1]  # a failed check counts as an attempt
    assert got[1].last_error == "opted-out"
    assert set(calls) == set(ids)  # every item checked (some twice: the group was redone)
    assert len(audits(store, "test.cancel-noted")) == 1
    assert audits(store, "test.half-done") == []
    assert [a.entity for a in audits(store, "outbox.cancel")] == [f"outbox/{ids[1]}"]
    deferred = {a.entity: a.detail["reason"] for a in audits(store, "outbox.defer")}
    assert deferred == {f"outbox/{ids[2]}": "send-check-failed", f"outbox/{ids[3]}": "quiet-hours"}
    assert sorted(str(a.entity) for a in audits(store, "disclosure")) == [
        f"outbox/{ids[0]}",
        f"outbox/{ids[4]}",
    ]
    assert verify_database(store.engine).ok  # the chain survived the rolled-back savepoint


def test_a_group_whose_checks_all_pass_is_checked_once_per_item(store: Store, person: int) -> None:
    ids = add_items(store, person, n=4)
    calls: list[Any] = []

    def check(s: Session, item: OutboxItem, now: datetime) -> Hold | None:
        calls.append(item.id)
        return None

    ch = ScriptChannel("sms", cfg(), idempotent=True)
    drain(DeliverStage(store, {"sms": ch}, group=4, recover_every=1e9, check=check))
    assert sorted(calls) == sorted(ids)
    assert [r.status for r in rows(store)] == ["sent"] * 4


def test_when_every_check_in_a_group_fails_nothing_is_sent(store: Store, person: int) -> None:
    add_items(store, person, n=3)

    def check(s: Session, item: OutboxItem, now: datetime) -> Hold | None:
        raise RuntimeError("the gate is down")

    ch = ScriptChannel("sms", cfg(), idempotent=True)
    drain(DeliverStage(store, {"sms": ch}, group=3, recover_every=1e9, check=check))
    assert ch.sent == []
    assert [(r.status, r.attempts) for r in rows(store)] == [("pending", 1)] * 3
    assert [a.detail["reason"] for a in audits(store, "outbox.defer")] == ["send-check-failed"] * 3
