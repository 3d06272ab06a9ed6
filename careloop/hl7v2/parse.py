"""A small, fast HL7 v2 (ER7) tokenizer: bytes -> messages -> segments -> fields.

Why our own: the ingest hot path only needs the MSH header (dedup key, kind, ACK) and the
mapper needs a handful of fields, so splitting strings lazily beats building an object
model (hl7apy) by two orders of magnitude and python-hl7 by a few times (see
``bench/mllp_ingest.py`` for the parse figures).

What it handles:
- segment terminators ``\\r``, ``\\n`` and ``\\r\\n`` (normalized to ``\\r``), a UTF-8 BOM;
- delimiters taken from MSH-1/MSH-2 (any field, component, repetition, escape and
  subcomponent characters, and the v2.7 truncation character);
- fields, repetitions, components, subcomponents, Z-segments (nothing special: any
  three-character segment id is kept);
- escape sequences ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\P\\ \\Xhh..\\``; the others (``\\H\\``,
  ``\\N\\``, ``\\.br\\``, ``\\Cxxyy\\``, ``\\Mxxyyzz\\``, ``\\Zxx\\``) are passed through as written;
- batch files (FHS/BHS ... BTS/FTS) and files of several plain messages, split into messages;
- the character set from MSH-18 (ASCII, 8859/n, UNICODE UTF-8, ...); undecodable bytes raise
  ``CharsetError`` naming the offset and the character set, never the content.

Every error raised here is PHI-free (positions, segment ids, field numbers only).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from careloop.errors import PermanentError

BOM: Final = b"\xef\xbb\xbf"
_TERMINATORS: Final = re.compile(rb"\r\n|\r|\n")
_BATCH_SEGMENTS: Final = frozenset({"FHS", "BHS", "BTS", "FTS"})

# MSH-18 values (HL7 table 0211) -> Python codecs. An empty MSH-18 means ASCII in the
# standard, but senders routinely leave it empty and send UTF-8 or Latin-1; UTF-8 (a
# superset of ASCII) is the lenient, still strict-decoding default.
CHARSETS: Final[dict[str, str]] = {
    "": "utf-8",
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "8859/1": "latin-1",
    "ISO IR100": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "ISO IR192": "utf-8",
    "UNICODE": "utf-8",
    "GB 18030-2000": "gb18030",
    "BIG-5": "big5",
    "KS X 1001": "euc-kr",
}


class HL7FormatError(PermanentError):
    """The bytes are not an HL7 v2 message we can read (no MSH, bad delimiters...)."""

    def __init__(self, message: str, code: int = 100, location: str = "") -> None:
        super().__init__(message)
        self.code = code  # HL7 table 0357
        self.location = location  # e.g. "MSH^1^18"


class CharsetError(HL7FormatError):
    """Bytes that are not valid in the message's declared character set (MSH-18)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=102, location="MSH^1^18")


@dataclass(frozen=True, slots=True)
class Encoding:
    """The message's delimiters (MSH-1 and MSH-2)."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = ""  # v2.7+ fifth encoding character, usually "#"

    @property
    def msh2(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent + self.truncation


DEFAULT_ENCODING: Final = Encoding()


# Valid delimiter sets seen so far, keyed by MSH-1 + MSH-2 (a sender keeps one set, so the
# checks below run once per set, not once per message). Bounded: cleared when full.
_ENCODINGS: Final[dict[str, Encoding]] = {}
_ENCODINGS_MAX: Final = 64


def encoding_from_msh(msh: str) -> Encoding:
    """Read the delimiters from an MSH segment's first characters."""
    if len(msh) < 4 or not msh.startswith("MSH"):
        raise HL7FormatError("the message does not start with an MSH segment", 100, "MSH")
    fs = msh[3]
    end = msh.find(fs, 4)
    chars = msh[4:] if end < 0 else msh[4:end]
    known = _ENCODINGS.get(fs + chars)
    if known is not None:
        return known
    enc = _read_encoding(fs, chars)
    if len(_ENCODINGS) >= _ENCODINGS_MAX:
        _ENCODINGS.clear()
    _ENCODINGS[fs + chars] = enc
    return enc


def _read_encoding(fs: str, chars: str) -> Encoding:
    """Check and build the ``Encoding`` for MSH-1 ``fs`` and MSH-2 ``chars`` (or raise)."""
    if not chars or fs.isalnum() or any(c.isalnum() or c == fs for c in chars):
        raise HL7FormatError("MSH-2 encoding characters are invalid", 102, "MSH^1^2")
    if any(not c.isascii() or not c.isprintable() or c.isspace() for c in fs + chars):
        # A control character or a space cannot be a delimiter (a NUL from a broken sender).
        raise HL7FormatError("MSH-1/MSH-2 delimiters must be printable ASCII", 102, "MSH^1^2")
    if len(set(chars[:4])) != len(chars[:4]):
        raise HL7FormatError("MSH-2 encoding characters repeat", 102, "MSH^1^2")
    d = DEFAULT_ENCODING
    return Encoding(
        field=fs,
        component=chars[0] if len(chars) > 0 else d.component,
        repetition=chars[1] if len(chars) > 1 else d.repetition,
        escape=chars[2] if len(chars) > 2 else d.escape,
        subcomponent=chars[3] if len(chars) > 3 else d.subcomponent,
        truncation=chars[4] if len(chars) > 4 else "",
    )


