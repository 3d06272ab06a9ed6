"""The HL7 v2 tokenizer: delimiters, escapes, terminators, batches, character sets."""

from __future__ import annotations

import hl7
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from careloop.errors import PermanentError
from careloop.hl7v2.parse import (
    CharsetError,
    Encoding,
    HL7FormatError,
    decode,
    escape,
    parse_bytes,
    parse_text,
    read_header,
    split_messages,
    unescape,
)
from tests.hl7_support import adt, fixture_messages, msh, seg, siu


def test_fields_repetitions_components_and_subcomponents_are_addressed_one_based() -> None:
    m = parse_bytes(adt("A01", extra=[seg("ZPI", {1: "a&b^c~d", 2: "z"})]))
    pid = m.segment("PID")
    assert pid is not None
    assert pid.get(3) == "NW200001" and pid.get(3, 4) == "NWH" and pid.get(3, 5) == "MR"
    assert pid.get(5, 2) == "Dora"
    assert len(pid.repetitions(13)) == 2 and pid.get(13, 4, rep=1) == "Dora.Examplar@Example.org"
    zpi = m.segment("ZPI")  # Z-segments are ordinary segments
    assert zpi is not None and zpi.get(1, 1, 2) == "b" and zpi.get(1, 2) == "c" and zpi.get(1, rep=1) == "d"
    assert zpi.get(9) == "" and zpi.get(1, 7) == "" and zpi.get(1, 1, 5) == ""


def test_msh_fields_count_the_separator_as_msh_1() -> None:
    m = parse_bytes(adt("A01", "CTRL-9"))
    assert m.msh.get(1) == "|" and m.msh.get(2) == "^~\\&"
    assert m.message_type == ("ADT", "A01") and m.control_id == "CTRL-9" and m.version == "2.5.1"


@pytest.mark.parametrize("terminator", [b"\r", b"\n", b"\r\n"])
def test_every_segment_terminator_is_accepted(terminator: bytes) -> None:
    data = adt("A01").replace(b"\r", terminator)
    m = parse_bytes(data)
    assert [s.name for s in m.segments] == ["MSH", "EVN", "PID", "PV1"]


def test_utf8_bom_is_stripped() -> None:
    m = parse_bytes(b"\xef\xbb\xbf" + adt("A08"))
    assert m.msh.name == "MSH" and m.message_type == ("ADT", "A08")


def test_custom_delimiters_from_msh_1_and_msh_2_are_used() -> None:
    text = "MSH#*!$%#A#B#C#D#20260302##ADT*A01#X1#P#2.5\rPID#1##ID1***NWH%ns##Fam*Giv!Alias*Other\r"
    m = parse_text(text)
    assert m.enc == Encoding("#", "*", "!", "$", "%")
    pid = m.segment("PID")
    assert pid is not None
    assert pid.get(3, 4) == "NWH" and pid.get(3, 4, 2) == "ns"
    assert pid.get(5, 2) == "Giv" and pid.get(5, 1, rep=1) == "Alias"
    assert m.message_type == ("ADT", "A01")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a\\F\\b", "a|b"),
        ("a\\S\\b\\T\\c\\R\\d\\E\\e", "a^b&c~d\\e"),
        ("caf\\XC3A9\\", "café"),
        ("line\\.br\\next", "line\\.br\\next"),  # formatting passes through
        ("\\H\\bold\\N\\", "\\H\\bold\\N\\"),
        ("\\Cxxyy\\", "\\Cxxyy\\"),
        ("unterminated \\F", "unterminated \\F"),
        ("\\X\\", "\\X\\"),
        ("plain", "plain"),
    ],
)
def test_escape_sequences_are_decoded_or_passed_through(raw: str, expected: str) -> None:
    assert unescape(raw) == expected


def test_escaped_delimiters_in_a_field_do_not_split_it() -> None:
    m = parse_bytes(adt("A01", extra=["ZNT|Smith \\T\\ Sons\\S\\Ltd\\F\\x\\R\\y"]))
    z = m.segment("ZNT")
    assert z is not None and z.get(1) == "Smith & Sons^Ltd|x~y"


def test_escape_round_trips_every_delimiter() -> None:
    text = "a|b^c&d~e\\f"
    assert unescape(escape(text)) == text


