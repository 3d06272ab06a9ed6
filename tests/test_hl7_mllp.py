"""The MLLP listener over real sockets, with real clients and a real store."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import hl7.client
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func
from sqlmodel import Session, col, select

from careloop.clock import SystemClock
from careloop.db import make_engine, upgrade
from careloop.ingest import IngestSink
from careloop.pipeline import MapStage
from careloop.store import Store
from careloop.tables import AuditRecord, DeadLetter, RawMessage
from connectors.hl7v2_mllp import MLLPConfig, MLLPConnector, MLLPFramer
from mapping.hl7v2 import HL7v2Mapper
from tests.hl7_support import HL7_FIXTURES, adt, frame, msa, msh, read_frame, segment, siu

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def config(**kw: Any) -> MLLPConfig:
    kw.setdefault("port", free_port())
    return MLLPConfig(plugin="hl7v2_mllp", **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def listener(store: Store) -> AsyncIterator[MLLPConnector]:
    c = MLLPConnector("adt", config(idle_timeout_s=5))
    await c.start(IngestSink(store))
    yield c
    await c.stop()


async def exchange(port: int, payloads: list[bytes], *, ssl_ctx: ssl.SSLContext | None = None) -> list[bytes]:
    """Send each payload framed and wait for its reply (a plain asyncio MLLP client)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_ctx)
    out = []
    try:
        for p in payloads:
            writer.write(frame(p))
            await writer.drain()
            data = await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 10)
            out.append(data[data.index(b"\x0b") + 1 : -2])
    finally:
        writer.close()
    return out


def stored(store: Store) -> list[RawMessage]:
    with Session(store.engine) as s:
        return list(s.exec(select(RawMessage).order_by(col(RawMessage.id))).all())


@pytest.mark.anyio
async def test_python_hl7_client_sends_many_messages_on_one_connection(
    listener: MLLPConnector, store: Store
) -> None:
    def send_all() -> list[str]:
        with hl7.client.MLLPClient("127.0.0.1", listener.port) as client:
            return [client.send_message(adt("A01", f"PY{i}")).decode() for i in range(40)]

    acks = await asyncio.to_thread(send_all)
    assert [msa(a.encode().strip(b"\x0b\x1c\r")) for a in acks] == [("AA", f"PY{i}") for i in range(40)]
    rows = stored(store)
    assert [r.dedup_key for r in rows] == [f"NWADT|NORTHWIND|PY{i}" for i in range(40)]
    assert all(r.kind == "hl7v2:ADT^A01" and r.status == "pending" for r in rows)