# --------------------------------------------------------------------------- escapes


def unescape(value: str, enc: Encoding = DEFAULT_ENCODING, charset: str = "utf-8") -> str:
    """Decode HL7 escape sequences in one leaf value (after splitting on delimiters)."""
    esc = enc.escape
    if not esc or esc not in value:
        return value
    out: list[str] = []
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c != esc:
            j = value.find(esc, i)
            if j < 0:
                out.append(value[i:])
                break
            out.append(value[i:j])
            i = j
            continue
        end = value.find(esc, i + 1)
        if end < 0:  # unterminated: keep the text as written
            out.append(value[i:])
            break
        body = value[i + 1 : end]
        if body == "F":
            out.append(enc.field)
        elif body == "S":
            out.append(enc.component)
        elif body == "T":
            out.append(enc.subcomponent)
        elif body == "R":
            out.append(enc.repetition)
        elif body == "E":
            out.append(esc)
        elif body == "P" and enc.truncation:
            out.append(enc.truncation)
        elif body[:1] == "X" and len(body) > 1 and len(body) % 2 == 1 and _is_hex(body[1:]):
            try:
                out.append(bytes.fromhex(body[1:]).decode(charset))
            except (UnicodeDecodeError, LookupError):
                out.append(bytes.fromhex(body[1:]).decode("latin-1"))
        else:  # formatting (\H\ \N\ \.br\ ...) and charset escapes pass through
            out.append(value[i : end + 1])
        i = end + 1
    return "".join(out)


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in s)


def escape(value: str, enc: Encoding = DEFAULT_ENCODING) -> str:
    """Escape delimiter characters in text we put into a message (ACK ERR text)."""
    value = value.replace(enc.escape, f"{enc.escape}E{enc.escape}")
    for ch, code in (
        (enc.field, "F"),
        (enc.component, "S"),
        (enc.subcomponent, "T"),
        (enc.repetition, "R"),
    ):
        value = value.replace(ch, f"{enc.escape}{code}{enc.escape}")
    if enc.truncation:
        value = value.replace(enc.truncation, f"{enc.escape}P{enc.escape}")
    return value.replace("\r", " ").replace("\n", " ")


# --------------------------------------------------------------------------- tokens


class Segment:
    """One segment, split into fields lazily; ``field(n)`` is SEG-n (MSH-1 is the separator)."""

    __slots__ = ("charset", "enc", "fields", "name")

    def __init__(self, text: str, enc: Encoding, charset: str = "utf-8") -> None:
        self.fields = text.split(enc.field)
        self.name = self.fields[0]
        if self.name == "MSH":
            # MSH-1 is the field separator itself, so MSH-n sits at index n.
            self.fields.insert(1, enc.field)
        self.enc = enc
        self.charset = charset

    def __len__(self) -> int:
        return len(self.fields) - 1

    def raw(self, n: int) -> str:
        """The field exactly as written (escapes and delimiters kept); "" if absent."""
        f = self.fields
        return f[n] if 0 < n < len(f) else ""

    def repetitions(self, n: int) -> list[str]:
        """The raw repetitions of field n (MSH-2 is never split)."""
        f = self.fields
        raw = f[n] if 0 < n < len(f) else ""
        if not raw:
            return []
        if self.name == "MSH" and n in (1, 2):
            return [raw]
        return raw.split(self.enc.repetition)

    def components(self, n: int, rep: int = 0) -> list[str]:
        """Raw components of repetition ``rep`` of field n."""
        reps = self.repetitions(n)
        if rep >= len(reps):
            return []
        return reps[rep].split(self.enc.component)

    def get(self, n: int, comp: int = 1, sub: int = 1, rep: int = 0) -> str:
        """The unescaped value at SEG-n.comp.sub (1-based), repetition ``rep`` (0-based)."""
        if self.name == "MSH" and n in (1, 2):
            return self.raw(n)
        if rep == 0:  # raw_rep(n, 0), inlined: the mapper's hot path
            f = self.fields
            raw = f[n].split(self.enc.repetition, 1)[0] if 0 < n < len(f) else ""
        else:
            raw = self.raw_rep(n, rep)
        return leaf(raw, comp, sub, self.enc, self.charset)

    def raw_rep(self, n: int, rep: int = 0) -> str:
        """Repetition ``rep`` (0-based) of field n as written; "" if absent."""
        if rep == 0 and not (self.name == "MSH" and n in (1, 2)):
            f = self.fields
            return f[n].split(self.enc.repetition, 1)[0] if 0 < n < len(f) else ""
        reps = self.repetitions(n)
        return reps[rep] if rep < len(reps) else ""


