"""A recipient's time zone: from the address (US state, refined by ZIP where the state spans
two zones), else the phone number, else the site."""

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
    "VI": "America/St_Thomas",
    "GU": "Pacific/Guam",
    "MP": "Pacific/Saipan",
    "AS": "Pacific/Pago_Pago",
}

# States whose area spans two zones: the 3-digit ZIP prefixes on the side that is not the
# state's own (US_STATE_TZ). Only prefixes that lie wholly or mostly in that zone; a prefix
# left out keeps the state's zone.
US_ZIP3_TZ: dict[str, dict[str, str]] = {
    "TX": {"799": "America/Denver", "885": "America/Denver"},  # El Paso
    "FL": {"324": "America/Chicago", "325": "America/Chicago"},  # Panama City, Pensacola
    "TN": {
        z: "America/New_York" for z in ("374", "376", "377", "378", "379")
    },  # Chattanooga, Knoxville, the Tri-Cities
    "KY": {z: "America/Chicago" for z in ("420", "421", "422", "423", "424")},  # West
    "IN": {z: "America/Chicago" for z in ("463", "464", "476", "477")},  # Gary, Evansville
    "ID": {"835": "America/Los_Angeles", "838": "America/Los_Angeles"},  # the panhandle
    "OR": {"979": "America/Boise"},  # Malheur County
    "SD": {"577": "America/Denver"},  # Rapid City
    "NE": {"693": "America/Denver"},  # the panhandle
}

_COUNTRY_US = frozenset({"", "US", "USA", "UNITED STATES", "UNITED STATES OF AMERICA"})
_STATE_NAMES = {
    "ALABAMA": "AL", "ALASKA": "AK", "ARIZONA": "AZ", "ARKANSAS": "AR", "CALIFORNIA": "CA",
    "COLORADO": "CO", "CONNECTICUT": "CT", "DELAWARE": "DE", "DISTRICT OF COLUMBIA": "DC",
    "FLORIDA": "FL", "GEORGIA": "GA", "HAWAII": "HI", "IDAHO": "ID", "ILLINOIS": "IL",
    "INDIANA": "IN", "IOWA": "IA", "KANSAS": "KS", "KENTUCKY": "KY", "LOUISIANA": "LA",
    "MAINE": "ME", "MARYLAND": "MD", "MASSACHUSETTS": "MA", "MICHIGAN": "MI", "MINNESOTA": "MN",
    "MISSISSIPPI": "MS", "MISSOURI": "MO", "MONTANA": "MT", "NEBRASKA": "NE", "NEVADA": "NV",
    "NEW HAMPSHIRE": "NH", "NEW JERSEY": "NJ", "NEW MEXICO": "NM", "NEW YORK": "NY",
    "NORTH CAROLINA": "NC", "NORTH DAKOTA": "ND", "OHIO": "OH", "OKLAHOMA": "OK", "OREGON": "OR",
    "PENNSYLVANIA": "PA", "RHODE ISLAND": "RI", "SOUTH CAROLINA": "SC", "SOUTH DAKOTA": "SD",
    "TENNESSEE": "TN", "TEXAS": "TX", "UTAH": "UT", "VERMONT": "VT", "VIRGINIA": "VA",
    "WASHINGTON": "WA", "WEST VIRGINIA": "WV", "WISCONSIN": "WI", "WYOMING": "WY",
    "PUERTO RICO": "PR",
}  # fmt: skip
# Addresses that do not say where the person is now.
_NOT_WHERE_THEY_LIVE = frozenset({"old", "billing"})


def from_address(addr: dict[str, Any]) -> str | None:
    """The zone of one FHIR Address, or None when it is not a US one we can place."""
    country = str(addr.get("country") or "").strip().upper()
    if country not in _COUNTRY_US:
        return None
    state = str(addr.get("state") or "").strip().upper()
    state = _STATE_NAMES.get(state, state)
    if state not in US_STATE_TZ:
        return None
    zip3 = str(addr.get("postalCode") or "").strip()[:3]
    return US_ZIP3_TZ.get(state, {}).get(zip3, US_STATE_TZ[state])


def from_patient(patient: dict[str, Any]) -> str | None:
    for addr in patient.get("address", []):
        if not isinstance(addr, dict) or addr.get("use") in _NOT_WHERE_THEY_LIVE:
            continue
        tz = from_address(addr)
        if tz:
            return tz
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
