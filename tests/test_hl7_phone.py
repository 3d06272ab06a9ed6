"""normalize_phone's NANP fast path gives what phonenumbers gives, for every area code and for
arbitrary text (a phonenumbers upgrade that changed its answers would show here)."""

from __future__ import annotations

import phonenumbers
from hypothesis import given, settings
from hypothesis import strategies as st

from mapping.hl7v2_fhir import normalize_phone


def by_phonenumbers(text: str, region: str = "US") -> str | None:
    digits = text.strip()
    if not digits or not any(ch.isdigit() for ch in digits):
        return None
    try:
        num = phonenumbers.parse(digits, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(num):
        return None
    return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)


def test_every_area_code_agrees_with_phonenumbers() -> None:
    for npa in range(1000):
        for line in ("0000000", "5550101", "9999999"):
            d = f"{npa:03d}{line}"
            for text in (d, "+1" + d, "1" + d, f" +1{d} ", "+" + d):
                assert normalize_phone(text) == by_phonenumbers(text), text


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.from_regex(r"\s?(\+1|1|\+)?[0-9]{9,11}\s?", fullmatch=True),
        st.text(alphabet="0123456789+-() .x\u0661\uff11", max_size=16),
    ),
    st.sampled_from(["US", "GB", "CA"]),
)
def test_any_text_agrees_with_phonenumbers(text: str, region: str) -> None:
    assert normalize_phone(text, region) == by_phonenumbers(text, region)
