"""The deliver stage's due read: which pending items a batch takes, and in what order.
Untimed items (no ``next_attempt_at``) first, by id; then the due ones by time, then id;
items not yet due, and items in any other status, never; at most ``batch`` of them."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import update

from careloop.store import Store
from careloop.tables import OutboxItem
from channels.outbox import DeliverStage
from tests.test_channels_outbox import ScriptChannel, add_items, cfg
from tests.test_channels_outbox import person as person  # the fixture

_OUTBOX = OutboxItem.__table__  # type: ignore[attr-defined]
_COL = _OUTBOX.c


def _seed(store: Store, person: int) -> dict[str, int]:
    """A mix of outbox rows, named; their ids follow the order they are made in, which is
    neither the order of their times nor the order the due read must return."""
    now = store.clock.now()
    hour = timedelta(hours=1)
    made: dict[str, int] = {}
    for name, status, at in [
        ("due-1h", "pending", now - hour),
        ("untimed-a", "pending", now - 9 * hour),  # made untimed below, after untimed-b
        ("due-3h", "pending", now - 3 * hour),
        ("sent-untimed", "sent", None),
        ("held-untimed", "held", None),
        ("not-yet-due", "pending", now + timedelta(minutes=1)),
        ("untimed-b", "pending", None),
        ("due-3h-later-id", "pending", now - 3 * hour),  # same time as due-3h: by id
        ("due-now", "pending", now),  # due at the very instant: included
        ("sending-past", "sending", now - 5 * hour),
        ("dead-past", "dead", now - 6 * hour),
        ("held-past", "held", now - 7 * hour),
        ("due-2h", "pending", now - 2 * hour),
    ]:
        (made[name],) = add_items(store, person, status=status, next_attempt_at=at)
    # As a dead letter put back does: the row loses its time after untimed-b was written,
    # so on PostgreSQL its index entry (and heap tuple) come after untimed-b's, its id before.
    with store.session() as s:
        s.connection().execute(
            update(_OUTBOX).where(_COL.id == made["untimed-a"]).values(next_attempt_at=None)
        )
    return made


EXPECTED = ["untimed-a", "untimed-b", "due-3h", "due-3h-later-id", "due-2h", "due-1h", "due-now"]


def _due(store: Store, made: dict[str, int], batch: int) -> list[str]:
    names = {i: name for name, i in made.items()}
    stage = DeliverStage(store, {}, batch=batch)
    with store.session() as s:
        got = stage._due_in(s, store.clock.now())
    assert all(channel == "sms" for _, channel in got)
    return [names[i] for i, _ in got]


def test_due_read_takes_untimed_first_by_id_then_due_by_time_and_id(store: Store, person: int) -> None:
    made = _seed(store, person)
    assert _due(store, made, batch=50) == EXPECTED


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 7])
def test_due_read_takes_at_most_a_batch_in_order(store: Store, person: int, batch: int) -> None:
    made = _seed(store, person)
    assert _due(store, made, batch=batch) == EXPECTED[:batch]


def test_due_read_with_only_timed_or_only_untimed_items(store: Store, person: int) -> None:
    now = store.clock.now()
    timed = add_items(store, person, n=3, next_attempt_at=now - timedelta(minutes=5))
    stage = DeliverStage(store, {}, batch=2)
    with store.session() as s:
        assert [i for i, _ in stage._due_in(s, now)] == timed[:2]
    with store.session() as s:
        s.connection().execute(update(_OUTBOX).values(next_attempt_at=None))
    with store.session() as s:
        assert [i for i, _ in stage._due_in(s, now)] == timed[:2]
    with store.session() as s:
        assert stage._due_in(s, now - timedelta(days=1)) == [
            (timed[0], "sms"),
            (timed[1], "sms"),
        ]  # untimed items are due whenever


def test_a_batch_sends_in_the_due_order(store: Store, person: int) -> None:
    made = _seed(store, person)
    keys = {}
    with store.session() as s:
        for name, i in made.items():
            row = s.get(OutboxItem, i)
            assert row is not None
            keys[row.key] = name
    ch = ScriptChannel("sms", cfg())
    stage = DeliverStage(store, {"sms": ch}, batch=4, recover_every=1e9)
    asyncio.run(stage.run_once())
    assert [keys[k] for k in ch.sent] == EXPECTED[:4]
