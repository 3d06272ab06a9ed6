"""HL7 v2 data types -> FHIR R4 data types, per the HL7 V2-to-FHIR IG's data type maps.

Pure helpers used by ``mapping.hl7v2``: DTM -> dateTime/instant, CX -> Identifier,
XPN -> HumanName, XAD -> Address, XTN -> ContactPoint, CWE -> CodeableConcept,
PL -> a location display, XCN -> a practitioner reference. Each takes a raw repetition
(delimiters intact) and the message's ``Encoding``.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timedelta, timezone, tzinfo
from functools import lru_cache
from typing import Any, Final

import phonenumbers

from careloop.hl7v2.parse import Encoding, unescape

_DTM: Final = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?\s*([+-]\d{4})?$")

V2_0203: Final = "http://terminology.hl7.org/CodeSystem/v2-0203"

# Well-known HL7 table ids (component 3 of CWE) -> FHIR code system URLs.
_SYSTEMS: Final[dict[str, str]] = {
    "LN": "http://loinc.org",
    "SCT": "http://snomed.info/sct",
    "SNM": "http://snomed.info/sct",
    "C4": "http://www.ama-assn.org/go/cpt",
    "CPT": "http://www.ama-assn.org/go/cpt",
    "I10": "http://hl7.org/fhir/sid/icd-10",
    "I10C": "http://hl7.org/fhir/sid/icd-10-cm",
    "ISO639": "urn:ietf:bcp:47",
    "ISO+": "urn:iso:std:iso:2955",
    "UCUM": "http://unitsofmeasure.org",
}


_HL7_TABLE: Final = re.compile(r"HL7(\d{4})")
_OID: Final = re.compile(r"\d+(\.\d+)+")


@lru_cache(maxsize=256)
def code_system(name: str) -> str | None:
    """The FHIR code system URL for a CWE coding system name (component 3), or None.
    Cached: a sender uses a handful of names."""
    name = name.strip()
    if not name:
        return None
    if name in _SYSTEMS:
        return _SYSTEMS[name]
    m = _HL7_TABLE.fullmatch(name)
    if m:
        return f"http://terminology.hl7.org/CodeSystem/v2-{m.group(1)}"
    if _OID.fullmatch(name):
        return f"urn:oid:{name}"
    return None


def parse_dtm(value: str, tz: tzinfo) -> datetime | None:
    """An HL7 DTM as an aware datetime; a value without offset is taken in ``tz``.
    Returns None for an empty or unreadable value (never raises on sender data)."""
    if not value:
        return None
    m = _DTM.match(value.strip())
    if not m:
        return None
    y, mo, d, h, mi, s, frac, off = m.groups()
    if off:
        offset = _offset(off)
        if offset is None:
            return None
        tz = offset
    try:
        return datetime(
            int(y),
            int(mo or 1),
            int(d or 1),
            int(h or 0),
            int(mi or 0),
            int(s or 0),
            int(frac.ljust(6, "0")) if frac else 0,  # at most 4 digits: microseconds
            tzinfo=tz,
        )
    except ValueError:
        return None


@lru_cache(maxsize=128)
def _offset(off: str) -> timezone | None:
    """A DTM offset ("+hhmm"/"-hhmm") as a fixed zone, None past +/-14:59 (cached)."""
    sign = -1 if off[0] == "-" else 1
    hours, minutes = int(off[1:3]), int(off[3:5])
    if hours > 14 or minutes > 59:
        return None
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def fhir_datetime(dt: datetime) -> str:
    return dt.isoformat(timespec="seconds") if dt.microsecond == 0 else dt.isoformat()


_YEAR: Final = re.compile(r"^\d{4}")


def fhir_date(value: str) -> str | None:
    """DTM/DT -> FHIR date (YYYY, YYYY-MM or YYYY-MM-DD)."""
    v = value.strip()
    if not _YEAR.match(v):
        return None
    if len(v) >= 8 and v[:8].isdigit():
        try:
            datetime(int(v[:4]), int(v[4:6]), int(v[6:8]))
        except ValueError:
            return None
        return f"{v[:4]}-{v[4:6]}-{v[6:8]}"
    if len(v) >= 6 and v[:6].isdigit() and 1 <= int(v[4:6]) <= 12:
        return f"{v[:4]}-{v[4:6]}"
    return v[:4]


def short_id(*parts: str) -> str:
    """A URL-safe, deterministic FHIR id from identifying parts (no PHI in ids)."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def comps(rep: str, enc: Encoding, charset: str, n: int) -> list[str]:
    """Components 1..n of a raw repetition (first subcomponent each), unescaped; "" for
    a component that is absent. Equal to ``[leaf(rep, i, 1, ...) for i in 1..n]``, with
    one split of ``rep``."""
    if n <= 0:
        return []
    if not rep:
        return [""] * n
    sub, esc = enc.subcomponent, enc.escape
    out = rep.split(enc.component, n)[:n]
    if sub in rep or esc in rep:
        for i, c in enumerate(out):
            if sub in c:
                c = out[i] = c.split(sub, 1)[0]
            if esc in c:
                out[i] = unescape(c, enc, charset)
    if len(out) < n:
        out += [""] * (n - len(out))
    return out


