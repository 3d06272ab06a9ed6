"""Three deliver workers over one database at once, their send-time checks deferring and
cancelling some items: nothing non-idempotent sent twice, every item settled once, one
receipt and one disclosure per sent item, the audit chain verifies. On PostgreSQL a worker
that waited for rows another held, while holding the audit chain's head the other wanted,
deadlocked and lost the settle of an SMS the provider had accepted (a review's repro)."""

from __future__ import annotations

import asyncio
import collections
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from audit.verify import verify_database
from careloop.model import Hold
from careloop.store import Store
from careloop.tables import DeliveryReceipt, OutboxItem
from channels.outbox import DeliverStage
from tests.test_channels_outbox import ScriptChannel, add_items, audits, cfg, rows
from tests.test_channels_outbox import person as person


class Slow(ScriptChannel):
    async def send(self, item: OutboxItem) -> Any:
        await asyncio.sleep(0.002)
        return await super().send(item)


def test_three_workers_whose_checks_hold_items_settle_everything_once(store: Store, person: int) -> None:
    add_items(store, person, n=40)  # sms: one item per commit
    hook = add_items(store, person, n=40)
    with Session(store.engine) as s:
        for r in s.exec(select(OutboxItem).where(col(OutboxItem.id).in_(hook))).all():
            r.channel = "hook"
        s.commit()

    def check(s: Session, item: OutboxItem, now: datetime) -> Hold | None:
        assert item.id is not None
        if item.id % 7 == 0:
            return Hold("quiet-hours", now + timedelta(days=1))
        if item.id % 11 == 0:
            return Hold("opted-out")
        return None

    def stage(chs: dict[str, Any]) -> DeliverStage:
        return DeliverStage(store, chs, batch=10, group=5, recover_every=1e9, check=check)

    a = {"sms": Slow("sms", cfg()), "hook": Slow("hook", cfg(), idempotent=True)}
    b = {"sms": Slow("sms", cfg()), "hook": Slow("hook", cfg(), idempotent=True)}
    errors: list[BaseException] = []

    async def loop(st: DeliverStage) -> None:
        try:
            while await st.run_once():
                pass
        except Exception as e:
            errors.append(e)

    async def go() -> None:
        await asyncio.gather(loop(stage(a)), loop(stage(b)), loop(stage(b)))

    asyncio.run(go())
    assert [type(e).__name__ for e in errors] == []
    sent_sms = a["sms"].sent + b["sms"].sent
    dup = [k for k, n in collections.Counter(sent_sms).items() if n > 1]
    assert dup == []
    got = rows(store)
    statuses = collections.Counter(r.status for r in got)
    assert statuses["pending"] + statuses["sent"] + statuses["cancelled"] == 80, statuses
    with Session(store.engine) as s:
        rec = collections.Counter(r.outbox_id for r in s.exec(select(DeliveryReceipt)).all())
    assert all(n == 1 for n in rec.values())
    assert sorted(rec) == sorted(r.id or 0 for r in got if r.status == "sent")
    disc = collections.Counter(a.entity for a in audits(store, "disclosure"))
    assert all(n == 1 for n in disc.values()) and len(disc) == statuses["sent"]
    assert len(audits(store, "outbox.cancel")) == statuses["cancelled"]
    assert verify_database(store.engine).ok
