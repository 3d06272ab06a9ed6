"""HL7 v2 over MLLP (release 2 framing: VT ... FS CR), TLS and mutual TLS optional.

Commit ACK: a message is acknowledged AA (or CA in enhanced mode) only after
``sink.put`` returned, i.e. after its bytes are committed; if the store fails the
sender gets AE (CE), never AA. The ACK is computed before the commit and stored with the
message, so a duplicate (same MSH-3, MSH-4 and MSH-10) is not stored again and gets the
very same ACK bytes back.

Group commit: puts that arrive from any connection while a commit is in flight are
coalesced into the next single ``sink.put([...])``, so durability costs one fsync per
group, not per message. Each connection keeps its own order: its frames are acknowledged
in the order they arrived.

Framing faults never desynchronise the stream: bytes before a VT are skipped and
counted; a frame larger than ``max_message_bytes`` is read to its FS CR and discarded,
and answered with an AR NACK; an unreadable message (no MSH) gets an AR NACK and is not
stored; an idle connection is closed after ``idle_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from careloop.clock import Clock, SystemClock
from careloop.config import Port, TimeZoneName
from careloop.model import PutResult, RawIn
from careloop.plugins import PluginConfig
from connectors.base import Health, RawSink
from connectors.hl7v2_accept import Accepted, HL7Acceptor
from mapping.hl7v2_ack import AckError, AckStyle, Outcome, build_ack, should_send
from mapping.hl7v2_parse import Header, HL7FormatError, read_header

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


@dataclass(frozen=True, slots=True)
class Frame:
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


class GroupCommitter:
    """Coalesces concurrent puts into one ``sink.put`` per commit."""

    def __init__(self, sink: RawSink, max_batch: int = 1000) -> None:
        self._sink, self._max = sink, max_batch
        self._waiting: list[tuple[list[RawIn], asyncio.Future[list[PutResult]]]] = []
        self._task: asyncio.Task[None] | None = None
        self.commits = 0

    async def put(self, items: list[RawIn]) -> list[PutResult]:
        fut: asyncio.Future[list[PutResult]] = asyncio.get_running_loop().create_future()
        self._waiting.append((items, fut))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return await asyncio.shield(fut)

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch: list[tuple[list[RawIn], asyncio.Future[list[PutResult]]]] = []
                n = 0
                while self._waiting and (not batch or n + len(self._waiting[0][0]) <= self._max):
                    items, fut = self._waiting.pop(0)
                    batch.append((items, fut))
                    n += len(items)
                await self._commit(batch)
        finally:
            self._task = None

    async def _commit(self, batch: list[tuple[list[RawIn], asyncio.Future[list[PutResult]]]]) -> None:
        flat = [i for items, _ in batch for i in items]
        try:
            results = await self._sink.put(flat)
            self.commits += 1
        except Exception as exc:  # the store failed: every waiter learns it, none gets AA
            if len(batch) > 1:
                # Retry one by one so that one poisoned message does not fail its neighbours.
                for one in batch:
                    await self._commit([one])
                return
            if not batch[0][1].done():
                batch[0][1].set_exception(exc)
            return
        pos = 0
        for items, fut in batch:
            if not fut.done():
                fut.set_result(list(results[pos : pos + len(items)]))
            pos += len(items)


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
        self._committer: GroupCommitter | None = None
        self._conns: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._acceptor = HL7Acceptor(
            id, self.clock, self.timezone, config.ack_style, config.strict, config.receiving_application
        )

    # ------------------------------------------------------------------ pure part

    def accept(self, body: bytes, headers: Mapping[str, str]) -> list[RawIn]:
        """One payload (a message, several, or a batch) -> raw messages with their ACKs.
        Raises ``HL7FormatError`` when the payload holds no readable MSH."""
        return self._acceptor.accept(body, headers).items

    def _accept(self, body: bytes, headers: Mapping[str, str]) -> Accepted:
        return self._acceptor.accept(body, headers)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, sink: RawSink) -> None:
        self._committer = GroupCommitter(sink)
        self._server = await asyncio.start_server(
            self._on_connection,
            self.config.host,
            self.config.port,
            ssl=self._ssl_context(),
            backlog=self.config.max_connections,
        )
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
        # Abort the connections: their readers see EOF and their handlers return.
        for writer in list(self._writers):
            writer.transport.abort()
        if self._conns:
            _, pending = await asyncio.wait(list(self._conns), timeout=5)
            for task in pending:
                task.cancel()
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

    # ------------------------------------------------------------------ connections

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.stats.open_connections >= self.config.max_connections:
            self.stats.refused += 1  # over the limit: close at once rather than starve the others
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self._writers.add(writer)
        self.stats.connections += 1
        self.stats.open_connections += 1
        framer = MLLPFramer(self.config.max_message_bytes)
        try:
            while True:
                try:
                    async with asyncio.timeout(self.config.idle_timeout_s):
                        data = await reader.read(65536)
                except TimeoutError:
                    self.stats.idle_closed += 1
                    break
                if not data:
                    break
                junk_before = framer.junk_bytes
                frames = framer.feed(data)
                self.stats.junk_bytes += framer.junk_bytes - junk_before
                if frames:
                    replies = await self._handle(frames)
                    if replies:
                        writer.write(b"".join(frame(r) for r in replies))
                        await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # stop() gave up waiting; this task is the connection's top level
        finally:
            self.stats.open_connections -= 1
            self._conns.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _handle(self, frames: list[Frame]) -> list[bytes]:
        """Frames of one read, in order -> their replies, in order (one commit for all)."""
        self.stats.frames += len(frames)
        accepted: list[Accepted] = []
        for fr in frames:
            accepted.append(self._accept_frame(fr))
        items = [i for a in accepted for i in a.items]
        results: list[PutResult] | None = None
        failed = False
        if items:
            assert self._committer is not None, "start() was not called"
            try:
                results = await self._committer.put(items)
            except Exception as exc:
                failed = True
                self.stats.store_failures += 1
                log.warning(
                    "connector %s: store failed, NACKing %d message(s): %s",
                    self.id,
                    len(items),
                    type(exc).__name__,
                )
        replies: list[bytes] = []
        pos = 0
        now = self.clock.now()
        for acc in accepted:
            if acc.nack is not None:
                replies.append(acc.nack)
                continue
            parts: list[bytes] = []
            for _item, hdr in zip(acc.items, acc.headers, strict=True):
                if failed or results is None:
                    err = AckError(207, "the message could not be stored; send it again")
                    if should_send(hdr, Outcome.ERROR, self.config.ack_style):
                        parts.append(
                            build_ack(
                                hdr,
                                Outcome.ERROR,
                                now,
                                err,
                                self.config.ack_style,
                                self.config.receiving_application,
                            )
                        )
                    self.stats.nacks += 1
                    continue
                res = results[pos]
                pos += 1
                if res.duplicate:
                    self.stats.duplicates += 1
                else:
                    self.stats.stored += 1
                if res.reply is not None:
                    parts.append(res.reply)
            if parts:
                replies.append(_batch_ack(parts) if acc.batch else parts[0])
        return replies

    def _accept_frame(self, fr: Frame) -> Accepted:
        now = self.clock.now()
        style = self.config.ack_style
        if fr.oversize:
            self.stats.oversize += 1
            self.stats.nacks += 1
            hdr = _try_header(fr.content)
            err = AckError(
                207, f"the message is {fr.size} bytes; the limit is {self.config.max_message_bytes}"
            )
            return Accepted(
                [], nack=build_ack(hdr, Outcome.REJECT, now, err, style, self.config.receiving_application)
            )
        try:
            return self._accept(fr.content, {})
        except HL7FormatError as exc:
            self.stats.nacks += 1
            hdr = _try_header(fr.content)
            err = AckError(exc.code, str(exc), exc.location)
            return Accepted(
                [], nack=build_ack(hdr, Outcome.REJECT, now, err, style, self.config.receiving_application)
            )


def _try_header(data: bytes) -> Header | None:
    try:
        msgs = data.lstrip(b"\r\n")
        if msgs.startswith(b"\xef\xbb\xbf"):
            msgs = msgs[3:]
        i = msgs.find(b"MSH")
        return read_header(msgs[i:]) if i >= 0 else None
    except HL7FormatError:
        return None


def _batch_ack(acks: Sequence[bytes]) -> bytes:
    """Acknowledgments of a batch, wrapped as a batch (BHS ... BTS)."""
    first = acks[0]
    fs = first[3:4].decode("latin-1") or "|"
    enc = first[4 : first.index(fs.encode(), 4)].decode("latin-1") if fs.encode() in first[4:] else "^~\\&"
    return f"BHS{fs}{enc}\r".encode() + b"".join(acks) + f"BTS{fs}{len(acks)}\r".encode()
