"""When a person engages says which send window suits them (send-time optimisation): a
read, click or reply credits the window whose local hours hold it, not the window the
message went in (orchestrator/outcomes.py ``engaged_window``, orchestrator/learning_steps.py).
Driven end to end through replay on a virtual clock, on both engines."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from careloop import config as cfgmod
from careloop.clock import utc
from careloop.config import AppConfig, LearningConfig
from careloop.replay import Replayer
from careloop.tables import Decision, OutboxItem, OutreachOutcome, Person, Timer
from orchestrator import learning
from tests.test_learning_replay import CONFIG, START, WHO, _line
from tests.test_learning_restart import _stats

NY = ZoneInfo("America/New_York")
WINDOWS = ("morning", "midday", "evening")  # learning-test.yaml: the defaults, 09:00/12:00/18:00, 3 h each
INSIDE = {"morning": time(10, 30), "midday": time(13, 30), "evening": time(19, 30)}  # local


def _config(**learning_overrides: Any) -> AppConfig:
    base = cfgmod.load(CONFIG)
    return base.model_copy(update={"learning": base.learning.model_copy(update=learning_overrides)})


def _next_local(after: datetime, t: time) -> datetime:
    """The first moment after ``after`` that is ``t`` on a New York clock."""
    local = utc(after).astimezone(NY)
    at = datetime.combine(local.date(), t, tzinfo=NY)
    if at <= local:
        at = datetime.combine(local.date() + timedelta(days=1), t, tzinfo=NY)
    return utc(at)


def _other(*not_these: str) -> str:
    return next(w for w in ("evening", "morning", "midday") if w not in not_these)


def _newest(engine: Engine, playbook: str) -> OutboxItem | None:
    with Session(engine) as s:
        return s.exec(
            select(OutboxItem).where(OutboxItem.playbook == playbook).order_by(col(OutboxItem.id).desc())
        ).first()


def _row(engine: Engine, item: OutboxItem) -> OutreachOutcome:
    with Session(engine) as s:
        return s.exec(select(OutreachOutcome).where(OutreachOutcome.outbox_key == item.key)).one()


def _person(engine: Engine, person_id: int) -> dict[tuple[str, str], tuple[float, float, int, int]]:
    """Person-level evidence: (dimension, option) -> (successes, failures, trials, engaged)."""
    return {
        (dim, opt): v
        for (scope, key, dim, opt), v in _stats(engine).items()
        if (scope, key) == ("person", str(person_id))
    }


async def _event(rp: Replayer, at: datetime, id: str, type: str, **attributes: Any) -> None:
    await rp.advance(at)
    await rp.signal(_line(at, id=id, type=type, attributes=attributes, **WHO))


async def _consent(rp: Replayer) -> None:
    # Offers are marketing: the person's opt-in is on record first (the gate's no-consent rule).
    await _event(rp, START, "opt-in", "consent.granted", channel="*", purpose="marketing")


async def _offer(rp: Replayer, engine: Engine, n: int, at: datetime) -> OutboxItem:
    """An offer at ``at``; returns the message the learner sent, at once or in a later window."""
    before = _newest(engine, "discount-offer")
    await _event(rp, at, f"o{n}", "crm.offer.eligible", product=f"p-{n}")
    item = _newest(engine, "discount-offer")
    if item is None or (before is not None and item.id == before.id):
        with Session(engine) as s:
            t = s.exec(
                select(Timer)
                .where(Timer.status == "pending", Timer.playbook == "discount-offer")
                .order_by(col(Timer.due_at))
            ).first()
        assert t is not None, f"offer {n}: neither sent nor deferred"
        await rp.advance(utc(t.due_at))
        item = _newest(engine, "discount-offer")
    assert item is not None and (before is None or item.id != before.id), f"offer {n}: nothing sent"
    return item


def _ny(engine: Engine, item: OutboxItem) -> None:
    with Session(engine) as s:
        p = s.get(Person, item.person_id)
        assert p is not None and (p.timezone or "America/New_York") == "America/New_York"


# ---------------------------------------------------------------------- (a) the engaged window


def test_a_read_in_another_windows_hours_credits_that_window_and_stays_there(engine: Engine) -> None:
    rp = Replayer(_config(), start=START, engine=engine)
    got: dict[str, Any] = {}

    async def go() -> None:
        await _consent(rp)
        item = await _offer(rp, engine, 0, START)
        _ny(engine, item)
        sent = _row(engine, item).window
        assert sent in WINDOWS
        seen = _other(sent)
        read_at = _next_local(item.created_at, INSIDE[seen])
        await _event(rp, read_at, "rd0", "message.read", key=item.key)
        got.update(item=item, sent=sent, seen=seen, row_read=_row(engine, item))
        got["after_read"] = _person(engine, item.person_id)
        # The reply comes in a third window's hours: the rise still goes to the first one.
        third = _other(sent, seen)
        await _event(
            rp,
            _next_local(read_at, INSIDE[third]),
            "rp0",
            "message.inbound",
            channel=item.channel,
            body="yes",
        )
        got.update(third=third, row_reply=_row(engine, item), after_reply=_person(engine, item.person_id))

    try:
        asyncio.run(go())
    finally:
        rp.close()
    item, sent, seen, third = got["item"], got["sent"], got["seen"], got["third"]
    assert got["row_read"].engaged_window == seen and got["row_read"].reward == pytest.approx(0.3)
    st = got["after_read"]
    s_, f_, n_, e_ = st[("window", seen)]
    assert (s_, f_, n_, e_) == (pytest.approx(0.3), 0.0, 0, 1)  # credit: successes only, no trial
    s_, f_, n_, e_ = st[("window", sent)]
    assert s_ == 0.0 and f_ == pytest.approx(1.0, rel=1e-2) and (n_, e_) == (1, 0)  # its trial: a failure
    s_, f_, n_, e_ = st[("channel", item.channel)]
    assert s_ == pytest.approx(0.3) and f_ == pytest.approx(0.7, rel=1e-2) and (n_, e_) == (1, 1)

    row = got["row_reply"]
    assert row.replied_at is not None and row.reward == 1.0 and row.engaged_window == seen
    st = got["after_reply"]
    assert st[("window", seen)][0] == pytest.approx(1.0, rel=1e-2)
    assert st[("window", sent)][:3] == (0.0, pytest.approx(1.0, rel=1e-2), 1)
    assert st.get(("window", third), (0.0,))[0] == 0.0
    assert st[("channel", item.channel)][:2] == (pytest.approx(1.0, rel=1e-2), pytest.approx(0.0, abs=1e-9))
    # the whole reward went to windows once: the engaged window's successes
    assert sum(v[0] for (d, _), v in st.items() if d == "window") == pytest.approx(1.0, rel=1e-2)


# ---------------------------------------------------------------------- (b) the learner follows


def _timed_rounds(
    engine: Engine, n: int, evening: bool, config: AppConfig | None = None
) -> tuple[list[str], dict[str, Any]]:
    """``n`` offers two days apart, each read and then replied to: at 19:00 and 19:20 local
    (``evening``), or an hour and 80 minutes after the send. Returns the window of every send
    and the learner's window dimension at one more offer."""
    rp = Replayer(config or _config(), start=START, engine=engine)
    windows: list[str] = []
    last: dict[str, Any] = {}

    async def go() -> None:
        await _consent(rp)
        for i in range(n + 1):
            at = _next_local(START + timedelta(days=2 * i) - timedelta(minutes=1), time(9, 0))
            item = await _offer(rp, engine, i, at)
            if i == n:
                with Session(engine) as s:
                    dec = s.get(Decision, item.decision_id)
                    assert dec is not None
                    last.update(dec.detail["learning"]["dims"]["window"])
                    last["explain"] = dec.detail["learning"]["explain"]
                return
            windows.append(str(_row(engine, item).window))
            sent = utc(item.created_at)
            if evening:
                read_at = _next_local(sent, time(19, 0))
                reply_at = read_at + timedelta(minutes=20)
            else:
                read_at, reply_at = sent + timedelta(hours=1), sent + timedelta(minutes=80)
            await _event(rp, read_at, f"rd{i}", "message.read", key=item.key)
            await _event(rp, reply_at, f"rp{i}", "message.inbound", channel=item.channel, body="yes")

    try:
        asyncio.run(go())
    finally:
        rp.close()
    return windows, last