def leaf(rep: str, comp: int, sub: int, enc: Encoding, charset: str = "utf-8") -> str:
    """One component/subcomponent of a raw repetition, unescaped."""
    if not rep:
        return ""
    comps = rep.split(enc.component)
    if comp > len(comps):
        return ""
    c = comps[comp - 1]
    if sub != 1 or enc.subcomponent in c:
        subs = c.split(enc.subcomponent)
        c = subs[sub - 1] if sub <= len(subs) else ""
    return unescape(c, enc, charset) if enc.escape in c else c


def split_components(rep: str, enc: Encoding, charset: str = "utf-8") -> list[str]:
    """Every component of a raw repetition, unescaped (subcomponents kept joined)."""
    return [unescape(c, enc, charset) for c in rep.split(enc.component)] if rep else []


class Message:
    """A parsed message: its segments in order and its encoding."""

    __slots__ = ("charset", "enc", "segments")

    def __init__(self, segments: list[Segment], enc: Encoding, charset: str) -> None:
        self.segments, self.enc, self.charset = segments, enc, charset

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    def segment(self, name: str) -> Segment | None:
        for s in self.segments:
            if s.name == name:
                return s
        return None

    def all(self, name: str) -> list[Segment]:
        return [s for s in self.segments if s.name == name]

    @property
    def message_type(self) -> tuple[str, str]:
        """(MSH-9.1, MSH-9.2), e.g. ("SIU", "S12")."""
        return self.msh.get(9, 1).strip().upper(), self.msh.get(9, 2).strip().upper()

    @property
    def control_id(self) -> str:
        return self.msh.get(10)

    @property
    def version(self) -> str:
        return self.msh.get(12, 1)


