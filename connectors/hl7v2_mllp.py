"""HL7 v2 over MLLP (release 2 framing: VT ... FS CR), TLS and mutual TLS optional.

Commit ACK: a message is acknowledged AA (or CA in enhanced mode) only after the sink
committed it; if the store fails the sender gets AE (CE), never AA. The ACK is computed
before the commit and stored with the message, so a duplicate (same MSH-3, MSH-4 and
MSH-10) is not stored again and gets the very same ACK bytes back.

Group commit: messages that arrive from any connection while a commit is in flight are
coalesced into the next single ``put``, so durability costs one fsync per group, not per
message. A sink with ``put_sync`` (``careloop.ingest.IngestSink``) is written by one
dedicated writer thread; any other sink through its ``async put``. Each connection keeps
its own order: its frames are acknowledged in the order they arrived.

The hot path is lean on purpose (an MLLP sender waits for each ACK, so every microsecond
of the listener is latency): an ``asyncio.Protocol`` scans its buffer for VT/FS; a frame
that is one plain message (the usual case) is read through a cache of its sender's MSH
shape (``_MSHCache``: encoding, kind, ACK template), everything else goes through
``HL7Acceptor`` (which the fast path matches byte for byte apart from the ACK's own
unique control id; tests check it), and so does any message that gets an AE or AR.

Framing faults never desynchronise the stream: bytes before a VT are skipped and
counted; a frame larger than ``max_message_bytes`` is read to its FS CR and discarded,
and answered with an AR NACK; an unreadable message (no MSH) gets an AR NACK and is not
stored; an idle connection is closed after ``idle_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import re
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from careloop.clock import Clock, SystemClock
from careloop.config import Port, TimeZoneName
from careloop.hl7v2.ack import (
    AckError,
    AckStyle,
    AckTemplate,
    Outcome,
    ack_template,
    build_ack,
    hl7_timestamp,
    message_error,
    next_ack_id,
    shape_error,
    should_send,
)
from careloop.hl7v2.parse import CharsetError, Encoding, Header, HL7FormatError, codec_for, read_header
from careloop.model import PutResult, RawIn
from careloop.plugins import PluginConfig
from connectors.base import Health, RawSink
from connectors.hl7v2_accept import CONTENT_TYPE, Accepted, HL7Acceptor, dedup_key

log = logging.getLogger("careloop.connectors.hl7v2_mllp")

VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"
FS_CR = FS + CR
_HEAD_KEEP = 4096  # bytes of an oversize frame kept to read its MSH for the NACK


class TLSConfig(BaseModel):
    """Server certificate and key; ``ca`` enables client certificate checks (mutual TLS)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    cert: Path
    key: Path
    key_password: SecretStr | None = None
    ca: Path | None = Field(None, description="CA bundle that client certificates must chain to")
    require_client_cert: bool = Field(True, description="with ca: reject clients without a certificate")


