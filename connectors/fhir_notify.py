"""Reading FHIR subscription notifications, whichever version the server speaks (pure, no I/O).

One normal form for three wire shapes:
- R4 Subscriptions Backport IG: a ``history`` Bundle whose entry[0] is a ``Parameters`` with
  kebab-case names (``events-since-subscription-start``, ``notification-event`` with parts
  ``event-number``, ``timestamp``, ``focus``, ``additional-context``); counters are strings.
  camelCase names are accepted too, as some servers send them.
- R4B: a ``history`` Bundle whose entry[0] is a ``SubscriptionStatus``.
- R5: a ``subscription-notification`` Bundle with a ``SubscriptionStatus``.
A bare ``Parameters`` (the backport ``$status`` answer) and a ``searchset`` of statuses (what
``$status`` returns on some servers) are read the same way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from careloop.model import RawIn

NOTIFICATION_TYPES = frozenset(
    {"handshake", "heartbeat", "event-notification", "query-status", "query-event"}
)


@dataclass(frozen=True, slots=True)
class NotificationEvent:
    number: int | None
    timestamp: datetime | None = None
    focus: str | None = None  # reference as sent (absolute or Type/id)
    context: tuple[str, ...] = ()


@dataclass(slots=True)
class Notification:
    """The status part of a notification plus the resources it carries."""

    flavor: str  # r4-backport | r4b | r5
    type: str
    subscription: str | None
    topic: str | None = None
    status: str | None = None
    events_since: int | None = None
    events: list[NotificationEvent] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)

    @property
    def subscription_id(self) -> str | None:
        return subscription_id(self.subscription)


class NotANotification(ValueError):
    """The body is JSON but not a subscription notification shape we know (message: no PHI)."""


def subscription_id(ref: str | None) -> str | None:
    """``https://ehr/fhir/Subscription/abc`` (or ``Subscription/abc/_history/2``) -> ``abc``."""
    if not ref:
        return None
    parts = ref.rstrip("/").split("/")
    if "Subscription" in parts:
        i = len(parts) - 1 - parts[::-1].index("Subscription")
        if i + 1 < len(parts):
            return parts[i + 1]
    return parts[-1]


def relative_ref(ref: str) -> str:
    """``https://ehr/fhir/Encounter/1/_history/2`` -> ``Encounter/1``."""
    parts = ref.rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:])


_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_instant(value: Any) -> datetime | None:
    """FHIR instant/dateTime -> aware datetime (7+ fractional digits are truncated)."""
    if not isinstance(value, str) or not value:
        return None
    v = _FRACTION.sub(r"\1", value.strip()).replace("Z", "+00:00")
    try:
        if len(v) == 4:
            return datetime(int(v), 1, 1, tzinfo=UTC)
        if len(v) == 7:
            return datetime(int(v[:4]), int(v[5:7]), 1, tzinfo=UTC)
        dt = datetime.fromisoformat(v)
    except ValueError:
        return None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def _int(value: Any) -> int | None:
    # Counters are strings in R4/R4B (and integer64 is a JSON string in R5); some servers
    # send numbers. Anything else is treated as "not reported", never as zero.
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _value(p: dict[str, Any]) -> Any:
    return next((v for k, v in p.items() if k.startswith("value")), None)


def _ref(v: Any) -> str | None:
    if isinstance(v, dict):
        r = v.get("reference")
        return r if isinstance(r, str) else None
    return v if isinstance(v, str) else None


def _name(n: Any) -> str:
    # kebab-case (the IG) and camelCase (some servers) name the same parameter.
    return re.sub(r"(?<!^)([A-Z])", r"-\1", str(n)).lower()


def _from_parameters(params: dict[str, Any]) -> Notification:
    out = Notification(flavor="r4-backport", type="", subscription=None)
    for p in params.get("parameter") or []:
        if not isinstance(p, dict):
            continue
        n = _name(p.get("name"))
        if n == "subscription":
            out.subscription = _ref(_value(p))
        elif n == "topic":
            out.topic = _value(p)
        elif n == "status":
            out.status = _value(p)
        elif n == "type":
            out.type = _value(p) or ""
        elif n == "events-since-subscription-start":
            out.events_since = _int(_value(p))
        elif n == "notification-event":
            number, ts, focus, ctx = None, None, None, []
            for part in p.get("part") or []:
                pn = _name(part.get("name"))
                if pn == "event-number":
                    number = _int(_value(part))
                elif pn == "timestamp":
                    ts = parse_instant(_value(part))
                elif pn == "focus":
                    focus = _ref(_value(part))
                elif pn == "additional-context":
                    r = _ref(_value(part))
                    if r:
                        ctx.append(r)
            out.events.append(NotificationEvent(number, ts, focus, tuple(ctx)))
        elif n == "error":
            v = _value(p)
            codes = [c.get("code") for c in (v or {}).get("coding", [])] if isinstance(v, dict) else []
            out.errors.extend(str(c) for c in codes if c)
    return out