def subcomponents(rep: str, comp: int, enc: Encoding, charset: str, n: int) -> list[str]:
    """Subcomponents 1..n of component ``comp`` (1-based) of a raw repetition, unescaped;
    equal to ``[leaf(rep, comp, i, ...) for i in 1..n]``."""
    parts = rep.split(enc.component, comp) if rep else []
    if comp < 1 or comp > len(parts):
        return [""] * n
    esc = enc.escape
    out = parts[comp - 1].split(enc.subcomponent, n)[:n]
    out = [unescape(s, enc, charset) if esc in s else s for s in out]
    if len(out) < n:
        out += [""] * (n - len(out))
    return out


def authority(hd_namespace: str, hd_universal: str) -> str:
    """The assigning authority as a system string: namespace id, else universal id."""
    return hd_namespace.strip() or hd_universal.strip()


def cx_authority(rep: str, enc: Encoding, charset: str) -> str:
    """CX.4 (HD): namespace id, else universal id (subcomponents of component 4)."""
    return authority(*subcomponents(rep, 4, enc, charset, 2))


def ei_authority(rep: str, enc: Encoding, charset: str) -> str:
    """EI.2 namespace id, else EI.3 universal id."""
    _, namespace, universal = comps(rep, enc, charset, 3)
    return authority(namespace, universal)


def codeable(rep: str, enc: Encoding, charset: str) -> dict[str, Any] | None:
    """CWE/CE -> CodeableConcept (first triplet, alternate triplet as a second coding)."""
    if not rep:
        return None
    c = comps(rep, enc, charset, 9)
    codings = []
    for code, display, system in ((c[0], c[1], c[2]), (c[3], c[4], c[5])):
        if code.strip():
            coding: dict[str, Any] = {"code": code.strip()}
            if display.strip():
                coding["display"] = display.strip()
            sys_url = code_system(system)
            if sys_url:
                coding["system"] = sys_url
            codings.append(coding)
    text = c[8].strip() or c[1].strip() or c[4].strip()
    if not codings and not text:
        return None
    out: dict[str, Any] = {}
    if codings:
        out["coding"] = codings
    if text:
        out["text"] = text
    return out


_NAME_USE: Final = {
    "L": "official",
    "D": "usual",
    "M": "maiden",
    "N": "nickname",
    "S": "anonymous",
    "B": "old",
    "TEMP": "temp",
}


def human_name(rep: str, enc: Encoding, charset: str) -> dict[str, Any] | None:
    """XPN -> HumanName."""
    c = comps(rep, enc, charset, 7)
    family = c[0].strip()
    given = [g.strip() for g in (c[1], c[2]) if g.strip()]
    out: dict[str, Any] = {}
    if family:
        out["family"] = family
    if given:
        out["given"] = given
    if c[3].strip():
        out["suffix"] = [c[3].strip()]
    if c[4].strip():
        out["prefix"] = [c[4].strip()]
    use = _NAME_USE.get(c[6].strip().upper())
    if not out:
        return None
    if use:
        out["use"] = use
    return out


_ADDR_USE: Final = {
    "H": ("home", None),
    "B": ("work", None),
    "O": ("work", None),
    "C": ("temp", None),
    "M": (None, "postal"),
    "BA": ("billing", None),
    "BI": ("billing", None),
    "P": ("home", "physical"),
    "BDL": (None, None),
}


def address(rep: str, enc: Encoding, charset: str) -> dict[str, Any] | None:
    """XAD -> Address (XAD.1 is SAD: its subcomponents form the street line)."""
    c = comps(rep, enc, charset, 7)
    first = c[0]
    sad = rep.split(enc.component, 1)[0]
    if enc.subcomponent in sad:
        subs = sad.split(enc.subcomponent)
        first = " ".join(unescape(s, enc, charset).strip() for s in subs if s.strip())
    lines = [x.strip() for x in (first, c[1]) if x.strip()]
    out: dict[str, Any] = {}
    if lines:
        out["line"] = lines
    for key, val in (("city", c[2]), ("state", c[3]), ("postalCode", c[4]), ("country", c[5])):
        if val.strip():
            out[key] = val.strip()
    if not out:
        return None
    use, typ = _ADDR_USE.get(c[6].strip().upper(), (None, None))
    if use:
        out["use"] = use
    if typ:
        out["type"] = typ
    return out