class MLLPConfig(PluginConfig):
    """One MLLP listener. Several listeners are several connector entries."""

    plugin: str = "hl7v2_mllp"
    host: str = "127.0.0.1"
    port: Port = 2575
    max_message_bytes: int = Field(1024 * 1024, ge=1024)
    idle_timeout_s: float = Field(300.0, gt=0)
    ack_mode: Literal["commit", "original", "enhanced"] = Field(
        "commit",
        description="commit: ACK after the commit in the mode the message asks for (MSH-15/16 empty ->"
        " original AA/AE/AR, else enhanced CA/CE/CR); original/enhanced force that mode",
    )
    tls: TLSConfig | None = None
    strict: bool = Field(False, description="validate message structure with hl7apy (slow); errors -> AE")
    timezone: TimeZoneName | None = Field(
        None, description="zone for timestamps without offset; default: site"
    )
    receiving_application: str = "CARELOOP"
    max_connections: int = Field(512, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _listen(cls, data: Any) -> Any:
        # Accept the example config's shorthand ``listen: "host:port"``.
        if isinstance(data, dict) and "listen" in data:
            data = dict(data)
            host, _, port = str(data.pop("listen")).rpartition(":")
            data.setdefault("host", host or "127.0.0.1")
            data.setdefault("port", int(port) if port.isdigit() else port)
        return data

    @property
    def ack_style(self) -> AckStyle:
        return "auto" if self.ack_mode == "commit" else self.ack_mode


# --------------------------------------------------------------------------- framing


class Frame(NamedTuple):
    content: bytes  # the message bytes, or the first bytes of an oversize frame
    size: int
    oversize: bool = False


@dataclass
class MLLPFramer:
    """Incremental MLLP decoder (pure): feed bytes, get complete frames."""

    max_bytes: int
    junk_bytes: int = 0
    _buf: bytearray = field(default_factory=bytearray)
    _in_frame: bool = False
    _oversize: bool = False
    _head: bytes = b""
    _dropped: int = 0

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf
        if not buf and not self._in_frame and data[:1] == VT:
            # The usual read: exactly one whole frame, nothing left over.
            j = data.find(FS_CR, 1)
            if j > 0 and j == len(data) - 2 and j - 1 <= self.max_bytes and data.find(VT, 1, j) < 0:
                return [Frame(data[1:j], j - 1)]
        buf += data
        out: list[Frame] = []
        while True:
            if not self._in_frame:
                i = buf.find(VT)
                if i < 0:
                    self.junk_bytes += len(buf)
                    buf.clear()
                    return out
                self.junk_bytes += i
                del buf[: i + 1]
                self._in_frame, self._oversize, self._head, self._dropped = True, False, b"", 0
            j = buf.find(FS_CR)
            k = buf.find(VT, 0, j if j >= 0 else len(buf))
            if k >= 0:
                # A new frame starts before this one ended. A frame closed by FS alone (its
                # CR lost) is whole and is read; anything else is an unterminated fragment,
                # skipped and counted with its VT. Either way the next frame is not swallowed.
                size = self._dropped + k
                if k > 0 and buf[k - 1] == FS[0]:
                    size -= 1
                    if self._oversize or size > self.max_bytes:
                        out.append(Frame(self._head or bytes(buf[:_HEAD_KEEP]), size, oversize=True))
                    else:
                        out.append(Frame(bytes(buf[: k - 1]), size))
                else:
                    self.junk_bytes += size + 1
                del buf[:k]
                self._in_frame = False
                continue
            if j < 0:
                if self._oversize or len(buf) > self.max_bytes + 1:
                    if not self._oversize:
                        self._head, self._oversize = bytes(buf[:_HEAD_KEEP]), True
                    keep = 1 if buf.endswith(FS) else 0  # a FS whose CR is still on the way
                    self._dropped += len(buf) - keep
                    del buf[: len(buf) - keep]
                return out
            size = self._dropped + j
            if self._oversize or size > self.max_bytes:
                out.append(Frame(self._head or bytes(buf[:_HEAD_KEEP]), size, oversize=True))
            else:
                out.append(Frame(bytes(buf[:j]), size))
            del buf[: j + 2]
            self._in_frame = False

    @property
    def pending(self) -> int:
        return len(self._buf) + self._dropped


def frame(payload: bytes) -> bytes:
    return VT + payload + FS_CR


# --------------------------------------------------------------------------- group commit

Done = Callable[[list[PutResult] | None, BaseException | None], None]
_Waiter = tuple[list[RawIn], Done, object]  # items, callback, source (a connection)


@runtime_checkable
class SyncRawSink(Protocol):
    """A sink that can also store from a plain thread (``IngestSink``): same contract as
    ``RawSink.put``, committed when it returns."""

    def put_sync(self, items: Sequence[RawIn]) -> list[PutResult]: ...


class ThreadCommitter:
    """One writer thread: takes every submission queued since its last commit and stores
    them with one ``put_sync`` (one transaction, one fsync); results go back to the event
    loop with one ``call_soon_threadsafe`` per commit.

    MLLP senders wait for each ACK, so the connections served by one commit send their next
    message about one round trip after it. When some of them have not sent yet, the writer
    waits for them a little (at most half a commit's time, ``max_wait_s`` at most) rather
    than commit without them and make them wait a whole commit: PostgreSQL's commit_delay
    with commit_siblings, where the siblings are known. A lone connection never waits."""

    def __init__(
        self,
        sink: SyncRawSink,
        loop: asyncio.AbstractEventLoop,
        max_batch: int = 1000,
        max_wait_s: float = 0.002,
    ) -> None:
        self._put, self._loop, self._max = sink.put_sync, loop, max_batch
        self._max_wait = max_wait_s
        self._commit_s = 0.0  # moving average of a commit's duration
        self._queue: queue.SimpleQueue[_Waiter | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mllp-writer", daemon=True)
        self._thread.start()
        self.commits = 0

    def submit(self, items: list[RawIn], done: Done, source: object = None) -> None:
        self._queue.put((items, done, source))

    async def close(self) -> None:
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join, 10)

    def _run(self) -> None:
        q = self._queue
        previous: set[object] = set()  # the sources served by the last commit
        while True:
            first = q.get()
            if first is None:
                return
            batch, n, last = [first], len(first[0]), False
            sources = {first[2]}
            deadline = 0.0
            while n < self._max:
                try:
                    nxt = q.get_nowait()
                except queue.Empty:
                    if previous <= sources:
                        break
                    now = time.monotonic()
                    if not deadline:
                        deadline = now + min(self._max_wait, self._commit_s / 2)
                    if now >= deadline:
                        break
                    try:
                        nxt = q.get(timeout=deadline - now)
                    except queue.Empty:
                        break
                if nxt is None:
                    last = True
                    break
                batch.append(nxt)
                n += len(nxt[0])
                sources.add(nxt[2])
            previous = sources
            started = time.monotonic()
            self._commit(batch)
            self._commit_s += (time.monotonic() - started - self._commit_s) / 8
            if last:
                return

    def _commit(self, batch: list[_Waiter]) -> None:
        flat = batch[0][0] if len(batch) == 1 else [i for items, _, _ in batch for i in items]
        try:
            results = self._put(flat)
        except Exception as exc:  # the store failed: every waiter learns it, none gets AA
            if len(batch) > 1:
                # Retry one by one so that one poisoned message does not fail its neighbours.
                for one in batch:
                    self._commit([one])
                return
            self._post(batch, None, exc)
            return
        self.commits += 1
        self._post(batch, results, None)

    def _post(self, batch: list[_Waiter], results: list[PutResult] | None, exc: BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(_deliver, batch, results, exc)


class GroupCommitter:
    """Coalesces concurrent submissions into one ``await sink.put`` per commit (for sinks
    without ``put_sync``)."""

    def __init__(self, sink: RawSink, max_batch: int = 1000) -> None:
        self._sink, self._max = sink, max_batch
        self._waiting: deque[_Waiter] = deque()
        self._task: asyncio.Task[None] | None = None
        self.commits = 0

    def submit(self, items: list[RawIn], done: Done, source: object = None) -> None:
        self._waiting.append((items, done, source))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def close(self) -> None:
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._task), 10)

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch: list[_Waiter] = []
                n = 0
                while self._waiting and (not batch or n + len(self._waiting[0][0]) <= self._max):
                    one = self._waiting.popleft()
                    batch.append(one)
                    n += len(one[0])
                await self._commit(batch)
        finally:
            self._task = None

    async def _commit(self, batch: list[_Waiter]) -> None:
        flat = [i for items, _, _ in batch for i in items]
        try:
            results = await self._sink.put(flat)
        except Exception as exc:
            if len(batch) > 1:
                for one in batch:
                    await self._commit([one])
                return
            _deliver(batch, None, exc)
            return
        self.commits += 1
        _deliver(batch, results, None)