def test_a_person_who_engages_in_the_evening_gets_the_evening_window(engine: Engine) -> None:
    n = 6
    evening, dim = _timed_rounds(engine, n, evening=True)
    assert evening[1:].count("evening") >= n - 2, evening
    assert dim["greedy"] == "evening" and dim["p_best"]["evening"] > 0.9, dim
    assert dim["mean"]["evening"] > max(m for w, m in dim["mean"].items() if w != "evening") + 0.3, dim
    assert f"engaged in evening {n}x" in dim["explain"], dim["explain"]  # says why


def test_replies_an_hour_after_each_send_do_not_single_out_the_evening(engine: Engine) -> None:
    """The same rounds, each read and reply an hour after the send: every window the person
    was sent in looks as good, so the learner keeps its first greedy window (morning) and
    the evening is not singled out the way it is above."""
    n = 6
    soon, dim = _timed_rounds(engine, n, evening=False)
    assert soon[1:].count("evening") <= 2, soon
    assert dim["greedy"] != "evening" and dim["p_best"]["evening"] < 0.5, dim


def test_the_belief_model_places_an_evening_person_in_the_evening(engine: Engine) -> None:
    """The evening rounds under ``learning.model: belief`` (the fixture pins beta): its timing
    likelihood reads the late evening responses as the person's active window."""
    n = 6
    windows, dim = _timed_rounds(engine, n, evening=True, config=_config(model="belief"))
    assert windows[1:].count("evening") >= n - 2, windows
    assert dim["greedy"] == "evening" and dim["p_best"]["evening"] > 0.9, dim


