"""Mapping gaps: PID-13/PID-14 (XTN) emails in XTN-1, and the TQ1-6 service duration."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pytest

from careloop.hl7v2.parse import parse_bytes
from careloop.model import Identifier
from mapping.hl7v2 import map_message
from tests.hl7_support import adt, seg


def _pid(pid13: str) -> str:
    return seg("PID", {1: "1", 3: "NW400001^^^NWH^MR", 5: "Contactly^Rhea", 13: pid13})


@pytest.mark.parametrize(
    "pid13",
    [
        "rhea.contactly@example.org^NET^Internet",  # the address in XTN-1 (v2.2 style)
        "rhea.contactly@example.org",
        "^NET^Internet^rhea.contactly@example.org",  # XTN-4, v2.3+
    ],
)
def test_an_email_in_pid13_becomes_telecom_and_an_identifier(pid13: str) -> None:
    (ev,) = map_message(parse_bytes(adt("A08", "T1", pid=_pid(pid13))), ZoneInfo("UTC"))
    assert ev.patient is not None
    assert {"system": "email", "value": "rhea.contactly@example.org"} in ev.patient["telecom"]
    assert Identifier("email", "rhea.contactly@example.org", kind="email") in ev.identifiers


def test_a_phone_in_xtn1_is_still_a_phone() -> None:
    (ev,) = map_message(parse_bytes(adt("A08", "T2", pid=_pid("(555)555-0144^PRN^PH"))), ZoneInfo("UTC"))
    assert ev.patient is not None
    assert ev.patient["telecom"] == [{"system": "phone", "value": "+15555550144", "use": "home"}]


def test_tq1_6_service_duration_gives_the_end_when_tq1_8_is_empty() -> None:
    body = (
        "\r".join(
            [
                "MSH|^~\\&|NWSCHED|NORTHWIND|CARELOOP|CARELOOP|20260302090500-0500||SIU^S12^SIU_S12|D1|P|2.5.1",
                seg("SCH", {1: "APT-9^NWSCHED", 2: "APT-9F^NWSCHED", 25: "Booked"}),
                seg("TQ1", {1: "1", 6: "45^min&minutes&UCUM", 7: "20260312103000-0400"}),
                _pid(""),
            ]
        )
        + "\r"
    ).encode()
    (ev,) = map_message(parse_bytes(body), ZoneInfo("UTC"))
    assert ev.subject is not None
    assert ev.subject["start"] == "2026-03-12T10:30:00-04:00"
    assert ev.subject["end"] == "2026-03-12T11:15:00-04:00" and ev.subject["minutesDuration"] == 45