def _deliver(batch: list[_Waiter], results: list[PutResult] | None, exc: BaseException | None) -> None:
    """Hand each waiting connection its results. One connection's failure in its callback
    must not leave the others of the same commit waiting for ACKs forever."""
    pos = 0
    for items, done, _ in batch:
        part = None if results is None else results[pos : pos + len(items)]
        pos += len(items)
        try:
            done(part, None if results is not None else exc)
        except Exception as err:  # that connection is broken; the rest still get their ACKs
            log.error("MLLP: delivering a commit's result to a connection failed: %s", type(err).__name__)


# --------------------------------------------------------------------------- fast accept

# A frame is read by the fast path only if it is one plain message: it starts with MSH,
# has CR terminators only, no empty or blank segment, no second MSH and no batch segment.
# Anything else goes to HL7Acceptor (split_messages), which the fast path must equal.
_NOT_PLAIN = re.compile(rb"\r(?:[\r \t\x0b\x0c]|MSH|[BF][HT]S)")
_CACHE_SIZE = 512


@dataclass(frozen=True, slots=True)
class _Shape:
    """What a sender's MSH decides, apart from MSH-7 (time) and MSH-10 (control id)."""

    enc: Encoding
    kind: str
    codec: str | None  # None: MSH-18 names a character set we do not support (slow path)
    ack: AckTemplate
    ok: bool  # no ``shape_error`` (MSH-9, MSH-12): False sends every message to the slow path
    # A segment that does not start with a valid id (three upper-case letters or digits,
    # then the field separator or the segment's end): the slow path answers it AE.
    bad_segment: re.Pattern[bytes]


