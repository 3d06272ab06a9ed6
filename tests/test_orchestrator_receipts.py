"""Delivery reports from the provider move the outbox row forward and reach the journey."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

from sqlmodel import Session, col, select

from careloop import config as cfgmod
from careloop.clock import utc
from careloop.replay import FeedLine, Replayer, read_feed
from careloop.tables import DeliveryReceipt, OutboxItem
from tests.conftest import FIXTURES


def test_status_callback_marks_outbox_row_delivered_then_read() -> None:
    booking = read_feed(FIXTURES / "feeds" / "demo.jsonl")[1]  # Ana's SIU^S12
    rp = Replayer(cfgmod.load(FIXTURES / "config" / "example.yaml"), start=booking.at)
    try:
        asyncio.run(rp.feed([booking], horizon=timedelta(days=7, hours=2)))  # past the 72 h reminder
        with Session(rp.store.engine) as s:
            item = s.exec(select(OutboxItem)).one()
        assert item.status == "captured"

        def status(st: str, minutes: int) -> FeedLine:
            body = {
                "MessageSid": "SM" + "1" * 32,
                "MessageStatus": st,
                "_key": item.key,
                "AccountSid": "AC" + "0" * 32,
                "To": item.recipient,
                "From": "+15555550199",
            }
            return FeedLine(
                utc(item.created_at) + timedelta(minutes=minutes), "sms", json.dumps(body).encode(), {}
            )

        asyncio.run(
            rp.feed([status("delivered", 1), status("read", 2), status("sent", 3)], horizon=timedelta(0))
        )
        with Session(rp.store.engine) as s:
            row = s.get(OutboxItem, item.id)
            receipts = [
                r.status
                for r in s.exec(
                    select(DeliveryReceipt)
                    .where(DeliveryReceipt.outbox_id == item.id)
                    .order_by(col(DeliveryReceipt.id))
                ).all()
            ]
        assert row is not None and row.status == "read"  # a late "sent" does not move it back
        assert receipts == ["captured", "delivered", "read", "sent"]
    finally:
        rp.close()