def parse_text(text: str, charset: str = "utf-8") -> Message:
    """Parse one message already decoded to text (any segment terminator)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = [s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s.strip()]
    if not lines or not lines[0].startswith("MSH"):
        raise HL7FormatError("the message does not start with an MSH segment", 100, "MSH")
    enc = encoding_from_msh(lines[0])
    segs = [Segment(line, enc, charset) for line in lines]
    for i, s in enumerate(segs):
        if not _valid_segment_id(s.name):
            raise segment_id_error(i + 1)
    return Message(segs, enc, charset)


def segment_id_error(position: int) -> HL7FormatError:
    # No ERL location: its first component is a segment id, and this one is not readable.
    return HL7FormatError(f"segment {position} has an invalid segment id", 100)


def check_segments(text: str, enc: Encoding) -> None:
    """Raise the ``HL7FormatError`` that ``parse_text`` would raise for a segment id that
    is not three upper-case letters or digits (a stray line, a lost VT/FS, ...), so that
    the ingest path can answer it with an error ACK instead of AA."""
    position = 0
    for line in text.replace("\r\n", "\r").replace("\n", "\r").split("\r"):
        if not line.strip():
            continue
        position += 1
        if not _valid_segment_id(line.split(enc.field, 1)[0]):
            raise segment_id_error(position)


_SEGMENT_ID: Final = re.compile(r"[A-Z][A-Z0-9]{2}")


def _valid_segment_id(name: str) -> bool:
    # Three upper-case letters or digits, starting with a letter (Z-segments included).
    return _SEGMENT_ID.fullmatch(name) is not None


def parse_bytes(data: bytes) -> Message:
    """Decode (BOM, MSH-18) and parse one message."""
    text, charset = decode(data)
    return parse_text(text, charset)


# --------------------------------------------------------------------------- header values

# HL7 table 0104, the version ids careloop reads (MSH-12.1).
SUPPORTED_VERSIONS: Final = frozenset(
    {"2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2"}
)

# DTM: YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]. The same reading as the mapper's
# ``parse_dtm`` (mapping/hl7v2_fhir.py), so a value accepted here is one it can read.
_DTM: Final = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?\s*([+-]\d{4})?$")


def normalize_version(value: str) -> str | None:
    """MSH-12.1 as a supported version id, or None. Known vendor spellings are read:
    surrounding spaces, a leading ``V`` ("V2.4") and trailing ``.0`` ("2.5.0")."""
    v = value.strip().upper()
    if v.startswith("V"):
        v = v[1:].lstrip()
    while v not in SUPPORTED_VERSIONS and v.endswith(".0"):
        v = v[:-2]
    return v if v in SUPPORTED_VERSIONS else None


def is_dtm(value: str) -> bool:
    """Whether ``value`` is a valid HL7 DTM (a real calendar date and time, an offset
    within +/-14:59)."""
    m = _DTM.match(value.strip())
    if not m:
        return False
    y, mo, d, h, mi, s, _, off = m.groups()
    try:
        datetime(int(y), int(mo or 1), int(d or 1), int(h or 0), int(mi or 0), int(s or 0))
    except ValueError:
        return False
    return not off or (int(off[1:3]) <= 14 and int(off[3:5]) <= 59)


# --------------------------------------------------------------------------- bytes level


@dataclass(frozen=True, slots=True)
class Header:
    """What the ingest path needs from MSH, read without decoding the whole message.

    ``fields[n]`` is MSH-n as written (MSH-1 at index 1). Delimiters are ASCII, so the
    header is read as Latin-1, which never fails; values that matter here (ids, codes)
    are ASCII in practice.
    """

    enc: Encoding
    fields: tuple[str, ...]

    def raw(self, n: int) -> str:
        return self.fields[n] if 0 < n < len(self.fields) else ""

    def get(self, n: int, comp: int = 1) -> str:
        if n in (1, 2):
            return self.raw(n)
        rep = self.raw(n).split(self.enc.repetition, 1)[0]
        return leaf(rep, comp, 1, self.enc, "latin-1")

    @property
    def message_type(self) -> tuple[str, str]:
        return self.get(9, 1).strip().upper(), self.get(9, 2).strip().upper()

    @property
    def control_id(self) -> str:
        # As written, escapes and all: MSA-2 must echo MSH-10 exactly, and an unescaped
        # "\F\" or "\T\" would put a delimiter into the ACK.
        return self.raw(10)

    @property
    def version(self) -> str:
        return self.get(12)

    @property
    def charset_name(self) -> str:
        return self.get(18).strip().upper()


def read_header(message: bytes) -> Header:
    """The MSH of a message that starts at ``message[0]`` (after BOM/batch removal)."""
    if not message.startswith(b"MSH") or len(message) < 8:
        raise HL7FormatError("the message does not start with an MSH segment", 100, "MSH")
    m = _TERMINATORS.search(message)
    line = (message[: m.start()] if m else message).decode("latin-1")
    enc = encoding_from_msh(line)
    parts = line.split(enc.field)
    parts.insert(1, enc.field)
    return Header(enc, tuple(parts))


def codec_for(charset_name: str) -> str:
    """The Python codec for an MSH-18 value (first repetition), or CharsetError."""
    name = " ".join(charset_name.strip().upper().split())
    codec = CHARSETS.get(name)
    if codec is None:
        raise CharsetError("MSH-18 names a character set that is not supported")
    return codec


def decode(message: bytes, header: Header | None = None) -> tuple[str, str]:
    """Decode one message's bytes per its MSH-18; returns (text, codec)."""
    if message.startswith(BOM):
        message = message[3:]
    header = header or read_header(message)
    codec = codec_for(header.charset_name)
    try:
        return message.decode(codec), codec
    except UnicodeDecodeError as exc:
        label = header.charset_name or "UTF-8 (MSH-18 empty)"
        raise CharsetError(
            f"byte {exc.start} of the message is not valid {label} (MSH-18 character set)"
        ) from None


def split_messages(data: bytes) -> list[bytes]:
    """Split a payload (one message, a batch FHS/BHS..BTS/FTS, or messages back to back)
    into messages with CR terminators. A leading BOM is removed. Text before the first MSH
    that is not a batch header is an error."""
    if data.startswith(BOM):
        data = data[3:]
    out: list[list[bytes]] = []
    for seg in _TERMINATORS.split(data):
        if not seg.strip():
            continue
        head = seg[:3]
        if head == b"MSH":
            out.append([seg])
        elif head.decode("latin-1") in _BATCH_SEGMENTS and not seg[3:4].isalnum():
            continue
        elif out:
            out[-1].append(seg)
        else:
            raise HL7FormatError("the payload does not start with an MSH or batch header segment", 100, "MSH")
    if not out:
        raise HL7FormatError("the payload holds no MSH segment", 100, "MSH")
    return [b"\r".join(segs) + b"\r" for segs in out]


def batch_header(data: bytes) -> bytes | None:
    """The payload's BHS segment (a batch's header), or None."""
    for seg in _TERMINATORS.split(data[3:] if data.startswith(BOM) else data):
        if seg[:3] == b"BHS" and len(seg) > 4:
            return seg
        if seg[:3] == b"MSH":
            return None
    return None


def is_batch(data: bytes) -> bool:
    if data.startswith(BOM):
        data = data[3:]
    return data[:3] in (b"FHS", b"BHS")


def iter_messages(data: bytes) -> Iterator[Message]:
    for chunk in split_messages(data):
        yield parse_bytes(chunk)