class _MSHCache:
    """MSH shapes seen on this listener, keyed by the MSH line without MSH-7 and MSH-10."""

    def __init__(self, style: AckStyle, receiver: str) -> None:
        self.style, self.receiver = style, receiver
        self.shapes: dict[tuple[str, ...], _Shape] = {}
        self._ts_key: tuple[datetime, Any] | None = None
        self._ts = ""

    def timestamp(self, now: datetime) -> str:
        key = (now.replace(microsecond=0), now.tzinfo)
        if key != self._ts_key:
            self._ts_key, self._ts = key, hl7_timestamp(now)
        return self._ts

    def accept(self, acceptor: HL7Acceptor, content: bytes, strict: bool) -> Accepted | None:
        """The fast path's ``Accepted`` for one frame, or None when the frame is not a plain
        message (the caller then uses ``acceptor.accept``)."""
        if strict or content[:3] != b"MSH" or b"\n" in content or _NOT_PLAIN.search(content):
            return None
        end = content.find(b"\r")
        line = (content if end < 0 else content[:end]).decode("latin-1")
        if len(line) < 8:
            return None
        fs = line[3]
        parts = line.split(fs)
        parts.insert(1, fs)
        key = tuple(parts[1:7] + parts[8:10] + parts[11:])
        shape = self.shapes.get(key)
        if shape is None:
            try:
                hdr = read_header(content)
            except HL7FormatError:
                return None
            shape = self._shape(hdr)
            if len(self.shapes) >= _CACHE_SIZE:
                self.shapes.clear()
            self.shapes[key] = shape
        else:
            hdr = Header(shape.enc, tuple(parts))
        if shape.codec is None or not shape.ok or message_error(hdr) is not None:
            return None  # the slow path builds the AE/AR with its ERR
        try:
            content.decode(shape.codec)
        except UnicodeDecodeError:
            return None  # the slow path builds the AE with the offending offset
        if shape.bad_segment.search(content) is not None:
            return None  # a stray line, a lost VT/FS: the slow path answers AE (parse.check_segments)
        now = acceptor.clock.now()
        reply = shape.ack.render(self.timestamp(now), hdr.control_id) if shape.ack.send else None
        msg = content if content.endswith(b"\r") else content + b"\r"
        raw = RawIn(
            acceptor.id, shape.kind, msg, CONTENT_TYPE, dedup_key(hdr), {"timezone": acceptor.timezone}, reply
        )
        return Accepted([raw], headers=[hdr])

    def _shape(self, hdr: Header) -> _Shape:
        mtype, trigger = hdr.message_type
        kind = f"hl7v2:{mtype or 'UNKNOWN'}^{trigger}" if trigger else f"hl7v2:{mtype or 'UNKNOWN'}"
        try:
            codec: str | None = codec_for(hdr.charset_name)
        except CharsetError:
            codec = None
        ack = ack_template(hdr, Outcome.OK, self.style, self.receiver)
        fs = re.escape(hdr.enc.field.encode("latin-1"))
        bad = re.compile(rb"\r(?!\Z|[A-Z][A-Z0-9]{2}(?:" + fs + rb"|\r|\Z))")
        return _Shape(hdr.enc, kind[:64], codec, ack, shape_error(hdr) is None, bad)


