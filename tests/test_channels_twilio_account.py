"""Twilio refusing the account itself (20403: suspended or closed; 20005 and 10001: not active)
is the channel's outage, not each message's failure: items wait pending and uncounted, the
channel is held and reports itself degraded, and crash recovery defers instead of sending
items to staff review; once the account is back, everything goes. Errors that concern one
message (21211 an invalid 'To', 21408 a region not enabled) stay permanent for that item.
Against the local Twilio wire-format server, through the deliver stage, on each engine."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from datetime import timedelta
from typing import Any

import pytest

from careloop.errors import ChannelUnavailable
from careloop.store import Store
from channels.twilio_loopback import ACCOUNT_ERRORS, AUTH_TOKEN, FakeTwilio
from tests.test_channels_credentials import (
    ROUNDS,
    Recorded,
    ScriptedTwilio,
    after_the_hold,
    dead_letters,
    drain,
    sms_channel,
    stage_for,
    twilio,
)
from tests.test_channels_outbox import PHONE, add_items, person, rows
from tests.test_channels_twilio_recovery_owned import (
    advance,
    by_id,
    crashed,
    recover,
    sent_by_the_dead_process,
)
from tests.test_channels_twilio_sms import sms_item

__all__ = ["person", "twilio"]  # the fixtures, used by the tests below

ACCOUNT_CODES = sorted(ACCOUNT_ERRORS)  # 10001, 20005, 20403


@pytest.fixture
def loopback(store: Store) -> Iterator[FakeTwilio]:
    fake = FakeTwilio()
    fake.now = store.clock.now  # the lookup window of recovery is in the store's time
    fake.start()
    yield fake
    fake.stop()


async def closing(http: Recorded, body: Coroutine[Any, Any, None]) -> None:
    """Run ``body``, then close the channel's client whether or not it failed."""
    try:
        await body
    finally:
        await http.client.aclose()


def assert_held(store: Store, code: int) -> None:
    """Every item pending, no attempt counted, nothing dead; the tried ones say why."""
    assert {(r.status, r.attempts) for r in rows(store)} == {("pending", 0)}
    errors = [r.last_error for r in rows(store) if r.last_error]
    assert errors
    for error in errors:
        assert "refused the channel's account" in error and f"provider code {code}" in error
        assert "channel sms" in error and PHONE not in error and AUTH_TOKEN not in error
    assert dead_letters(store) == []


@pytest.mark.parametrize("code", ACCOUNT_CODES)
def test_a_refused_account_holds_items_uncounted_until_it_is_reactivated(
    store: Store, person: int, loopback: FakeTwilio, code: int
) -> None:
    add_items(store, person, n=2)
    loopback.account_refusal = code  # suspended, closed, or out of funds on Twilio's side
    http = Recorded()
    ch = sms_channel(loopback, http.client)
    stage = stage_for(store, ch)
    status = ACCOUNT_ERRORS[code][0]

    async def go() -> None:
        for n in range(1, ROUNDS + 1):  # longer than the retry limit: not the items' fault
            await drain(stage)
            # One request per round: the refusal holds the channel, the other item waits.
            assert http.statuses == [status] * n
            assert_held(store, code)
            health = ch.health()
            assert health.ok and health.degraded
            assert f"HTTP {status}, provider code {code}" in health.detail and "account" in health.detail
            after_the_hold(store)
        loopback.account_refusal = None  # the account is active again
        await drain(stage)

    asyncio.run(closing(http, go()))
    assert {(r.status, r.attempts) for r in rows(store)} == {("sent", 1)}
    assert len(loopback.messages) == 2 and dead_letters(store) == []
    assert ch.health().degraded is False and ch.health().detail == ""


@pytest.mark.parametrize("status", [400, 401, 403])
@pytest.mark.parametrize("code", ACCOUNT_CODES)
def test_an_account_code_is_the_channels_whatever_the_status(
    twilio: ScriptedTwilio, code: int, status: int
) -> None:
    """Only 20403's status is documented: the code decides, under any 4xx."""
    twilio.errors = [(status, code)]
    http = Recorded()

    async def go() -> None:
        ch = sms_channel(twilio, http.client)
        with pytest.raises(ChannelUnavailable, match=f"HTTP {status}, provider code {code}") as err:
            await ch.send(sms_item(f"k-{code}-{status}"))
        assert "refused the channel's account" in str(err.value) and "+1555" not in str(err.value)
        assert ch.health().degraded
        await ch.send(sms_item(f"k-{code}-{status}"))  # the account is back: healthy again
        assert ch.health().degraded is False

    asyncio.run(closing(http, go()))
    assert http.statuses == [status, 201]


def test_per_message_refusals_stay_the_items_once_the_account_is_back(
    store: Store, person: int, twilio: ScriptedTwilio
) -> None:
    add_items(store, person, n=3)
    twilio.account_refusal = 20403
    http = Recorded()
    ch = sms_channel(twilio, http.client)
    stage = stage_for(store, ch)

    async def go() -> None:
        await drain(stage)
        assert_held(store, 20403)
        after_the_hold(store)
        twilio.account_refusal = None
        # An invalid 'To' and a region not enabled: each message's own problem.
        twilio.errors = [(400, 21211), (403, 21408)]
        await drain(stage)

    asyncio.run(closing(http, go()))
    assert http.statuses == [403, 400, 403, 201]
    dead = sorted(r.last_error or "" for r in rows(store) if r.status == "dead")
    assert len(dead) == 2 and "provider code 21211" in dead[0] and "provider code 21408" in dead[1]
    assert [r.attempts for r in rows(store) if r.status == "dead"] == [1, 1]
    assert [r.status for r in rows(store)].count("sent") == 1
    assert len(dead_letters(store)) == 2 and ch.health().degraded is False


def test_recovery_defers_while_the_account_is_refused_then_adopts(
    store: Store, person: int, loopback: FakeTwilio
) -> None:
    """A crash left an item ``sending`` whose message reached Twilio; the account is then
    suspended. Twilio cannot be asked, which is not "nobody can tell": the item waits for
    the next recovery pass instead of going to staff review, and is adopted once it can."""
    [item] = crashed(store, person)
    sid = sent_by_the_dead_process(loopback, store, item)
    advance(store, timedelta(minutes=10))
    loopback.account_refusal = 20403

    report = recover(store, loopback)
    assert (report.deferred, report.unknown, report.adopted) == (1, 0, 0)
    assert by_id(store)[item].status == "sending"

    loopback.account_refusal = None
    report = recover(store, loopback)
    assert (report.adopted, report.unknown) == (1, 0)
    got = by_id(store)[item]
    assert (got.status, got.provider_id) == ("sent", sid) and len(loopback.messages) == 1