@pytest.mark.anyio
async def test_mllp_send_command_line_tool_gets_acks(
    listener: MLLPConnector, store: Store, tmp_path: Path
) -> None:
    stream = tmp_path / "stream.mllp"
    stream.write_bytes(b"".join(frame(siu("S12", f"CLI{i}")) for i in range(5)))
    tool = Path(sys.executable).parent / "mllp_send"
    proc = await asyncio.create_subprocess_exec(
        str(tool),
        "--file",
        str(stream),
        "--port",
        str(listener.port),
        "127.0.0.1",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    assert [msa(a)[1] for a in out.split(b"\x1c")[:-1]] == [f"CLI{i}" for i in range(5)]
    assert len(stored(store)) == 5


@pytest.mark.anyio
async def test_concurrent_connections_share_commits_and_every_message_is_stored_once(
    listener: MLLPConnector, store: Store
) -> None:
    async def client(k: int) -> list[bytes]:
        return await exchange(listener.port, [siu("S12", f"C{k}-{i}") for i in range(25)])

    results = await asyncio.gather(*(client(k) for k in range(8)))
    for k, acks in enumerate(results):
        assert [msa(a) for a in acks] == [("AA", f"C{k}-{i}") for i in range(25)]
    rows = stored(store)
    assert len(rows) == 200 and len({r.dedup_key for r in rows}) == 200
    assert listener._committer is not None and listener._committer.commits < 200  # grouped


@pytest.mark.anyio
async def test_duplicate_control_id_gets_same_ack_and_is_stored_once(
    listener: MLLPConnector, store: Store
) -> None:
    first = await exchange(listener.port, [adt("A01", "DUP1")])
    again = await exchange(listener.port, [adt("A01", "DUP1"), adt("A01", "DUP1")])
    assert again == first * 2
    assert len(stored(store)) == 1
    with Session(store.engine) as s:
        actions = s.exec(select(AuditRecord.action)).all()
    assert actions.count("message.receive") == 1 and actions.count("message.duplicate") == 2
    assert listener.stats.duplicates == 2


@pytest.mark.anyio
async def test_same_control_id_from_another_sender_is_not_a_duplicate(
    listener: MLLPConnector, store: Store
) -> None:
    await exchange(listener.port, [adt("A01", "SAME", sender="APP1"), adt("A01", "SAME", sender="APP2")])
    assert len(stored(store)) == 2


@pytest.mark.anyio
async def test_oversize_message_gets_ar_and_the_stream_stays_in_sync(store: Store) -> None:
    c = MLLPConnector("adt", config(max_message_bytes=2048))
    await c.start(IngestSink(store))
    try:
        big = adt("A01", "BIG1", extra=["ZZZ|" + "x" * 5000])
        acks = await exchange(c.port, [adt("A01", "OK1"), big, adt("A01", "OK2")])
    finally:
        await c.stop()
    assert msa(acks[0]) == ("AA", "OK1")
    assert msa(acks[1]) == ("AR", "BIG1")
    err = segment(acks[1], "ERR")
    assert err is not None and "limit is 2048" in err[8]
    assert msa(acks[2]) == ("AA", "OK2")
    assert [r.dedup_key for r in stored(store)] == ["NWADT|NORTHWIND|OK1", "NWADT|NORTHWIND|OK2"]
    assert c.stats.oversize == 1


@pytest.mark.anyio
async def test_oversize_frame_arriving_in_pieces_is_discarded_in_sync(store: Store) -> None:
    c = MLLPConnector("adt", config(max_message_bytes=1024))
    await c.start(IngestSink(store))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", c.port)
        big = frame(adt("A01", "BIG2", extra=["ZZZ|" + "y" * 20000]))
        for i in range(0, len(big), 700):
            writer.write(big[i : i + 700])
            await writer.drain()
        writer.write(frame(adt("A01", "AFTER")))
        await writer.drain()
        first = await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 10)
        second = await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 10)
        writer.close()
    finally:
        await c.stop()
    assert msa(first[1:-2]) == ("AR", "BIG2") and msa(second[1:-2]) == ("AA", "AFTER")


@pytest.mark.anyio
async def test_bytes_before_vt_are_tolerated_and_counted(listener: MLLPConnector, store: Store) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(b"\r\nnoise" + frame(adt("A01", "J1")) + b"\n\n" + frame(adt("A01", "J2")))
    await writer.drain()
    a1 = await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 10)
    a2 = await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 10)
    writer.close()
    assert msa(a1[1:-2])[1] == "J1" and msa(a2[1:-2])[1] == "J2"
    assert listener.stats.junk_bytes == 9


@pytest.mark.anyio
async def test_pipelined_frames_are_acknowledged_in_order(listener: MLLPConnector) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(b"".join(frame(adt("A01", f"P{i}")) for i in range(30)))
    await writer.drain()
    ids = []
    for _ in range(30):
        ack = await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 10)
        ids.append(msa(ack[1:-2])[1])
    writer.close()
    assert ids == [f"P{i}" for i in range(30)]


@pytest.mark.anyio
async def test_a_sender_pipelining_hundreds_of_frames_gets_every_ack_in_order(
    listener: MLLPConnector, store: Store
) -> None:
    # More frames in flight than the listener keeps before it stops reading, sent in
    # pieces that cut frames anywhere, with unreadable frames in between.
    frames = [frame(adt("A01", f"Q{i}")) if i % 50 else frame(b"PID|no MSH") for i in range(300)]
    data = b"".join(frames)
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    for i in range(0, len(data), 1500):
        writer.write(data[i : i + 1500])
        await writer.drain()
    codes = []
    for _ in range(300):
        ack = await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 30)
        codes.append(msa(ack[1:-2]))
    writer.close()
    assert codes == [("AA", f"Q{i}") if i % 50 else ("AR", "") for i in range(300)]
    assert len(stored(store)) == 294


class _GatedSink:
    """IngestSink whose commits wait until the test opens the gate."""

    def __init__(self, inner: IngestSink) -> None:
        self.inner, self.gate = inner, threading.Event()

    def put_sync(self, items: Any) -> Any:
        assert self.gate.wait(30)
        return self.inner.put_sync(items)

    async def put(self, items: Any) -> Any:
        return await asyncio.to_thread(self.put_sync, items)


