"""HL7 v2 acknowledgments: content of the ACK, original and enhanced modes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from careloop.hl7v2.ack import AckError, Outcome, build_ack, should_send
from careloop.hl7v2.parse import parse_bytes, read_header
from connectors.hl7v2_mllp import MLLPConfig, MLLPConnector
from tests.hl7_support import adt, msa, msh, segment, siu

AT = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)


def connector(**kw: object) -> MLLPConnector:
    return MLLPConnector("adt", MLLPConfig(plugin="hl7v2_mllp", **kw))


def test_ack_echoes_control_id_and_swaps_sender_and_receiver() -> None:
    hdr = read_header(siu("S12", "CTRL-42", sender="SCHAPP", facility="NWH^1.2.3^ISO"))
    ack = build_ack(hdr, Outcome.OK, AT)
    m = parse_bytes(ack)
    assert msa(ack) == ("AA", "CTRL-42")
    assert m.msh.raw(3) == "CARELOOP" and m.msh.raw(4) == "CARELOOP"
    assert m.msh.raw(5) == "SCHAPP" and m.msh.raw(6) == "NWH^1.2.3^ISO"
    assert m.msh.raw(9) == "ACK^S12^ACK" and m.msh.raw(12) == "2.5.1" and m.msh.raw(11) == "P"
    assert m.msh.raw(7) == "20260302140000+0000"
    assert segment(ack, "ERR") is None


def test_ack_reuses_the_message_encoding_characters_and_charset() -> None:
    data = b"MSH#*!$%#APP#FAC#CARELOOP#CL#20260302##ADT*A01#X7#P#2.5###AL#NE##8859/1\rPID#1\r"
    ack = build_ack(read_header(data), Outcome.ERROR, AT, AckError(207, "could not store a|b"))
    assert ack.startswith(b"MSH#*!$%#CARELOOP#CL#APP#FAC#")
    m = parse_bytes(ack)
    assert m.msh.raw(18) == "8859/1" and m.msh.raw(9) == "ACK*A01*ACK"
    assert m.msh.raw(15) == "NE" and m.msh.raw(16) == "NE"  # no ACK of an ACK
    err = m.segment("ERR")
    assert err is not None and err.get(3, 1) == "207" and err.get(8) == "could not store a|b"
    assert msa(ack)[0] == "CE"  # MSH-15/16 present: enhanced mode


def test_err_uses_erl_and_0357_codes_from_v2_5() -> None:
    hdr = read_header(adt("A01", "E1"))
    ack = build_ack(hdr, Outcome.ERROR, AT, AckError(102, "bad byte", "MSH^1^18"))
    err = segment(ack, "ERR")
    assert err is not None
    assert err[2] == "MSH^1^18" and err[3] == "102^Data type error^HL70357" and err[4] == "E"
    assert msa(ack) == ("AE", "E1")


def test_err_uses_eld_and_msa_3_before_v2_5() -> None:
    hdr = read_header(adt("A01", "E2", version="2.3"))
    ack = build_ack(hdr, Outcome.REJECT, AT, AckError(207, "too big"))
    err = segment(ack, "ERR")
    assert err is not None and err[1].endswith("207&Application internal error&HL70357")
    line = segment(ack, "MSA")
    assert line is not None and line[1] == "AR" and line[3] == "too big"
    m = parse_bytes(ack)
    assert m.msh.raw(9) == "ACK^A01"


@pytest.mark.parametrize(
    ("accept_ack", "outcome", "sent", "code"),
    [
        ("AL", Outcome.OK, True, "CA"),
        ("AL", Outcome.ERROR, True, "CE"),
        ("NE", Outcome.OK, False, None),
        ("NE", Outcome.REJECT, False, None),
        ("ER", Outcome.OK, False, None),
        ("ER", Outcome.ERROR, True, "CE"),
        ("SU", Outcome.OK, True, "CA"),
        ("SU", Outcome.REJECT, False, None),
    ],
)
def test_enhanced_mode_honours_msh_15(
    accept_ack: str, outcome: Outcome, sent: bool, code: str | None
) -> None:
    hdr = read_header(adt("A01", "EN1", accept_ack=accept_ack, app_ack="NE"))
    assert should_send(hdr, outcome) is sent
    if code:
        assert msa(build_ack(hdr, outcome, AT))[0] == code


def test_original_mode_always_answers_aa_ae_ar() -> None:
    hdr = read_header(adt("A01", "O1"))
    assert [msa(build_ack(hdr, o, AT))[0] for o in Outcome] == ["AA", "AE", "AR"]
    assert all(should_send(hdr, o) for o in Outcome)


def test_configured_mode_overrides_the_message() -> None:
    hdr = read_header(adt("A01", "F1"))
    assert msa(build_ack(hdr, Outcome.OK, AT, style="enhanced"))[0] == "CA"
    hdr2 = read_header(adt("A01", "F2", accept_ack="AL"))
    assert msa(build_ack(hdr2, Outcome.OK, AT, style="original"))[0] == "AA"


def test_accept_stores_an_aa_reply_kind_and_dedup_key() -> None:
    [raw] = connector().accept(siu("S12", "K1", sender="SCHAPP", facility="NWH"), {})
    assert raw.kind == "hl7v2:SIU^S12" and raw.dedup_key == "SCHAPP|NWH|K1"
    assert raw.reply is not None and msa(raw.reply) == ("AA", "K1")
    assert raw.headers["timezone"] == "UTC" and raw.content_type == "x-application/hl7-v2+er7"


def test_accept_stamps_the_site_time_zone() -> None:
    c = MLLPConnector("adt", MLLPConfig(plugin="hl7v2_mllp", timezone="America/New_York"))
    assert c.accept(adt("A01"), {})[0].headers["timezone"] == "America/New_York"


def test_undecodable_message_is_kept_and_answered_ae_with_err() -> None:
    data = (msh("ADT^A08", "BAD1", charset="UNICODE UTF-8") + "\rPID|1||X^^^NWH||Nam\xe9").encode(
        "latin-1"
    ) + b"\r"
    [raw] = connector().accept(data, {})
    assert raw.body == data and raw.reply is not None
    assert msa(raw.reply) == ("AE", "BAD1")
    err = segment(raw.reply, "ERR")
    assert err is not None and err[3].startswith("102^") and "MSH-18" in err[8]


def test_enhanced_ne_message_is_stored_without_a_reply() -> None:
    [raw] = connector().accept(adt("A01", "NE1", accept_ack="NE", app_ack="NE"), {})
    assert raw.reply is None and raw.dedup_key is not None


def test_batch_accept_yields_one_raw_message_per_message() -> None:
    batch = b"BHS|^~\\&|NWADT\r" + adt("A01", "BA1") + adt("A03", "BA2") + b"BTS|2\r"
    raws = connector().accept(batch, {})
    assert [r.kind for r in raws] == ["hl7v2:ADT^A01", "hl7v2:ADT^A03"]
    assert [msa(r.reply or b"")[1] for r in raws] == ["BA1", "BA2"]


def test_strict_mode_rejects_structure_errors_with_ae() -> None:
    c = connector(strict=True)
    [good] = c.accept(adt("A01", "ST1"), {})
    assert good.reply is not None and msa(good.reply)[0] == "AA"
    broken = adt("A01", "ST2").replace(b"PID|", b"PV1|")  # PID missing, PV1 twice
    [bad] = c.accept(broken, {})
    assert bad.reply is not None and msa(bad.reply)[0] == "AE"
    err = segment(bad.reply, "ERR")
    assert err is not None and err[3].split("^")[0] in {"100", "101", "102"}