def _from_status(st: dict[str, Any], flavor: str) -> Notification:
    out = Notification(
        flavor=flavor,
        type=str(st.get("type") or ""),
        subscription=_ref(st.get("subscription")),
        topic=st.get("topic"),
        status=st.get("status"),
        events_since=_int(st.get("eventsSinceSubscriptionStart")),
    )
    for ev in st.get("notificationEvent") or []:
        if isinstance(ev, dict):
            ctx = tuple(r for r in (_ref(c) for c in ev.get("additionalContext") or []) if r)
            out.events.append(
                NotificationEvent(
                    _int(ev.get("eventNumber")),
                    parse_instant(ev.get("timestamp")),
                    _ref(ev.get("focus")),
                    ctx,
                )
            )
    for e in st.get("error") or []:
        out.errors.extend(str(c.get("code")) for c in (e or {}).get("coding", []) if c.get("code"))
    return out


def _status_of(res: dict[str, Any], flavor: str) -> Notification:
    if res.get("resourceType") == "Parameters":
        return _from_parameters(res)
    return _from_status(res, flavor)


def parse(doc: Any) -> list[Notification]:
    """The notification(s) in ``doc``: one for a notification Bundle or a bare status, several
    for a ``$status`` searchset. Raises NotANotification for anything else."""
    if not isinstance(doc, dict):
        raise NotANotification("body is not a JSON object")
    rtype = doc.get("resourceType")
    if rtype in ("Parameters", "SubscriptionStatus"):
        return [_status_of(doc, "r4-backport" if rtype == "Parameters" else "r5")]
    if rtype != "Bundle":
        raise NotANotification(f"a {rtype} is not a notification")
    entries = [e for e in doc.get("entry") or [] if isinstance(e, dict)]
    btype = doc.get("type")
    if btype == "searchset":
        found = [
            _status_of(e["resource"], "r4-backport")
            for e in entries
            if isinstance(e.get("resource"), dict)
            and e["resource"].get("resourceType") in ("Parameters", "SubscriptionStatus")
        ]
        if not found:
            raise NotANotification("searchset holds no subscription status")
        return found
    if btype not in ("history", "subscription-notification") or not entries:
        raise NotANotification(f"Bundle type {btype} is not a notification")
    first = entries[0].get("resource")
    if not isinstance(first, dict) or first.get("resourceType") not in ("Parameters", "SubscriptionStatus"):
        raise NotANotification("Bundle entry[0] is not a subscription status")
    flavor = (
        "r5"
        if btype == "subscription-notification"
        else ("r4b" if first["resourceType"] == "SubscriptionStatus" else "r4-backport")
    )
    note = _status_of(first, flavor)
    note.flavor = flavor
    note.resources = [
        e["resource"]
        for e in entries[1:]
        if isinstance(e.get("resource"), dict)
        and e["resource"].get("resourceType")
        and e["resource"].get("id")
    ]
    if note.type not in NOTIFICATION_TYPES:
        raise NotANotification(f"unknown notification type {note.type or '(none)'}")
    return [note]


# --------------------------------------------------------------------------- resources -> raw messages

FHIR_JSON = "application/fhir+json"
# The mapper reads the server's base URL from this stored header (connectors and mappers do
# not import each other; mapping.fhir.BASE_HEADER names the same string).
BASE_HEADER = "x-careloop-fhir-base"
VERSION_HEADER = "x-careloop-fhir-version"  # mapping.fhir.VERSION_HEADER


def version_key(resource: dict[str, Any]) -> str | None:
    """The dedup key of one resource version: ``res|Type/id|<versionId>`` (or the lastUpdated
    instant when the server keeps no versions); None when the resource says neither."""
    meta = resource.get("meta") or {}
    ref = f"{resource.get('resourceType')}/{resource.get('id')}"
    if meta.get("versionId"):
        return f"res|{ref}|{meta['versionId']}"[:255]
    if meta.get("lastUpdated"):
        return f"res|{ref}|t{meta['lastUpdated']}"[:255]
    return None


def resource_item(
    connector: str,
    base: str,
    resource: dict[str, Any],
    fallback_key: str | None,
    extra_headers: dict[str, str] | None = None,
) -> RawIn:
    """One resource as its own raw message (kind ``fhir:<Type>``), keyed by version."""
    return RawIn(
        connector=connector,
        kind=f"fhir:{resource['resourceType']}",
        body=json.dumps(resource, separators=(",", ":"), ensure_ascii=False).encode("utf-8"),
        content_type=FHIR_JSON,
        dedup_key=version_key(resource) or fallback_key,
        headers={BASE_HEADER: base, **(extra_headers or {})},
    )
