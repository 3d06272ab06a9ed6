"""The compliance gate: the one place every outbound item passes; no playbook bypasses it.

Pure: it sees a snapshot of the person, the template, the candidate channels and the
recent sends, and answers send (on which channel, to which address), defer (quiet hours:
to the next allowed local time) or suppress, always with a reason code. Rules, in order:

1. ``deceased``: nothing is sent to a deceased patient.
2. ``escalation-open``: an open escalation pauses automated outreach to that person.
3. ``identity-unresolved``: an ambiguous identity is held for staff.
Per candidate channel, in preference order (the first that passes is used):
4. ``no-template-for-channel``; 5. ``phi-exceeds-channel`` (minimum necessary);
6. ``no-address``; and, checked after rules 7-9 so that it is the only obstacle left,
   ``identity-unresolved`` again when every address the person has for that channel is
   also another person's (``PersonFacts.shared``: a family phone; a message
   there could reach the wrong person, and a STOP from it could not be attributed), unless
   another channel reaches the person alone. The gate only refuses; the orchestrator then
   queues the message ``held`` for staff to release or cancel (``careloop outbox``);
7. ``opted-out`` (channel and purpose, or everything);
   a consent names a channel by its id or by its kind: a Twilio STOP, a FHIR Consent and
   a CRM opt-in say ``sms`` or ``email`` whatever the deployment calls its channel, so a
   channel matches both its configured id and its ``template_kind`` (rules 7 and 8);
8. ``no-consent``: a purpose listed in ``GateInput.opt_in_required`` (marketing: TCPA prior
   express written consent, HIPAA authorization) goes only with a recorded opt-in that names
   that purpose, for the channel or for every channel (``"*"``), younger than
   ``opt_in_max_age`` when that is set. A blanket opt-in (purpose ``"*"``: an SMS START, a
   FHIR Consent without a purpose) lifts an opt-out but is not consent to marketing. An
   opt-out always wins over an opt-in (rule 7 comes first: a STOP after the opt-in, or a
   STOP for everything, refuses with ``opted-out``). Other purposes need no opt-in;
9. ``frequency-cap`` (per person, per day and per week): a cap keyed by a channel id counts
   that channel's sends; one keyed by a kind (``sms``) counts every channel of that kind
   (``GateInput.kind_of``), so two SMS channels do not double the limit.
Then for the chosen channel:
10. quiet hours in the recipient's local time: ``defer`` to the window's next opening, or
   ``quiet-hours-past-useful-life`` when that opening is after the message's useful life.

Replies (``GateInput.mode``; orchestrator/triage.py decides them, issue 9) are answers to a
message the person has just sent, not automated outreach:
- ``reply`` (the HELP answer): skips rule 2 (escalation-open), rule 9 (frequency caps) and
  rule 10 (quiet hours: the person wrote to us this minute); every other rule holds.
- ``safety`` (the emergency safety reply, "call 911"): as ``reply``, and also skips rule 3
  (identity-unresolved), because the reply carries no PHI and must reach whoever wrote; it
  is refused unless the template's ``phi_class`` is ``none`` (``safety-reply-not-phi-free``).
  It never skips rule 1 (deceased), opt-outs (rule 7: the provider would refuse anyway, and
  the escalation still reaches a human), opt-in requirements (rule 8), address or PHI rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

PHI_ORDER = {"none": 0, "limited": 1, "full": 2}
PERSON_FACING = frozenset({"phone", "email"})


@dataclass(frozen=True, slots=True)
class ChannelFacts:
    id: str
    address_kind: str  # phone|email|fhir|none
    template_kind: str  # sms|email|text|fhir|json
    max_phi: str


@dataclass(frozen=True, slots=True)
class PersonFacts:
    deceased: bool
    timezone: str
    addresses: dict[str, list[str]]  # address kind -> addresses, best first
    opted_out: frozenset[tuple[str, str]]  # (channel or "*", purpose or "*")
    open_escalations: int = 0
    # (channel or "*", purpose or "*") -> when the opt-in was recorded (aware, UTC)
    opted_in: dict[tuple[str, str], datetime] = field(default_factory=dict)
    identity_held: bool = False
    # Addresses (phone numbers, emails) that another person's record also holds (rule 6).
    shared: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Cap:
    per_day: int
    per_week: int


@dataclass(frozen=True, slots=True)
class GateInput:
    now: datetime
    person: PersonFacts
    template_kinds: frozenset[str]
    phi_class: str
    purpose: str
    channels: list[ChannelFacts]
    sent_day: dict[str, int] = field(default_factory=dict)  # channel -> sends in the last 24 h
    sent_week: dict[str, int] = field(default_factory=dict)
    caps: dict[str, Cap] = field(default_factory=dict)  # keyed by channel id or template kind
    # Every configured channel's kind, by id: a cap keyed by kind counts all of them (rule 9).
    kind_of: dict[str, str] = field(default_factory=dict)
    quiet_hours: tuple[time, time] = (time(8), time(21))
    not_after: datetime | None = None
    mode: str = "outreach"  # outreach|reply|safety (see the module docstring)
    # Purposes that need a recorded opt-in (rule 8); the default is the config's, so that a
    # caller that leaves it out still never sends marketing without consent.
    opt_in_required: frozenset[str] = frozenset({"marketing"})
    opt_in_max_age: timedelta | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: str  # send|defer|suppress
    reason: str
    channel: str | None = None
    recipient: str | None = None
    deliver_at: datetime | None = None
    tried: tuple[tuple[str, str], ...] = ()  # (channel, why not) for channels passed over
    allowed: tuple[str, ...] = ()  # every channel that passed, in preference order


def parse_quiet_hours(text: str) -> tuple[time, time]:
    """``site.quiet_hours``: the *allowed* sending window ("08:00-21:00"). A window that is
    empty or crosses midnight ("21:00-08:00", most likely the quiet period written where
    the allowed one belongs) is refused: read literally it would send at night, and the
    gate could never find an opening for it (every item deferred a day at a time until
    its useful life ran out)."""
    start, end = text.split("-")
    h, m = (int(x) for x in start.split(":"))
    eh, em = (int(x) for x in end.split(":"))
    window = time(h, m), (time(23, 59, 59) if eh == 24 else time(eh, em))
    _check_window(window)
    return window


def _check_window(window: tuple[time, time]) -> None:
    if window[0] >= window[1]:
        raise ValueError(
            "quiet_hours is the allowed sending window (like 08:00-21:00): its start must be "
            "before its end on the same day"
        )


def next_allowed(now: datetime, tz: str, window: tuple[time, time]) -> datetime:
    """``now`` if it is inside the local window, else the window's next opening."""
    _check_window(window)
    local = now.astimezone(ZoneInfo(tz))
    start, end = window
    if start <= local.time() < end:
        return now
    day = local.date() if local.time() < start else local.date() + timedelta(days=1)
    opening = datetime.combine(day, start, tzinfo=ZoneInfo(tz))
    return opening.astimezone(now.tzinfo)