@pytest.mark.anyio
async def test_a_connection_stops_reading_while_too_many_of_its_frames_wait_for_a_commit(
    store: Store,
) -> None:
    sink = _GatedSink(IngestSink(store))
    c = MLLPConnector("adt", config())
    await c.start(sink)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", c.port)
        for i in range(100):  # one read each: a unit each
            writer.write(frame(adt("A01", f"G{i}")))
            await writer.drain()
            await asyncio.sleep(0.003)
        [conn] = c._conns
        assert conn.read_paused and len(conn.units) == 64
        sink.gate.set()
        ids = [msa((await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 30))[1:-2]) for _ in range(100)]
        writer.close()
    finally:
        sink.gate.set()
        await c.stop()
    assert ids == [("AA", f"G{i}") for i in range(100)]
    assert len(stored(store)) == 100


@pytest.mark.anyio
async def test_batch_in_one_frame_gets_a_batch_of_acks(listener: MLLPConnector, store: Store) -> None:
    bhs = b"BHS|^~\\&|NWADT|NORTHWIND|CARELOOP|CARELOOP|20260302090000||||BATCH-77\r"
    batch = bhs + adt("A01", "B1") + siu("S12", "B2") + b"BTS|2\r"
    [reply] = await exchange(listener.port, [batch])
    assert reply.startswith(b"BHS|") and reply.rstrip(b"\r").endswith(b"BTS|2")
    assert reply.count(b"MSA|AA|") == 2
    assert len(stored(store)) == 2
    # The ACK batch's header answers the batch's: sender and receiver swapped, its own
    # control id, and BHS-12 naming the batch it acknowledges.
    head = reply.split(b"\r", 1)[0].decode().split("|")
    assert head[2:6] == ["CARELOOP", "CARELOOP", "NWADT", "NORTHWIND"]
    assert len(head[6]) >= 14 and head[10] and head[11] == "BATCH-77"
    # A batch with a bare BHS still gets one.
    [bare] = await exchange(listener.port, [b"BHS|^~\\&\r" + adt("A01", "B3") + b"BTS|1\r"])
    assert bare.startswith(b"BHS|^~\\&|") and bare.count(b"MSA|AA|B3") == 1


@pytest.mark.anyio
async def test_unreadable_frame_gets_ar_and_is_not_stored(listener: MLLPConnector, store: Store) -> None:
    [nack, ok] = await exchange(listener.port, [b"PID|1||not a message", adt("A01", "OK9")])
    assert msa(nack)[0] == "AR" and msa(ok) == ("AA", "OK9")
    assert len(stored(store)) == 1


@pytest.mark.anyio
async def test_store_failure_gets_ae_never_aa(tmp_path: Path) -> None:
    broken = make_engine(f"sqlite:///{tmp_path}/unmigrated.db")  # no tables: every put fails
    c = MLLPConnector("adt", config())
    await c.start(IngestSink(Store(broken, SystemClock())))
    try:
        acks = await exchange(c.port, [adt("A01", "F1"), siu("S12", "F2", accept_ack="AL", app_ack="NE")])
    finally:
        await c.stop()
        broken.dispose()
    assert msa(acks[0]) == ("AE", "F1") and msa(acks[1]) == ("CE", "F2")
    err = segment(acks[0], "ERR")
    assert err is not None and err[3].startswith("207^")
    assert c.stats.store_failures == 2 and c.stats.stored == 0


@pytest.mark.anyio
async def test_stock_ingest_sink_works_too(store: Store) -> None:
    c = MLLPConnector("adt", config())
    await c.start(IngestSink(store))
    try:
        acks = await exchange(c.port, [adt("A01", "K1"), adt("A01", "K1")])
    finally:
        await c.stop()
    assert acks[0] == acks[1] and msa(acks[0]) == ("AA", "K1")
    assert len(stored(store)) == 1


class _AsyncOnlySink:
    """A RawSink with ``put`` alone (no ``put_sync``): stored from the event loop."""

    def __init__(self, inner: IngestSink, fail: bool = False) -> None:
        self.inner, self.fail, self.calls = inner, fail, 0

    async def put(self, items: Any) -> Any:
        self.calls += 1
        if self.fail:
            raise OSError("disk gone")
        return await self.inner.put(items)