# --------------------------------------------------------------------------- connector


@dataclass
class _Stats:
    connections: int = 0
    open_connections: int = 0
    frames: int = 0
    stored: int = 0
    duplicates: int = 0
    nacks: int = 0
    oversize: int = 0
    idle_closed: int = 0
    junk_bytes: int = 0
    store_failures: int = 0
    refused: int = 0


class MLLPConnector:
    """HL7 v2 MLLP listener with commit ACKs, group commit, duplicates answered from the store."""

    name: ClassVar[str] = "hl7v2_mllp"
    Config: ClassVar[type[MLLPConfig]] = MLLPConfig

    def __init__(
        self, id: str, config: MLLPConfig, clock: Clock | None = None, app_config: Any = None
    ) -> None:
        self.id, self.config = id, config
        self.clock: Clock = clock or SystemClock()
        site_tz = getattr(getattr(app_config, "site", None), "timezone", None)
        self.timezone: str = config.timezone or site_tz or "UTC"
        self.stats = _Stats()
        self.port: int = config.port
        self._server: asyncio.Server | None = None
        self._committer: ThreadCommitter | GroupCommitter | None = None
        self._conns: set[_Connection] = set()
        self._acceptor = HL7Acceptor(
            id, self.clock, self.timezone, config.ack_style, config.strict, config.receiving_application
        )
        self._shapes = _MSHCache(config.ack_style, config.receiving_application)

    # ------------------------------------------------------------------ pure part

    def accept(self, body: bytes, headers: Mapping[str, str]) -> list[RawIn]:
        """One payload (a message, several, or a batch) -> raw messages with their ACKs.
        Raises ``HL7FormatError`` when the payload holds no readable MSH."""
        return self._accept(body, headers).items

    def _accept(self, body: bytes, headers: Mapping[str, str]) -> Accepted:
        if not headers:
            fast = self._shapes.accept(self._acceptor, body, self.config.strict)
            if fast is not None:
                return fast
        return self._acceptor.accept(body, headers)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, sink: RawSink) -> None:
        loop = asyncio.get_running_loop()
        self._committer = (
            ThreadCommitter(sink, loop) if isinstance(sink, SyncRawSink) else GroupCommitter(sink)
        )
        try:
            self._server = await loop.create_server(
                lambda: _Connection(self),
                self.config.host,
                self.config.port,
                ssl=self._ssl_context(),
                backlog=self.config.max_connections,
            )
        except BaseException:
            await self._committer.close()  # no writer thread left behind
            self._committer = None
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        log.info(
            "connector %s: MLLP listening on %s:%s (tls=%s)",
            self.id,
            self.config.host,
            self.port,
            self.config.tls is not None,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.abort()
        if self._committer is not None:
            await self._committer.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    def health(self) -> Health:
        s = self.stats
        ok = self._server is not None and self._server.is_serving()
        return Health(
            ok,
            f"port={self.port} open={s.open_connections} stored={s.stored} dup={s.duplicates} "
            f"nacks={s.nacks} oversize={s.oversize} junk_bytes={s.junk_bytes} "
            f"store_failures={s.store_failures}",
        )

    def router(self) -> None:
        return None

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self.config.tls
        if tls is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        pw = tls.key_password.get_secret_value() if tls.key_password else None
        ctx.load_cert_chain(str(tls.cert), str(tls.key), password=pw)
        if tls.ca is not None:
            ctx.load_verify_locations(cafile=str(tls.ca))
            ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
        return ctx

    # ------------------------------------------------------------------ frames

    def _unit(self, frames: list[Frame]) -> _Unit:
        """Frames of one read, in order -> one unit: what to store, then its replies."""
        self.stats.frames += len(frames)
        if len(frames) == 1:
            accepted = [self._accept_frame(frames[0])]
            items = accepted[0].items
        else:
            accepted = [self._accept_frame(fr) for fr in frames]
            items = [i for a in accepted for i in a.items]
        return _Unit(accepted, items)

    def _replies(self, unit: _Unit, results: list[PutResult] | None) -> list[bytes]:
        """A unit's replies once its items are stored (``results``) or failed (None)."""
        stats = self.stats
        if (
            results is not None
            and len(results) == 1
            and len(unit.accepted) == 1
            and not unit.accepted[0].batch
        ):
            res = results[0]  # one plain message: the usual case
            if res.duplicate:
                stats.duplicates += 1
            else:
                stats.stored += 1
            return [res.reply] if res.reply is not None else []
        replies: list[bytes] = []
        pos = 0
        now = self.clock.now()
        style, receiver = self.config.ack_style, self.config.receiving_application
        for acc in unit.accepted:
            if acc.nack is not None:
                replies.append(acc.nack)
                continue
            parts: list[bytes] = []
            for hdr in acc.headers:
                if results is None:
                    err = AckError(207, "the message could not be stored; send it again")
                    if should_send(hdr, Outcome.ERROR, style):
                        parts.append(build_ack(hdr, Outcome.ERROR, now, err, style, receiver))
                    stats.nacks += 1
                    continue
                res = results[pos]
                pos += 1
                if res.duplicate:
                    stats.duplicates += 1
                else:
                    stats.stored += 1
                if res.reply is not None:
                    parts.append(res.reply)
            if parts:
                replies.append(_batch_ack(parts, acc.batch_header, now) if acc.batch else parts[0])
        return replies

    def _accept_frame(self, fr: Frame) -> Accepted:
        if not fr.oversize:
            try:
                return self._accept(fr.content, {})
            except HL7FormatError as exc:
                self.stats.nacks += 1
                hdr = _try_header(fr.content)
                err = AckError(exc.code, str(exc), exc.location)
        else:
            self.stats.oversize += 1
            self.stats.nacks += 1
            hdr = _try_header(fr.content)
            err = AckError(
                207, f"the message is {fr.size} bytes; the limit is {self.config.max_message_bytes}"
            )
        nack = build_ack(
            hdr,
            Outcome.REJECT,
            self.clock.now(),
            err,
            self.config.ack_style,
            self.config.receiving_application,
        )
        return Accepted([], nack=nack)


class _Unit:
    """The frames of one read: their accepted messages, and their replies once stored."""

    __slots__ = ("accepted", "conn", "items", "replies")

    def __init__(self, accepted: list[Accepted], items: list[RawIn]) -> None:
        self.accepted, self.items = accepted, items
        self.replies: list[bytes] | None = None
        self.conn: _Connection | None = None

    def stored(self, results: list[PutResult] | None, exc: BaseException | None) -> None:
        assert self.conn is not None
        self.conn.stored(self, results, exc)


_MAX_UNITS = 64  # units in flight per connection before it stops reading (a pipelining sender)


class _Connection(asyncio.Protocol):
    """One MLLP connection: frames in, ACKs out in arrival order, after their commit."""

    def __init__(self, owner: MLLPConnector) -> None:
        self.owner = owner
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.framer = MLLPFramer(owner.config.max_message_bytes)
        self.units: deque[_Unit] = deque()
        self.open = False
        self.eof = False
        self.write_paused = False
        self.read_paused = False
        self.last = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        owner = self.owner
        if owner.stats.open_connections >= owner.config.max_connections:
            owner.stats.refused += 1  # over the limit: close at once rather than starve the others
            transport.close()
            return
        self.open = True
        owner._conns.add(self)
        owner.stats.connections += 1
        owner.stats.open_connections += 1
        self.last = self.loop.time()
        self.timer = self.loop.call_at(self.last + owner.config.idle_timeout_s, self._idle)

    def data_received(self, data: bytes) -> None:
        if not self.open:
            return
        self.last = self.loop.time()
        owner = self.owner
        framer = self.framer
        junk = framer.junk_bytes
        frames = framer.feed(data)
        if framer.junk_bytes != junk:
            owner.stats.junk_bytes += framer.junk_bytes - junk
        if not frames:
            return
        try:
            unit = owner._unit(frames)
        except Exception as exc:  # a bug, never the sender's fault: drop this connection only
            log.error("connector %s: MLLP frame handling failed: %s", owner.id, type(exc).__name__)
            self.abort()
            return
        if unit.items:
            unit.conn = self
            self.units.append(unit)
            assert owner._committer is not None, "start() was not called"
            owner._committer.submit(unit.items, unit.stored, self)
            if len(self.units) >= _MAX_UNITS:
                self._reading()
        else:
            unit.replies = owner._replies(unit, [])
            if self.units:
                self.units.append(unit)
            else:
                self._write(unit.replies)

    def eof_received(self) -> bool:
        self.eof = True
        return bool(self.units)  # keep the write side open until the pending ACKs are out

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.open:
            return
        self.open = False
        self.owner._conns.discard(self)
        self.owner.stats.open_connections -= 1
        if self.timer is not None:
            self.timer.cancel()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._reading()

    # ------------------------------------------------------------------ ours

    def stored(self, unit: _Unit, results: list[PutResult] | None, exc: BaseException | None) -> None:
        owner = self.owner
        if results is None:
            owner.stats.store_failures += 1
            log.warning(
                "connector %s: store failed, NACKing %d message(s): %s",
                owner.id,
                len(unit.items),
                type(exc).__name__,
            )
        try:
            unit.replies = owner._replies(unit, results)
        except Exception as err:  # a bug: never answer out of order, drop the connection
            log.error("connector %s: MLLP reply failed: %s", owner.id, type(err).__name__)
            self.abort()
            return
        units = self.units
        if units[0] is unit and len(units) == 1:
            units.popleft()
            out = unit.replies
        else:
            out = []
            while units and units[0].replies is not None:
                out.extend(units.popleft().replies or ())
        if self.open:
            self._write(out)
            if self.read_paused:
                self._reading()

    def _write(self, replies: list[bytes]) -> None:
        transport = self.transport
        if replies and self.open and transport is not None:
            if len(replies) == 1:
                transport.write(VT + replies[0] + FS_CR)
            else:
                transport.write(b"".join(VT + r + FS_CR for r in replies))
        if self.eof and not self.units and transport is not None:
            transport.close()

    def _reading(self) -> None:
        transport = self.transport
        if transport is None or not self.open:
            return
        pause = self.write_paused or len(self.units) >= _MAX_UNITS
        if pause and not self.read_paused:
            transport.pause_reading()
        elif not pause and self.read_paused:
            transport.resume_reading()
        self.read_paused = pause

    def _idle(self) -> None:
        if not self.open:
            return
        due = self.last + self.owner.config.idle_timeout_s
        if self.units or self.loop.time() < due:
            # Still busy, or data came since: look again later.
            self.timer = self.loop.call_at(max(due, self.loop.time() + 0.05), self._idle)
            return
        self.owner.stats.idle_closed += 1
        assert self.transport is not None
        self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _try_header(data: bytes) -> Header | None:
    try:
        msgs = data.lstrip(b"\r\n")
        if msgs.startswith(b"\xef\xbb\xbf"):
            msgs = msgs[3:]
        i = msgs.find(b"MSH")
        return read_header(msgs[i:]) if i >= 0 else None
    except HL7FormatError:
        return None


def _batch_ack(acks: Sequence[bytes], bhs: bytes | None, now: datetime) -> bytes:
    """Acknowledgments of a batch, wrapped as a batch (BHS ... BTS). Answering a BHS, the
    ACK batch's header swaps its sender and receiver (BHS-3..6), is stamped now (BHS-7),
    has its own control id (BHS-11) and names the batch it answers (BHS-12 = its BHS-11)."""
    first = acks[0]
    fs = first[3:4].decode("latin-1") or "|"
    enc = first[4 : first.index(fs.encode(), 4)].decode("latin-1") if fs.encode() in first[4:] else "^~\\&"
    head = f"BHS{fs}{enc}"
    if bhs is not None:
        f = bhs.decode("latin-1").split(bhs[3:4].decode("latin-1"))
        f += [""] * (12 - len(f))
        # f[0] is "BHS", f[n] is BHS-(n+1): BHS-3 f[2], BHS-4 f[3], BHS-5 f[4], BHS-6 f[5], BHS-11 f[10].
        fields = [f[4], f[5], f[2], f[3], hl7_timestamp(now), "", "", "", next_ack_id(), f[10]]
        head += fs + fs.join(fields)
    return f"{head}\r".encode() + b"".join(acks) + f"BTS{fs}{len(acks)}\r".encode()