def _names(ch: ChannelFacts) -> tuple[str, ...]:
    """How a consent may name ``ch``: its id, its kind (``sms``, ``email``), or every channel."""
    return tuple(dict.fromkeys((ch.id, ch.template_kind, "*")))


def _opted_out(p: PersonFacts, ch: ChannelFacts, purpose: str) -> bool:
    return any((c, pur) in p.opted_out for c in _names(ch) for pur in (purpose, "*"))


def _consented(inp: GateInput, ch: ChannelFacts) -> bool:
    """Rule 8: an opt-in on record for ``ch`` and the purpose, recent enough."""
    if inp.purpose not in inp.opt_in_required:
        return True
    times = [at for c in _names(ch) if (at := inp.person.opted_in.get((c, inp.purpose))) is not None]
    if not times:
        return False
    return inp.opt_in_max_age is None or inp.now - max(times) <= inp.opt_in_max_age


def _caps_for(inp: GateInput, ch: ChannelFacts) -> list[tuple[Cap, bool]]:
    """The caps that apply to ``ch``, each with whether it counts by kind: the cap keyed by
    its kind (every channel of that kind counts, even when one of them is named like the
    kind) and one keyed by its own id (that channel's sends only). Both must hold."""
    out: list[tuple[Cap, bool]] = []
    if (cap := inp.caps.get(ch.template_kind)) is not None:
        out.append((cap, True))
    if ch.id != ch.template_kind and (cap := inp.caps.get(ch.id)) is not None:
        out.append((cap, False))
    return out