# ---------------------------------------------------------------------- (c) the EHR's time says nothing


def test_an_ehr_confirmation_credits_the_window_the_reminder_went_in(engine: Engine) -> None:
    appt = {"id": "a-t1", "start": "2026-03-12T15:00:00+00:00", "end": "2026-03-12T15:30:00+00:00"}
    rp = Replayer(_config(), start=START, engine=engine)
    got: dict[str, Any] = {}

    async def go() -> None:
        await rp.signal(_line(START, id="b0", type="appointment.booked", appointment=appt, **WHO))
        await rp.advance(datetime(2026, 3, 9, 23, 0, tzinfo=UTC))  # the 72 h reminder went (11:00 local on)
        item = _newest(engine, "appointment-reminders")
        assert item is not None and item.template == "appointment-reminder"
        _ny(engine, item)
        sent = _row(engine, item).window
        assert sent in WINDOWS
        elsewhere = _other(sent)
        t = _next_local(item.created_at, INSIDE[elsewhere])
        await _event(rp, t, "d1", "message.delivered", key=item.key)  # a receipt: the carrier's time
        # The clerk records the confirmation at their own time, in another window's hours.
        t2 = t + timedelta(minutes=1)
        await rp.advance(t2)
        await rp.signal(_line(t2, id="c1", type="appointment.confirmed", appointment=appt, **WHO))
        got.update(item=item, sent=sent, elsewhere=elsewhere, row=_row(engine, item))
        got["stats"] = _person(engine, item.person_id)

    try:
        asyncio.run(go())
    finally:
        rp.close()
    row, sent, elsewhere = got["row"], got["sent"], got["elsewhere"]
    assert row.confirmed_at is not None and row.delivered_at is not None and row.reward == 1.0
    assert row.engaged_window is None and row.learned
    st = got["stats"]
    assert st[("window", sent)][:4] == (pytest.approx(1.0, rel=1e-2), pytest.approx(0.0, abs=1e-9), 1, 1)
    assert st.get(("window", elsewhere), (0.0,))[0] == 0.0


# ---------------------------------------------------------------------- (d) a STOP takes it back


