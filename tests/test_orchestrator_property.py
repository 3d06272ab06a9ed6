"""Property: whatever the order and timing of one appointment's events, no reminder goes
out after a cancel or confirm (until a reschedule re-opens it), none twice, none in quiet hours."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from careloop import config as cfgmod
from careloop.replay import FeedLine, Replayer, build_report
from tests.conftest import FIXTURES
from tests.kernel_plugins import register

register()
CONFIG = cfgmod.load(FIXTURES / "config" / "kernel-test.yaml")
BOOKED_AT = datetime(2026, 3, 1, 14, 0, tzinfo=UTC)
START = datetime(2026, 3, 12, 15, 0, tzinfo=UTC)
NY = ZoneInfo("America/New_York")
KINDS = ["appointment.confirmed", "appointment.cancelled", "appointment.rescheduled", "appointment.noshow"]

events = st.lists(
    st.tuples(
        st.sampled_from(KINDS),
        st.integers(min_value=1, max_value=12 * 24 * 60),
        st.integers(min_value=-48, max_value=48),
    ),
    max_size=4,
)


def feed(evs: list[tuple[str, int, int]]) -> tuple[list[FeedLine], list[tuple[datetime, str, datetime]]]:
    import json

    lines = []
    timeline = []
    start = START
    seq = sorted((BOOKED_AT + timedelta(minutes=m), kind, shift) for kind, m, shift in evs)
    all_events = [(BOOKED_AT, "appointment.booked", 0), *seq]
    for i, (at, kind, shift) in enumerate(all_events):
        if kind == "appointment.rescheduled":
            start = start + timedelta(hours=shift or 1)
        status = {"appointment.cancelled": "cancelled", "appointment.noshow": "noshow"}.get(kind, "booked")
        body = {
            "at": at.isoformat(),
            "id": f"m{i}",
            "type": kind,
            "mrn": "MRN9",
            "phone": "+15555550109",
            "appointment": {"id": "a1", "start": start.isoformat(), "status": status},
        }
        lines.append(FeedLine(at, "feed", json.dumps(body).encode(), {}))
        timeline.append((at, kind, start))
    return lines, timeline


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events)
def test_reminders_respect_every_ordering(evs: list[tuple[str, int, int]]) -> None:
    lines, timeline = feed(evs)
    rp = Replayer(CONFIG, start=BOOKED_AT)
    try:
        asyncio.run(rp.feed(lines, horizon=timedelta(days=20)))
        rep = build_report(rp.store)
    finally:
        rp.close()
    reminders = [
        datetime.fromisoformat(d["at"]) for d in rep["deliveries"] if d["template"] == "appointment-reminder"
    ]
    keys = [d["key"] for d in rep["deliveries"]]
    assert len(keys) == len(set(keys))
    for at in reminders:
        local = at.astimezone(NY)
        assert 8 <= local.hour < 21, f"reminder in quiet hours at {local}"
        before = [(t, k) for t, k, _ in timeline if t <= at]
        status = "booked"
        for _t, k in before:
            if k == "appointment.rescheduled":
                status = "booked" if status not in ("cancelled",) else status
            elif k in ("appointment.confirmed", "appointment.cancelled", "appointment.noshow"):
                status = k.split(".")[1]
        assert status == "booked", f"reminder at {at} after {status}"
    starts = {s for _t, k, s in timeline if k in ("appointment.booked", "appointment.rescheduled")}
    assert len(reminders) <= 2 * len(starts)
    sms_days = sorted(reminders)
    for a, b in itertools.pairwise(sms_days):
        assert b - a >= timedelta(hours=24), "two SMS within a day"