def evaluate(inp: GateInput) -> Verdict:
    p = inp.person
    if p.deceased:
        return Verdict("suppress", "deceased")
    reply = inp.mode in ("reply", "safety")
    if inp.mode == "safety" and inp.phi_class != "none":
        return Verdict("suppress", "safety-reply-not-phi-free")
    if p.open_escalations > 0 and not reply:
        return Verdict("suppress", "escalation-open")
    if p.identity_held and inp.mode != "safety":
        return Verdict("suppress", "identity-unresolved")
    tried: list[tuple[str, str]] = []
    allowed = tuple(ch.id for ch in inp.channels if _channel_refusal(inp, ch) is None)
    for ch in inp.channels:
        why = _channel_refusal(inp, ch)
        if why is not None:
            tried.append((ch.id, why))
            continue
        to = recipient(inp, ch)
        if ch.address_kind not in PERSON_FACING:
            return Verdict("send", "allowed", ch.id, to, inp.now, tuple(tried), allowed)
        at = inp.now if reply else next_allowed(inp.now, p.timezone, inp.quiet_hours)
        if at == inp.now:
            return Verdict("send", "allowed", ch.id, to, at, tuple(tried), allowed)
        if inp.not_after is not None and at >= inp.not_after:
            return Verdict("suppress", "quiet-hours-past-useful-life", ch.id, None, None, tuple(tried))
        return Verdict("defer", "quiet-hours", ch.id, to, at, tuple(tried), allowed)
    reason = tried[0][1] if tried else "no-channel"
    return Verdict("suppress", reason, None, None, None, tuple(tried))


def _usable(inp: GateInput, ch: ChannelFacts) -> list[str]:
    """The person's addresses for ``ch``, best first, without those another person shares
    (the safety reply goes to whoever wrote, shared or not)."""
    have = inp.person.addresses.get(ch.address_kind, [])
    if inp.mode == "safety" or not inp.person.shared:
        return have
    return [a for a in have if a not in inp.person.shared]


def recipient(inp: GateInput, ch: ChannelFacts) -> str:
    """Where a send on ``ch`` goes: the person's best address for it that no one else
    shares (rule 6), or the channel's own target (a FHIR server, a webhook)."""
    return _usable(inp, ch)[0] if ch.address_kind in PERSON_FACING else ch.address_kind


def _sent(counts: dict[str, int], inp: GateInput, ch: ChannelFacts, by_kind: bool) -> int:
    if not by_kind:
        return counts.get(ch.id, 0)
    return sum(n for c, n in counts.items() if inp.kind_of.get(c, c) == ch.template_kind or c == ch.id)


def _channel_refusal(inp: GateInput, ch: ChannelFacts) -> str | None:
    if ch.template_kind not in inp.template_kinds:
        return "no-template-for-channel"
    if PHI_ORDER[inp.phi_class] > PHI_ORDER[ch.max_phi]:
        return "phi-exceeds-channel"
    if ch.address_kind in PERSON_FACING and not inp.person.addresses.get(ch.address_kind):
        return "no-address"
    if _opted_out(inp.person, ch, inp.purpose):
        return "opted-out"
    if not _consented(inp, ch):
        return "no-consent"
    if inp.mode == "outreach":
        for cap, by_kind in _caps_for(inp, ch):
            if (
                _sent(inp.sent_day, inp, ch, by_kind) >= cap.per_day
                or _sent(inp.sent_week, inp, ch, by_kind) >= cap.per_week
            ):
                return "frequency-cap"
    # Last: ``identity-unresolved`` means nothing but the shared address stands in the way,
    # so a message the orchestrator holds for staff is one staff may really release.
    if ch.address_kind in PERSON_FACING and not _usable(inp, ch):
        return "identity-unresolved"
    return None