@pytest.mark.parametrize("half_life", [None, 60.0], ids=["no-decay", "decay"])
def test_a_stop_after_a_read_takes_the_credit_back_from_the_same_window(
    engine: Engine, half_life: float | None
) -> None:
    # Offers at 09:00 with windows at most 4 h away go in the morning or at midday, never in
    # the evening the person reads in: the STOP must take the credit back from the evening.
    rp = Replayer(_config(half_life_days=half_life, max_delay_hours=4.0), start=START, engine=engine)
    got: dict[str, Any] = {}

    async def go() -> None:
        await _consent(rp)
        # Round 0: a read in another window's hours leaves that window some credit.
        first = await _offer(rp, engine, 0, START)
        _ny(engine, first)
        seen = _other(str(_row(engine, first).window))
        read0 = _next_local(first.created_at, INSIDE[seen])
        await _event(rp, read0, "rd0", "message.read", key=first.key)
        # Round 1: read in the same window's hours, then STOP in another window's.
        item = await _offer(rp, engine, 1, START + timedelta(days=2))
        got.update(seen=seen, read0=read0, before=_person(engine, item.person_id))
        read1 = _next_local(item.created_at, INSIDE[seen])
        await _event(rp, read1, "rd1", "message.read", key=item.key)
        got.update(read1=read1, row_read=_row(engine, item), after_read=_person(engine, item.person_id))
        stop = _next_local(read1, INSIDE[_other(seen)])
        await _event(rp, stop, "stop1", "message.inbound", channel=item.channel, body="STOP", keyword="stop")
        got.update(stop=stop, row=_row(engine, item), after=_person(engine, item.person_id))

    try:
        asyncio.run(go())
    finally:
        rp.close()
    seen, before, after_read, after = got["seen"], got["before"], got["after_read"], got["after"]
    assert seen == "evening" and got["row_read"].window in ("morning", "midday")
    assert got["row_read"].engaged_window == seen and got["row_read"].reward == pytest.approx(0.3)
    row = got["row"]
    assert row.opted_out_at is not None and row.reward == 0.0 and row.engaged_window == seen

    def fade(a: datetime, b: datetime) -> float:
        return 1.0 if half_life is None else 0.5 ** ((b - a).total_seconds() / 86400 / half_life)

    # A stored cell holds its mass as of its last update: round 0's read, for the evening.
    s0 = before[("window", seen)][0]
    assert s0 == pytest.approx(0.3)  # round 0's credit: what the STOP must leave alone
    read0, read1, stop = got["read0"], got["read1"], got["stop"]
    s1 = s0 * fade(read0, read1) + 0.3
    assert after_read[("window", seen)][0] == pytest.approx(s1, rel=1e-9)
    s2 = after[("window", seen)][0]
    assert s2 == pytest.approx(s1 * fade(read1, stop) - 0.3, rel=1e-9)
    # back where it was, decayed (less the little the 0.3 itself decayed between read and STOP)
    assert s2 == pytest.approx(s0 * fade(read0, stop), abs=0.3 * (1.0 - fade(read1, stop)) + 1e-9)
    assert after[("window", seen)][1:] == before[("window", seen)][1:]  # a credit: no failure, no trial
    # no other window moved since the send (the sent one keeps its trial); without decay every
    # cell, channel and variant too, is exactly where it was before the read
    assert set(after) == set(before)
    for key, (s, f, n, e) in after.items():
        bs, bf, bn, be = before[key]
        assert (n, e) == (bn, be), key
        if half_life is None or (key[0] == "window" and key[1] != seen):
            assert (s, f) == (pytest.approx(bs, abs=1e-9), pytest.approx(bf, abs=1e-9)), key


# ---------------------------------------------------------------------- (e) engaged_window itself


def _at(day: str, hhmm: str, tz: str = "America/New_York") -> datetime:
    return datetime.fromisoformat(f"{day}T{hhmm}").replace(tzinfo=ZoneInfo(tz)).astimezone(UTC)


CFG = LearningConfig()  # morning 09:00, midday 12:00, evening 18:00, 3 h each


@pytest.mark.parametrize(
    ("hhmm", "window"),
    [
        ("09:00", "morning"),
        ("10:30", "morning"),
        ("11:59", "morning"),
        ("12:01", "midday"),
        ("14:59", "midday"),
        ("18:00", "evening"),
        ("20:59", "evening"),
    ],
)
def test_engaged_window_inside_a_span(hhmm: str, window: str) -> None:
    assert learning.engaged_window(_at("2026-03-04", hhmm), "America/New_York", CFG) == window


def test_engaged_window_a_windows_opening_belongs_to_it_when_the_last_one_closes_then() -> None:
    assert learning.engaged_window(_at("2026-03-04", "12:00"), "America/New_York", CFG) == "midday"


@pytest.mark.parametrize(
    ("hhmm", "window"),
    [
        ("15:00", "midday"),  # just closed
        ("16:00", "midday"),  # 60 min after it closed, 120 before the evening
        ("17:00", "evening"),  # 120 after, 60 before
        ("08:30", "morning"),
        ("21:30", "evening"),
    ],
)
def test_engaged_window_between_spans_is_the_nearest(hhmm: str, window: str) -> None:
    assert learning.engaged_window(_at("2026-03-04", hhmm), "America/New_York", CFG) == window


def test_engaged_window_ties_go_to_the_window_listed_first() -> None:
    at = _at("2026-03-04", "16:30")  # 90 min from midday's close and from the evening's opening
    assert learning.engaged_window(at, "America/New_York", CFG) == "midday"
    evening_first = LearningConfig(windows={"evening": "18:00", "morning": "09:00", "midday": "12:00"})
    assert learning.engaged_window(at, "America/New_York", evening_first) == "evening"


