"""The MLLP listener's hot path gives exactly what the general path gives: the fast reading
of plain messages (cached MSH shapes, ACK templates) against ``HL7Acceptor``, and the
one-whole-frame shortcut of the framer against feeding the same bytes in pieces. The one
difference allowed: each ACK has its own control id (its MSH-10), unique."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from careloop.clock import VirtualClock
from careloop.model import RawIn
from connectors.hl7v2_accept import Accepted, HL7Acceptor
from connectors.hl7v2_mllp import Frame, MLLPConfig, MLLPConnector, MLLPFramer, frame
from tests.hl7_support import ack_id, adt, fixture_messages, siu, without_ack_id

AT = datetime(2026, 3, 2, 14, 0, 7, 250000, tzinfo=UTC)


def pair(**kw: object) -> tuple[MLLPConnector, HL7Acceptor]:
    cfg = MLLPConfig(plugin="hl7v2_mllp", timezone="America/New_York", **kw)
    clock = VirtualClock(AT)
    c = MLLPConnector("adt", cfg, clock=clock)
    general = HL7Acceptor(
        "adt", clock, "America/New_York", cfg.ack_style, cfg.strict, cfg.receiving_application
    )
    return c, general


def same(c: MLLPConnector, general: HL7Acceptor, body: bytes) -> None:
    """Both paths agree, twice (the second time the MSH shape comes from the cache)."""
    for _ in range(2):
        try:
            want = general.accept(body, {})
        except Exception as exc:
            try:
                c._accept(body, {})
            except Exception as refused:
                assert type(refused) is type(exc) and str(refused) == str(exc)
            else:
                raise AssertionError("the fast path accepted what the general path refuses") from None
            continue
        got = c._accept(body, {})
        assert comparable(got.items) == comparable(want.items)
        assert got.headers == want.headers and got.batch == want.batch and got.nack == want.nack
        ids = [ack_id(r) for a in (got, want) for r in replies(a)]
        assert len(set(ids)) == len(ids) and all(0 < len(i) <= 20 for i in ids)


def replies(a: Accepted) -> list[bytes]:
    return [r.reply for r in a.items if r.reply is not None] + ([a.nack] if a.nack else [])


def comparable(items: list[RawIn]) -> list[RawIn]:
    return [
        RawIn(i.connector, i.kind, i.body, i.content_type, i.dedup_key, i.headers, without_ack_id(i.reply))
        if i.reply is not None
        else i
        for i in items
    ]


def test_fixture_messages_read_the_same_on_both_paths() -> None:
    c, general = pair()
    for m in fixture_messages():
        same(c, general, m)
        same(c, general, m.rstrip(b"\r"))  # no final terminator


def test_ack_modes_charsets_versions_and_odd_headers_read_the_same() -> None:
    bodies = [adt("A01", "V1", version=v) for v in ("2.3", "2.3.1", "2.4", "2.5", "2.8", "")] + [
        siu("S12", "M1", accept_ack=a, app_ack=b)
        for a in ("AL", "NE", "ER", "SU", "")
        for b in ("AL", "NE", "")
    ]
    bodies += [
        adt("A01", "C1", charset="8859/1"),
        adt("A01", "C2", charset="UNICODE UTF-8").replace(b"Dora", "Dóra".encode()),
        adt("A01", "C3", charset="ASCII").replace(b"Dora", "Dóra".encode()),  # AE: not ASCII
        adt("A01", "C4", charset="KLINGON"),  # AE: unknown character set
        adt("A01", "C5").replace(b"Dora", b"D\xffra"),  # AE: not UTF-8
        adt("A01", "E\\T\\1^x~y"),  # control id with escapes, components, repetitions
        adt("A01", "  "),  # blank control id: no dedup key
        adt("A01", "L" * 300),  # long control id: hashed dedup key, truncated ACK id
        b"MSH#*!$%#APP#FAC#CARELOOP#CL#20260302##ADT*A01#X7#P#2.5###AL#NE##8859/1\rPID#1\r",
        b"MSH|^~\\&|A|B|C|D|2026||ADT^A01|Z1|P|2.5\r\rPID|1\r",  # empty segment
        b"MSH|^~\\&|A|B|C|D|2026||ADT^A01|Z2|P|2.5\r  \rPID|1\r",  # blank segment
        b"MSH|^~\\&|A|B|C|D|2026||ADT^A01|Z3|P|2.5\nPID|1\n",  # LF terminators
        b"MSH|^~\\&|A|B|C|D|2026||ADT^A01|Z4|P|2.5\rMSH|^~\\&|A|B|C|D|2026||ADT^A01|Z5|P|2.5\r",
        b"MSH|^~\\&|A|B|C|D|2026||ADT^A01|Z6|P|2.5\rBTS|1\r",
        b"\xef\xbb\xbfMSH|^~\\&|A|B|C|D|2026||ADT^A01|Z7|P|2.5\r",  # BOM
        b"MSH|^~\\&|A|B",
        b"MSH|^~\\&\r",
        b"MSH|^~\\",  # too short
        b"MSHA^~\\&|A\r",  # alphanumeric separator
        b"MSH|^^\\&|A|B|C|D|2026||ADT^A01|Z8|P|2.5\r",  # repeated encoding characters
        b"PID|1||not a message\r",
        # AR/CR: the fast path declines them, the general path builds the ERR
        adt("A01", ""),  # no control id
        adt("A01", "R1", version="9.9"),
        adt("A01", "R2", version="V2.4"),  # accepted, echoed as 2.4
        adt("A01", "R3", version="2.5.1^USA"),
        adt("A01", "R4", ts="20261340"),
        adt("A01", "R5", ts=""),  # required from v2.5
        adt("A01", "R6", ts="", version="2.4"),  # optional before
        adt("A01", "R7", ts="", accept_ack="ER", app_ack="NE"),
        adt("A01", "R8", version="0", accept_ack="NE", app_ack="NE"),
        b"MSH|^~\\&|A|B|C|D|2026|||Z9|P|2.5\rPID|1\r",  # no message type
    ]
    for kw in ({}, {"ack_mode": "original"}, {"ack_mode": "enhanced"}, {"receiving_application": "HUB"}):
        c, general = pair(**kw)
        for body in bodies:
            same(c, general, body)


_FIELD = st.text(alphabet="AB1 ^~\\&|#.-é", max_size=6)
# MSH-7, MSH-9, MSH-10, MSH-12 (fields[4], [6], [7], [9]): valid or not, so that both the
# accepted and the rejected reading are exercised.
_MSH7 = st.sampled_from(["20260302", "202603021015-0500", "", "2026X", "20260230"]) | _FIELD
_MSH9 = st.sampled_from(["ADT^A01", "SIU^S12^SIU_S12", "", "^A01"]) | _FIELD
_MSH10 = st.sampled_from(["C1", "C\\T\\2", " ", ""]) | _FIELD
_MSH12 = st.sampled_from(["2.5.1", "2.3", "V2.4", "9.9", "", "2.5^X"]) | _FIELD


@settings(max_examples=200, deadline=None)
@given(
    st.lists(_FIELD, min_size=1, max_size=20),
    st.tuples(_MSH7, _MSH9, _MSH10, _MSH12),
    st.sampled_from(["\r", "\r\n", "\n"]),
)
def test_any_msh_reads_the_same_on_both_paths(
    fields: list[str], header: tuple[str, str, str, str], term: str
) -> None:
    c, general = pair()
    if len(fields) >= 10:
        fields[4], fields[6], fields[7], fields[9] = header
    body = ("MSH|^~\\&|" + "|".join(fields) + term + "PID|1" + term).encode()
    same(c, general, body)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.builds(lambda i: frame(adt("A01", f"F{i}")), st.integers(0, 9)),
            st.sampled_from([b"\x0b", b"\x1c\r", b"\x1c", b"\r", b"junk", b"\x0b\x1c\r"]),
            st.builds(lambda n: b"\x0b" + b"x" * n + b"\x1c\r", st.integers(1000, 1100)),
        ),
        max_size=8,
    ),
    st.integers(1, 700),
)
def test_frames_are_the_same_whole_or_in_pieces(pieces: list[bytes], step: int) -> None:
    data = b"".join(pieces)
    whole = MLLPFramer(1024)
    per_piece = MLLPFramer(1024)
    chunked = MLLPFramer(1024)
    a = whole.feed(data)
    b = [f for p in pieces for f in per_piece.feed(p)]
    c = [f for i in range(0, len(data), step) for f in chunked.feed(data[i : i + step])]

    def seen(frames: list[Frame]) -> list[tuple[bytes, int, bool]]:
        # Of an oversize frame only its first bytes are kept (to read an MSH for the NACK),
        # as many as had arrived: they depend on where the reads ended.
        return [(b"" if f.oversize else f.content, f.size, f.oversize) for f in frames]

    assert seen(a) == seen(b) == seen(c)
    assert whole.junk_bytes == per_piece.junk_bytes == chunked.junk_bytes


def test_the_fast_path_reads_valid_messages_and_declines_rejected_ones() -> None:
    c, general = pair()
    for body in [
        *fixture_messages(),
        adt("A01", "V1", version="V2.4"),
        adt("A01", "V2", ts="", version="2.4"),
    ]:
        assert c._shapes.accept(general, body, False) is not None
    for body in [adt("A01", ""), adt("A01", "V3", version="9.9"), adt("A01", "V4", ts="2026-03-02")]:
        for _ in range(2):  # the second time from the cached shape
            assert c._shapes.accept(general, body, False) is None
            [raw] = c._accept(body, {}).items
            assert raw.reply is not None and raw.reply.split(b"\r")[1].startswith(b"MSA|AR|")


def test_a_message_with_a_line_that_is_not_a_segment_gets_the_same_ae_on_both_paths() -> None:
    c, general = pair()
    for junk in (b"this line is not a segment\r", b"pid|1\r", b"PI\r", b"P1d|x\r", b"\x0bPID|1\r"):
        body = adt("A01", "G1") + junk
        same(c, general, body)
        [raw] = c._accept(body, {}).items
        assert raw.reply is not None and raw.reply.split(b"\r")[1] == b"MSA|AE|G1"
    # Segments with no fields, Z-segments and a message without its last CR stay on the fast path.
    for ok in (adt("A01", "G2") + b"ZPD|x\r", adt("A01", "G3") + b"PV2\r", adt("A01", "G4").rstrip(b"\r")):
        assert c._shapes.accept(general, ok, False) is not None


def test_a_frame_closed_by_fs_alone_does_not_swallow_the_next_frame() -> None:
    one, two = adt("A01", "O4"), adt("A01", "O5")
    for data in (b"\x0b" + one + b"\x1c" + frame(two), b"\x0b" + one + frame(two)):
        whole, chunked = MLLPFramer(1 << 20), MLLPFramer(1 << 20)
        got = whole.feed(data)
        assert [f for i in range(0, len(data), 7) for f in chunked.feed(data[i : i + 7])] == got
        assert whole.junk_bytes == chunked.junk_bytes
        if data[len(one) + 1 : len(one) + 2] == b"\x1c":  # FS without its CR: the message is whole
            assert [f.content for f in got] == [one, two] and whole.junk_bytes == 0
        else:  # no end at all: a fragment, skipped and counted with its VT
            assert [f.content for f in got] == [two] and whole.junk_bytes == len(one) + 1
