"""A recipient's time zone: from the address (US state), else the phone number, else the site."""

from __future__ import annotations

from typing import Any

import phonenumbers
from phonenumbers import timezone as pn_timezone

# The zone covering most of each state's population.
US_STATE_TZ = {
    "AL": "America/Chicago",
    "AK": "America/Anchorage",
    "AZ": "America/Phoenix",
    "AR": "America/Chicago",
    "CA": "America/Los_Angeles",
    "CO": "America/Denver",
    "CT": "America/New_York",
    "DE": "America/New_York",
    "DC": "America/New_York",
    "FL": "America/New_York",
    "GA": "America/New_York",
    "HI": "Pacific/Honolulu",
    "ID": "America/Boise",
    "IL": "America/Chicago",
    "IN": "America/Indiana/Indianapolis",
    "IA": "America/Chicago",
    "KS": "America/Chicago",
    "KY": "America/New_York",
    "LA": "America/Chicago",
    "ME": "America/New_York",
    "MD": "America/New_York",
    "MA": "America/New_York",
    "MI": "America/Detroit",
    "MN": "America/Chicago",
    "MS": "America/Chicago",
    "MO": "America/Chicago",
    "MT": "America/Denver",
    "NE": "America/Chicago",
    "NV": "America/Los_Angeles",
    "NH": "America/New_York",
    "NJ": "America/New_York",
    "NM": "America/Denver",
    "NY": "America/New_York",
    "NC": "America/New_York",
    "ND": "America/Chicago",
    "OH": "America/New_York",
    "OK": "America/Chicago",
    "OR": "America/Los_Angeles",
    "PA": "America/New_York",
    "RI": "America/New_York",
    "SC": "America/New_York",
    "SD": "America/Chicago",
    "TN": "America/Chicago",
    "TX": "America/Chicago",
    "UT": "America/Denver",
    "VT": "America/New_York",
    "VA": "America/New_York",
    "WA": "America/Los_Angeles",
    "WV": "America/New_York",
    "WI": "America/Chicago",
    "WY": "America/Denver",
    "PR": "America/Puerto_Rico",
}


def from_patient(patient: dict[str, Any]) -> str | None:
    for addr in patient.get("address", []):
        state = str(addr.get("state", "")).strip().upper()
        country = str(addr.get("country", "US")).strip().upper()
        if country in ("US", "USA", "") and state in US_STATE_TZ:
            return US_STATE_TZ[state]
    return None


def from_phone(e164: str) -> str | None:
    try:
        num = phonenumbers.parse(e164, None)
    except phonenumbers.NumberParseException:
        return None
    zones = [z for z in pn_timezone.time_zones_for_number(num) if z != "Etc/Unknown"]
    return zones[0] if len(zones) == 1 else None


def resolve(patient: dict[str, Any], phones: list[str], site_default: str) -> str:
    tz = from_patient(patient)
    if tz:
        return tz
    for p in phones:
        tz = from_phone(p)
        if tz:
            return tz
    return site_default
