"""One provider message belongs to one outbox item, by a unique index (migration 0005,
``uq_outbox_provider`` on outbox (channel, provider_id) where provider_id is set): two
recoveries that both pass the "no other row holds it" check cannot both adopt the message;
the one that loses leaves its item ``unknown`` for staff (audited ``provider-id-owned``)
instead of aborting its recovery pass. On both engines; the real two-worker race on
PostgreSQL (SQLite takes its write lock at the check, so two adoptions cannot interleave)."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import Engine
from sqlalchemy.engine.interfaces import ReflectedIndex
from sqlalchemy.exc import IntegrityError

import channels.outbox as outbox
from careloop.db import alembic_config, is_postgres, upgrade
from careloop.store import Store
from careloop.tables import OutboxItem
from channels.base import Receipt
from channels.outbox import DeliverStage
from tests.test_channels_outbox import PHONE, ScriptChannel, add_items, audits, cfg, drain, person, rows

__all__ = ["person"]  # the fixture, used by the tests below

INDEX = "uq_outbox_provider"
SID = "SM" + "1" * 32
LEASE = timedelta(minutes=5)
_OUTBOX = OutboxItem.__table__  # type: ignore[attr-defined]


def _index(engine: Engine) -> ReflectedIndex | None:
    return next((i for i in sa.inspect(engine).get_indexes("outbox") if i["name"] == INDEX), None)


def _set(engine: Engine, item_id: int, **values: Any) -> None:
    with engine.begin() as c:
        c.execute(_OUTBOX.update().where(_OUTBOX.c.id == item_id).values(**values))


def _by_id(store: Store) -> dict[int, OutboxItem]:
    return {r.id: r for r in rows(store) if r.id is not None}


def _reasons(store: Store, action: str) -> list[tuple[str, str | None]]:
    return [(a.entity or "", (a.detail or {}).get("reason")) for a in audits(store, action)]


def test_the_upgrade_creates_a_partial_unique_index_per_channel(engine: Engine) -> None:
    ix = _index(engine)
    assert ix is not None
    assert (bool(ix["unique"]), ix["column_names"]) == (True, ["channel", "provider_id"])
    where = ix.get("dialect_options", {})["postgresql_where" if is_postgres(engine) else "sqlite_where"]
    assert "provider_id IS NOT NULL" in str(where)


def test_two_rows_cannot_hold_one_provider_id_on_one_channel(store: Store, person: int) -> None:
    a, b, c, d = add_items(store, person, n=4, status="sent")
    _set(store.engine, a, provider_id=SID)
    _set(store.engine, b, channel="sms-2", provider_id=SID)  # another provider's namespace
    _set(store.engine, d, provider_id=None)  # rows without one: any number
    with pytest.raises(IntegrityError):
        _set(store.engine, c, provider_id=SID)
    assert [(r.channel, r.provider_id) for r in rows(store)] == [
        ("sms", SID),
        ("sms-2", SID),
        ("sms", None),
        ("sms", None),
    ]


def test_the_migration_refuses_duplicates_with_what_to_do_and_downgrade_drops_it(
    store: Store, person: int
) -> None:
    engine, cfg_ = store.engine, alembic_config(store.engine)
    command.downgrade(cfg_, "0004")
    assert _index(engine) is None  # the downgrade drops it
    ids = add_items(store, person, n=5, status="sent")
    for i, pid in zip(ids, [SID, SID, "SM-2", "SM-2", "SM-3"], strict=True):
        _set(engine, i, provider_id=pid)
    with pytest.raises(RuntimeError) as err:
        upgrade(engine)
    message = str(err.value)
    assert "2 (channel, provider_id) pair(s)" in message
    assert "careloop outbox resolve" in message and "provider_id to NULL" in message
    assert PHONE not in message and SID not in message and f"person {person}" not in message
    with engine.connect() as c:  # nothing changed: still at 0004, no index
        assert c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one() == "0004"
    assert _index(engine) is None
    # What the message says to do, then the upgrade goes through.
    for i in (ids[1], ids[3]):
        _set(engine, i, provider_id=None, status="unknown")
    upgrade(engine)
    assert _index(engine) is not None


def _crashed(store: Store, person: int, **kw: Any) -> int:
    """An item a dead process had claimed; its attempt started a lease and a minute ago."""
    started = store.clock.now() - LEASE - timedelta(minutes=1)
    [item] = add_items(store, person, status="sending", attempts=1, next_attempt_at=started, **kw)
    return item


def test_an_adoption_past_the_check_that_loses_to_the_index_leaves_the_item_unknown(
    store: Store, person: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    [owner] = add_items(store, person, status="sent", provider_id=SID)
    item = _crashed(store, person)
    # The check does not see the owner (as when another worker's adoption had not committed
    # when this one looked): the write of the id is what must stop it.
    monkeypatch.setattr(outbox, "_OWNER", outbox._OWNER.where(sa.false()))
    ch = ScriptChannel("sms", cfg(), status_answer=Receipt("sent", provider_id=SID), queryable=True)
    report = asyncio.run(DeliverStage(store, {"sms": ch}).recover())
    assert (report.adopted, report.unknown) == (0, 1)
    got = _by_id(store)
    assert (got[item].status, got[item].provider_id) == ("unknown", None)
    assert (got[owner].status, got[owner].provider_id) == ("sent", SID)
    assert _reasons(store, "outbox.recover") == [(f"outbox/{item}", "provider-id-owned")]


def test_the_same_provider_id_on_another_channel_is_adopted(store: Store, person: int) -> None:
    [other] = add_items(store, person, status="sent", provider_id=SID)
    _set(store.engine, other, channel="sms-2")
    item = _crashed(store, person)
    ch = ScriptChannel("sms", cfg(), status_answer=Receipt("sent", provider_id=SID), queryable=True)
    report = asyncio.run(DeliverStage(store, {"sms": ch}).recover())
    assert report.adopted == 1
    assert (_by_id(store)[item].status, _by_id(store)[item].provider_id) == ("sent", SID)


def test_a_send_answered_with_another_items_provider_id_is_left_to_staff(store: Store, person: int) -> None:
    """A FHIR server that reuses an id, or answers a conditional create with another item's
    resource: the settle leaves that item unknown and settles the rest of its group."""
    [owner] = add_items(store, person, status="sent", provider_id="Communication/1")
    first, second = add_items(store, person, n=2)
    ch = ScriptChannel(
        "sms",
        cfg(),
        script=[
            Receipt("delivered", provider_id="Communication/1"),
            Receipt("delivered", provider_id="Communication/2"),
        ],
        idempotent=True,  # both in one group, settled in one transaction
    )
    drain(DeliverStage(store, {"sms": ch}))
    got = _by_id(store)
    assert (got[first].status, got[first].provider_id) == ("unknown", None)
    assert (got[second].status, got[second].provider_id) == ("delivered", "Communication/2")
    assert (got[owner].status, got[owner].provider_id) == ("sent", "Communication/1")
    assert _reasons(store, "outbox.settle") == [(f"outbox/{first}", "provider-id-owned")]


def test_two_workers_recovering_twins_at_once_adopt_the_message_once(
    engine: Engine, store: Store, person: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review's repro: worker A's recovery checks item ``a`` (no owner), then worker B's
    recovery adopts the same message for item ``b`` and commits, then A writes."""
    if not is_postgres(engine):
        pytest.skip("SQLite takes the write lock at the check: two adoptions cannot interleave")
    a = _crashed(store, person)
    # b's lookup found the message by other means (its text differs: not a twin by content),
    # and b is not stale for A's pass: only B settles it.
    [b] = add_items(store, person, status="sending", attempts=1, next_attempt_at=store.clock.now())
    _set(engine, b, content={"text": "another text"})
    answer = Receipt("sent", provider_id=SID)
    ch = ScriptChannel("sms", cfg(), status_answer=answer, queryable=True)
    worker_a, worker_b = DeliverStage(store, {"sms": ch}), DeliverStage(store, {"sms": ch})
    [item_b] = [r for r in rows(store) if r.id == b]
    done_in = DeliverStage._done_in
    b_adopted: list[Any] = []

    def a_writes_after_b(self: DeliverStage, *args: Any) -> None:
        if self is worker_a and not b_adopted:  # A has passed its checks: B goes now
            t = threading.Thread(target=lambda: b_adopted.append(worker_b._adopt(item_b, answer, False)))
            t.start()
            t.join(60)
        done_in(self, *args)

    monkeypatch.setattr(DeliverStage, "_done_in", a_writes_after_b)
    report = asyncio.run(worker_a.recover())
    assert b_adopted == [None]  # B adopted it
    assert (report.adopted, report.unknown) == (0, 1)
    got = _by_id(store)
    assert (got[b].status, got[b].provider_id) == ("sent", SID)
    assert (got[a].status, got[a].provider_id) == ("unknown", None)
    assert _reasons(store, "outbox.recover") == [(f"outbox/{a}", "provider-id-owned")]