def test_engaged_window_after_midnight() -> None:
    tz = "America/New_York"
    assert learning.engaged_window(_at("2026-03-05", "00:30"), tz, CFG) == "evening"  # 210 min after 21:00
    assert learning.engaged_window(_at("2026-03-05", "06:30"), tz, CFG) == "morning"  # 150 min before 09:00
    late = LearningConfig(windows={"morning": "09:00", "late": "22:00"})  # 22:00-01:00, over midnight
    assert learning.engaged_window(_at("2026-03-05", "00:30"), tz, late) == "late"
    assert learning.engaged_window(_at("2026-03-05", "01:30"), tz, late) == "late"  # 30 min after it closed
    assert learning.engaged_window(_at("2026-03-05", "06:00"), tz, late) == "morning"


def test_engaged_window_follows_the_local_clock_over_dst_changes() -> None:
    tz = "America/New_York"
    # 16:30 UTC: 11:30 EST the day before clocks go forward (2026-03-08), 12:30 EDT that day
    assert learning.engaged_window(datetime(2026, 3, 7, 16, 30, tzinfo=UTC), tz, CFG) == "morning"
    assert learning.engaged_window(datetime(2026, 3, 8, 16, 30, tzinfo=UTC), tz, CFG) == "midday"
    # and back (2026-11-01): 12:30 EDT the day before, 11:30 EST that day
    assert learning.engaged_window(datetime(2026, 10, 31, 16, 30, tzinfo=UTC), tz, CFG) == "midday"
    assert learning.engaged_window(datetime(2026, 11, 1, 16, 30, tzinfo=UTC), tz, CFG) == "morning"
    # the skipped hour: 02:30 does not exist on 2026-03-08; 07:30 UTC is 03:30 EDT, nearest the morning
    assert learning.engaged_window(datetime(2026, 3, 8, 7, 30, tzinfo=UTC), tz, CFG) == "morning"
    assert learning.engaged_window(datetime(2026, 3, 8, 7, 30, tzinfo=UTC), "UTC", CFG) == "morning"


def test_engaged_window_without_windows_is_none() -> None:
    assert (
        learning.engaged_window(datetime(2026, 3, 4, tzinfo=UTC), "UTC", LearningConfig(windows={})) is None
    )


# ---------------------------------------------------------------------- a prompt answer


@pytest.mark.parametrize("minutes", [40, 90])
def test_a_prompt_read_credits_the_window_the_message_went_in(engine: Engine, minutes: int) -> None:
    """Read 40 minutes after the send (``prompt_hours`` is 1): the person was there when it
    came, whatever window the clock has moved into; 90 minutes: the window of the moment.
    The send is made to go out at 11:45 local, so both reads fall in midday's hours."""
    rp = Replayer(_config(windows={"morning": "09:00", "midday": "12:00"}), start=START, engine=engine)
    got: dict[str, Any] = {}

    async def go() -> None:
        await _consent(rp)
        item = await _offer(rp, engine, 0, _next_local(START, time(11, 45)))
        _ny(engine, item)
        sent = utc(item.created_at)
        assert sent.astimezone(NY).time() == time(11, 45) and _row(engine, item).window == "morning"
        await _event(rp, sent + timedelta(minutes=minutes), "rd0", "message.read", key=item.key)
        got.update(row=_row(engine, item), st=_person(engine, item.person_id))

    try:
        asyncio.run(go())
    finally:
        rp.close()
    credited = "morning" if minutes < 60 else "midday"
    assert got["row"].engaged_window == credited
    assert got["st"][("window", credited)][0] == pytest.approx(0.3)


def test_a_read_soon_after_a_late_delivery_is_prompt(engine: Engine) -> None:
    """The message went at 11:45 but reached the phone at 13:00 (carrier retries); read at
    13:30, it was read promptly: the morning window it went in gets the credit."""
    rp = Replayer(_config(windows={"morning": "09:00", "midday": "12:00"}), start=START, engine=engine)
    got: dict[str, Any] = {}

    async def go() -> None:
        await _consent(rp)
        item = await _offer(rp, engine, 0, _next_local(START, time(11, 45)))
        sent = utc(item.created_at)
        assert sent.astimezone(NY).time() == time(11, 45)
        await _event(rp, sent + timedelta(minutes=75), "d0", "message.delivered", key=item.key)
        await _event(rp, sent + timedelta(minutes=105), "rd0", "message.read", key=item.key)
        got.update(row=_row(engine, item))

    try:
        asyncio.run(go())
    finally:
        rp.close()
    assert got["row"].engaged_window == "morning"