@pytest.mark.anyio
async def test_a_sink_with_only_async_put_stores_and_answers_duplicates_too(store: Store) -> None:
    sink = _AsyncOnlySink(IngestSink(store))
    c = MLLPConnector("adt", config())
    await c.start(sink)
    try:
        results = await asyncio.gather(
            *(exchange(c.port, [adt("A01", f"AS{k}-{i}") for i in range(15)]) for k in range(3)),
            exchange(c.port, [adt("A01", "AS0-0")]),
        )
    finally:
        await c.stop()
    for k, acks in enumerate(results[:3]):
        assert [msa(a) for a in acks] == [("AA", f"AS{k}-{i}") for i in range(15)]
    assert results[3] == [results[0][0]]  # the duplicate's ACK is the first copy's
    assert len(stored(store)) == 45 and c.stats.duplicates == 1 and sink.calls >= 1


@pytest.mark.anyio
async def test_a_failing_async_only_sink_gets_ae(store: Store) -> None:
    c = MLLPConnector("adt", config())
    await c.start(_AsyncOnlySink(IngestSink(store), fail=True))
    try:
        acks = await exchange(c.port, [adt("A01", "AF1"), adt("A01", "AF2")])
    finally:
        await c.stop()
    assert [msa(a) for a in acks] == [("AE", "AF1"), ("AE", "AF2")]
    assert c.stats.store_failures == 2 and stored(store) == []


@pytest.mark.anyio
async def test_idle_connection_is_closed(store: Store) -> None:
    c = MLLPConnector("adt", config(idle_timeout_s=0.3))
    await c.start(IngestSink(store))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", c.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        await c.stop()
    assert c.stats.idle_closed == 1


@pytest.mark.anyio
async def test_unmapped_and_undecodable_messages_are_stored_then_skipped_or_kept_as_errors(
    listener: MLLPConnector, store: Store
) -> None:
    oru = (msh("ORU^R01", "R1") + "\rPID|1||X^^^NWH\rOBX|1|NM|1^HR^LN||72\r").encode()
    bad = (msh("ADT^A08", "BAD", charset="ASCII") + "\rPID|1||X^^^NWH||Jos\xe9").encode("latin-1") + b"\r"
    acks = await exchange(listener.port, [oru, bad, siu("S12", "S1")])
    assert [msa(a)[0] for a in acks] == ["AA", "AE", "AA"]
    mapper = HL7v2Mapper()
    await MapStage(store, lambda raw: mapper).run_once()
    rows = {r.dedup_key.rsplit("|", 1)[-1]: r for r in stored(store) if r.dedup_key}
    assert rows["R1"].status == "skipped" and rows["R1"].status_reason == "message type ORU^R01 is not mapped"
    # Refused with AE: kept for inspection with the reason, never handed to the mapper.
    assert rows["BAD"].status == "error" and rows["BAD"].body == bad
    assert rows["BAD"].status_reason is not None and "MSH^1^18" in rows["BAD"].status_reason
    assert rows["S1"].status == "mapped"
    with Session(store.engine) as s:
        assert s.exec(select(func.count()).select_from(DeadLetter)).one() == 0