def test_batch_file_is_split_into_messages_without_envelope() -> None:
    batch = (
        b"FHS|^~\\&|NWADT\rBHS|^~\\&|NWADT\r"
        + adt("A01", "B1")
        + siu("S12", "B2")
        + adt("A03", "B3")
        + b"BTS|3\rFTS|1\r"
    )
    parts = split_messages(batch)
    assert [read_header(p).control_id for p in parts] == ["B1", "B2", "B3"]
    assert all(p.startswith(b"MSH") and b"BTS" not in p and b"FHS" not in p for p in parts)


def test_messages_back_to_back_with_lf_are_split() -> None:
    data = (adt("A01", "L1") + adt("A04", "L2")).replace(b"\r", b"\n")
    assert [read_header(p).control_id for p in split_messages(data)] == ["L1", "L2"]


@pytest.mark.parametrize("msh", [b"MSH|\x00~\\&|A|B", b"MSH|^ \\&|A|B", b"MSH\t^~\\&\tA"])
def test_control_characters_and_spaces_are_not_delimiters(msh: bytes) -> None:
    with pytest.raises(HL7FormatError) as err:
        read_header(msh + b"\r")
    assert err.value.code == 102


def test_payload_without_msh_is_rejected_without_quoting_it() -> None:
    with pytest.raises(HL7FormatError) as err:
        split_messages(b"PID|1||SECRET-MRN\r")
    assert "SECRET" not in str(err.value) and isinstance(err.value, PermanentError)


@pytest.mark.parametrize(
    ("charset", "payload", "text"),
    [
        ("UNICODE UTF-8", "José Ñúñez".encode(), "José Ñúñez"),
        ("8859/1", "José Ñúñez".encode("latin-1"), "José Ñúñez"),
        ("ASCII", b"Jose", "Jose"),
        ("", "Zoë".encode(), "Zoë"),
    ],
)
def test_msh_18_character_sets_decode(charset: str, payload: bytes, text: str) -> None:
    data = (msh("ADT^A08", "CS1", charset=charset) + "\rPID|1||X^^^NWH||").encode() + payload + b"\r"
    decoded, _ = decode(data)
    assert text in decoded
    pid = parse_bytes(data).segment("PID")
    assert pid is not None and pid.get(5) == text


@pytest.mark.parametrize(
    ("charset", "bad"), [("UNICODE UTF-8", b"\xc3\x28"), ("ASCII", b"\xe9"), ("", b"\xff")]
)
def test_undecodable_bytes_raise_a_phi_free_charset_error(charset: str, bad: bytes) -> None:
    data = (msh("ADT^A08", "CS2", charset=charset) + "\rPID|1||X^^^NWH||Secretname").encode() + bad + b"\r"
    with pytest.raises(CharsetError) as err:
        decode(data)
    msg = str(err.value)
    assert "MSH-18" in msg and "Secretname" not in msg and "byte" in msg
    assert err.value.code == 102


def test_unknown_charset_is_a_charset_error() -> None:
    data = (msh("ADT^A08", "CS3", charset="EBCDIC-9") + "\rPID|1\r").encode()
    with pytest.raises(CharsetError):
        decode(data)


def test_tokenizer_agrees_with_python_hl7_on_the_fixtures() -> None:
    for data in fixture_messages():
        ours = parse_bytes(data)
        theirs = hl7.parse(data.decode())
        for s_ours, s_theirs in zip(ours.segments, theirs, strict=True):
            assert s_ours.name == str(s_theirs[0])
            for n in range(1, len(s_ours)):
                if s_ours.name == "MSH" and n <= 2:
                    continue
                assert s_ours.raw(n) == str(s_theirs[n])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_either_parse_or_raise_a_permanent_error(data: bytes) -> None:
    try:
        for part in split_messages(data):
            read_header(part)
            parse_bytes(part)
    except PermanentError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_any_text_survives_escape_then_field_split(value: str) -> None:
    value = value.replace("\r", " ").replace("\n", " ")
    data = (msh("ADT^A08", "P1") + "\rZXX|" + escape(value) + "|end\r").encode()
    z = parse_bytes(data).segment("ZXX")
    assert z is not None and z.get(1) == value and z.get(2) == "end"