_TEL_SYSTEM: Final = {"FX": "fax", "BP": "pager"}
_TEL_USE: Final = {"PRN": "home", "ORN": "home", "WPN": "work", "VHN": "temp", "ASN": "temp", "EMR": "temp"}


# A NANP number already in E.164 ("+1" then ten ASCII digits, the area code not starting
# with 0 or 1) or its bare ten digits: what contact_point builds from XTN-5/6/7 in practice.
# For region US, phonenumbers reads these without stripping anything (the national prefix
# "1" cannot match a leading 2-9) and finds them possible (US numbers are ten digits long),
# so its E.164 is "+1" and the ten digits (checked against phonenumbers 9.0 for every area code).
_NANP_E164: Final = re.compile(r"(?:\+1)?([2-9][0-9]{9})")


def normalize_phone(text: str, region: str = "US") -> str | None:
    """A phone number in E.164 (+15555550101), or None when it is not a possible number
    (phonenumbers' reading of ``text`` in ``region``)."""
    digits = text.strip()
    if region == "US":
        m = _NANP_E164.fullmatch(digits)
        if m is not None:
            return "+1" + m.group(1)
    return _parse_phone(digits, region)


@lru_cache(maxsize=4096)
def _parse_phone(digits: str, region: str) -> str | None:
    """``normalize_phone`` by phonenumbers, for stripped text. Cached by (text, region):
    parsing is the costly part and a patient's numbers recur."""
    if not digits or not any(ch.isdigit() for ch in digits):
        return None
    try:
        num = phonenumbers.parse(digits, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(num):
        return None
    return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)


def contact_point(rep: str, enc: Encoding, charset: str, business: bool) -> dict[str, Any] | None:
    """XTN -> ContactPoint, with phones normalized to E.164 and emails lower-cased."""
    c = comps(rep, enc, charset, 12)
    use_code, equip = c[1].strip().upper(), c[2].strip().upper()
    email = c[3].strip()
    if not email and "@" in c[0]:
        # The address in XTN-1, as v2.2 senders (and many later ones) write it: a phone
        # number never holds an "@".
        email = c[0].strip()
    out: dict[str, Any]
    if email and "@" in email and (equip in ("INTERNET", "X.400", "") or use_code == "NET"):
        out = {"system": "email", "value": email.lower()}
    else:
        if c[11].strip():
            raw = c[11]
        elif c[5].strip() or c[6].strip():
            cc = c[4].strip().lstrip("+")
            raw = (f"+{cc}" if cc else "") + c[5] + c[6]
        else:
            raw = c[0]
        e164 = normalize_phone(raw)
        if e164 is None:
            return None
        system = _TEL_SYSTEM.get(equip, "phone")
        out = {"system": system, "value": e164}
    if equip == "CP":
        out["use"] = "mobile"
    elif business or use_code == "WPN":
        out["use"] = "work"
    elif use_code in _TEL_USE:
        out["use"] = _TEL_USE[use_code]
    return out


def location_display(rep: str, enc: Encoding, charset: str) -> str | None:
    """PL -> a display string: point of care, room, bed, facility, building, floor."""
    c = comps(rep, enc, charset, 9)
    parts = [c[0], c[1], c[2], c[3], c[6], c[7]]
    text = " ".join(p.strip() for p in parts if p.strip())
    return text or (c[8].strip() or None)


def practitioner(rep: str, enc: Encoding, charset: str) -> dict[str, Any] | None:
    """XCN -> a Reference to a Practitioner, by identifier and display."""
    c = comps(rep, enc, charset, 9)
    ident, family = c[0].strip(), c[1].strip()
    name = " ".join(p.strip() for p in (c[5], c[2], family) if p.strip())
    if not ident and not name:
        return None
    ref: dict[str, Any] = {"type": "Practitioner"}
    if ident:
        ident_ref: dict[str, Any] = {"value": ident}
        auth = c[8].strip() or subcomponents(rep, 9, enc, charset, 2)[1].strip()
        if auth:
            ident_ref["system"] = auth
        ref["identifier"] = ident_ref
    if name:
        ref["display"] = name
    return ref