def _make_certs(tmp: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test-ca"))
        .issuer_name(name("test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": tmp / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who, san in (
        ("server", x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))),
        ("client", x509.DNSName("client.test")),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(who))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(2 if who == "server" else 3)
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        out[f"{who}_cert"] = tmp / f"{who}.pem"
        out[f"{who}_key"] = tmp / f"{who}.key"
        out[f"{who}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{who}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return out


@pytest.mark.anyio
async def test_mutual_tls_accepts_a_client_certificate_and_refuses_none(store: Store, tmp_path: Path) -> None:
    certs = _make_certs(tmp_path)
    tls = {"cert": certs["server_cert"], "key": certs["server_key"], "ca": certs["ca"]}
    c = MLLPConnector("adt", config(tls=tls))
    await c.start(IngestSink(store))
    try:
        good = ssl.create_default_context(cafile=str(certs["ca"]))
        good.load_cert_chain(str(certs["client_cert"]), str(certs["client_key"]))
        [ack] = await exchange(c.port, [adt("A01", "TLS1")], ssl_ctx=good)
        assert msa(ack) == ("AA", "TLS1")
        anonymous = ssl.create_default_context(cafile=str(certs["ca"]))
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await exchange(c.port, [adt("A01", "TLS2")], ssl_ctx=anonymous)
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await exchange(c.port, [adt("A01", "PLAIN")])  # no TLS at all
    finally:
        await c.stop()
    assert [r.dedup_key for r in stored(store)] == ["NWADT|NORTHWIND|TLS1"]


def test_config_accepts_the_listen_shorthand_and_rejects_unknown_keys() -> None:
    cfg = MLLPConfig.model_validate(
        {"plugin": "hl7v2_mllp", "listen": "127.0.0.1:2575", "ack_mode": "commit"}
    )
    assert (cfg.host, cfg.port, cfg.max_message_bytes) == ("127.0.0.1", 2575, 1024 * 1024)
    with pytest.raises(ValueError):
        MLLPConfig.model_validate({"plugin": "hl7v2_mllp", "bogus": 1})
    with pytest.raises(ValueError):
        MLLPConfig.model_validate({"plugin": "hl7v2_mllp", "port": 70000})


def test_demo_fixture_files_are_accepted_over_the_wire(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/f.db")
    upgrade(engine)
    store = Store(engine, SystemClock())

    async def run() -> list[bytes]:
        c = MLLPConnector("adt", config())
        await c.start(IngestSink(store))
        try:
            payloads = [
                (HL7_FIXTURES / n).read_bytes() for n in sorted(p.name for p in HL7_FIXTURES.glob("*.hl7"))
            ]
            return await exchange(c.port, payloads)
        finally:
            await c.stop()

    replies = asyncio.run(run())
    assert all(b"MSA|AA|" in r for r in replies)
    assert len(stored(store)) == 5
    engine.dispose()


# --------------------------------------------------------------------------- property tests


class _Server:
    """A listener on its own event loop thread, shared by the property examples."""

    def __init__(self, db: Path) -> None:
        engine = make_engine(f"sqlite:///{db}")
        upgrade(engine)
        self.engine = engine
        self.connector = MLLPConnector("prop", config(max_message_bytes=1024, idle_timeout_s=5))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(
            self.connector.start(IngestSink(Store(engine, SystemClock()))), self.loop
        ).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.connector.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        self.engine.dispose()


@pytest.fixture(scope="module")
def prop_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Server]:
    srv = _Server(tmp_path_factory.mktemp("prop") / "p.db")
    yield srv
    srv.close()


_PIECES = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"\x0b", b"\x1c\r", b"\x1c", b"\r", b"MSH|^~\\&|", b"\x0bMSH|", b"|", b"^~\\&"]),
    st.builds(lambda i: frame(adt("A01", f"H{i}")), st.integers(0, 50)),
    st.builds(lambda n: b"\x0b" + b"x" * n + b"\x1c\r", st.integers(1000, 1500)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_PIECES, max_size=12))
def test_arbitrary_bytes_get_one_reply_per_frame_then_a_clean_close(
    prop_server: _Server, pieces: list[bytes]
) -> None:
    data = b"".join(pieces)
    expected = len(MLLPFramer(1024).feed(data))
    with socket.create_connection(("127.0.0.1", prop_server.connector.port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        buf = bytearray()
        replies = []
        while True:
            try:
                replies.append(read_frame(sock, buf))
            except ConnectionError:
                break
    assert len(replies) == expected
    for r in replies:  # original or enhanced mode (garbage may carry an MSH-15)
        assert msa(r)[0] in {"AA", "AE", "AR", "CA", "CE", "CR"}


@pytest.mark.anyio
async def test_connections_over_the_limit_are_closed_at_once(store: Store) -> None:
    c = MLLPConnector("adt", config(max_connections=1))
    await c.start(IngestSink(store))
    try:
        r1, w1 = await asyncio.open_connection("127.0.0.1", c.port)
        w1.write(frame(adt("A01", "L1")))
        await w1.drain()
        await asyncio.wait_for(r1.readuntil(b"\x1c\r"), 10)  # the first connection is being served
        r2, w2 = await asyncio.open_connection("127.0.0.1", c.port)
        assert await asyncio.wait_for(r2.read(), 5) == b""
        w1.close()
        w2.close()
    finally:
        await c.stop()
    assert c.stats.refused == 1
