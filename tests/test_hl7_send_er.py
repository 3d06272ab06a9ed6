"""``careloop hl7 send`` with MSH-15 ER (an accept ACK only on error): a message that gets
no ACK is accepted, not a failure, and the messages after it are still sent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from careloop.clock import SystemClock
from careloop.db import make_engine, upgrade
from careloop.ingest import IngestSink
from careloop.store import Store
from connectors import hl7_cli
from tests.hl7_support import BackgroundListener, adt

runner = CliRunner()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[BackgroundListener]:
    engine = make_engine(f"sqlite:///{tmp_path}/er.db")
    upgrade(engine)
    srv = BackgroundListener(IngestSink(Store(engine, SystemClock())))
    yield srv
    srv.close()
    engine.dispose()


def _send(srv: BackgroundListener, tmp_path: Path, *messages: bytes) -> tuple[int, list[str]]:
    f = tmp_path / "batch.hl7"
    f.write_bytes(b"".join(messages))
    res = runner.invoke(hl7_cli.app, ["send", str(f), "--port", str(srv.port), "--timeout", "2"])
    return res.exit_code, res.output.splitlines()


def test_er_messages_without_ack_are_accepted_and_the_rest_is_sent(
    listener: BackgroundListener, tmp_path: Path
) -> None:
    code, lines = _send(
        listener,
        tmp_path,
        adt("A01", "ER1", accept_ack="ER", app_ack="NE"),
        adt("A01", "ER2", accept_ack="ER", app_ack="NE"),
        adt("A01", "AL1", accept_ack="AL", app_ack="NE"),
        adt("A01", "ER3", accept_ack="ER", app_ack="NE"),
    )
    assert code == 0, lines
    assert lines == [
        "ER1\taccepted (no ACK: MSH-15 ER)",
        "ER2\taccepted (no ACK: MSH-15 ER)",
        "AL1\tCA",
        "ER3\taccepted (no ACK: MSH-15 ER)",
    ]


def test_an_er_message_that_is_refused_is_reported_and_fails(
    listener: BackgroundListener, tmp_path: Path
) -> None:
    bad = adt("A01", "ER5", accept_ack="ER", app_ack="NE", charset="UNICODE UTF-8").replace(
        b"Examplar", b"Ex\xe1mplar"
    )
    code, lines = _send(
        listener,
        tmp_path,
        adt("A01", "ER4", accept_ack="ER", app_ack="NE"),
        bad,
        adt("A01", "AL2", accept_ack="AL", app_ack="NE"),
        bad.replace(b"ER5", b"ER6"),
    )
    assert code == 1, lines
    assert lines[0] == "ER4\taccepted (no ACK: MSH-15 ER)"
    assert lines[1].startswith("ER5\tCE\t102 ") and lines[2] == "AL2\tCA"
    assert lines[3].startswith("ER6\tCE\t102 ") and len(lines) == 4


def test_a_file_with_an_unreadable_msh_is_refused_before_anything_is_sent(
    listener: BackgroundListener, tmp_path: Path
) -> None:
    unreadable = adt("A01", "U2").replace(b"MSH|^~\\&|", b"MSH|^^\\&|")
    code, lines = _send(listener, tmp_path, adt("A01", "U1"), unreadable)
    assert code == 2, lines
    assert lines == [
        f"{tmp_path / 'batch.hl7'}: message 2: MSH-2 encoding characters repeat; nothing was sent"
    ]
    assert listener.connector.stats.frames == 0


def test_send_over_mutual_tls_and_a_clear_reason_without_a_client_certificate(tmp_path: Path) -> None:
    from tests.test_hl7_mllp import _make_certs

    certs = _make_certs(tmp_path)
    engine = make_engine(f"sqlite:///{tmp_path}/tls.db")
    upgrade(engine)
    tls = {"cert": certs["server_cert"], "key": certs["server_key"], "ca": certs["ca"]}
    srv = BackgroundListener(IngestSink(Store(engine, SystemClock())), tls=tls)
    f = tmp_path / "one.hl7"
    f.write_bytes(adt("A01", "T1"))
    base = ["send", str(f), "--port", str(srv.port), "--timeout", "5", "--ca", str(certs["ca"])]
    try:
        with_cert = runner.invoke(
            hl7_cli.app, [*base, "--cert", str(certs["client_cert"]), "--key", str(certs["client_key"])]
        )
        without = runner.invoke(hl7_cli.app, base)
    finally:
        srv.close()
        engine.dispose()
    assert with_cert.exit_code == 0 and with_cert.output.splitlines() == ["T1\tAA"]
    assert without.exit_code == 1
    assert without.output.splitlines() == [
        "T1\tno acknowledgment (the server closed the connection;"
        " a listener with mutual TLS needs --cert and --key)"
    ]


def test_an_ack_that_does_not_echo_the_control_id_is_a_failure(tmp_path: Path) -> None:
    import socket
    import threading

    wrong = b"\x0bMSH|^~\\&|CARELOOP||NWADT|NORTHWIND|20260302090500||ACK|A1|P|2.5.1\rMSA|AA|OTHER\r\x1c\r"
    with socket.create_server(("127.0.0.1", 0)) as server:

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                data = b""
                while b"\x1c\r" not in data:
                    data += conn.recv(65536)
                conn.sendall(wrong)

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        f = tmp_path / "one.hl7"
        f.write_bytes(adt("A01", "W1") + adt("A01", "W2"))
        port = server.getsockname()[1]
        res = runner.invoke(hl7_cli.app, ["send", str(f), "--port", str(port), "--timeout", "5"])
        t.join(5)
    assert res.exit_code == 1
    assert res.output.splitlines() == ["W1\tAA\tthe ACK's MSA-2 is 'OTHER', not this message's MSH-10"]


def test_er_messages_are_not_called_accepted_when_the_connection_ends_first(tmp_path: Path) -> None:
    import socket
    import threading

    with socket.create_server(("127.0.0.1", 0)) as server:

        def hang_up() -> None:
            conn, _ = server.accept()
            with conn:
                data = b""
                while data.count(b"\x1c\r") < 2:
                    data += conn.recv(65536)

        t = threading.Thread(target=hang_up, daemon=True)
        t.start()
        f = tmp_path / "two.hl7"
        f.write_bytes(adt("A01", "X1", accept_ack="ER", app_ack="NE") + adt("A01", "X2"))
        port = server.getsockname()[1]
        res = runner.invoke(hl7_cli.app, ["send", str(f), "--port", str(port), "--timeout", "5"])
        t.join(5)
    assert res.exit_code == 1
    assert res.output.splitlines() == [
        "X1\tno acknowledgment (MSH-15 ER; the connection ended first: outcome unknown)",
        "X2\tno acknowledgment (the server closed the connection)",
    ]


def test_a_control_id_with_an_escape_is_matched_as_written(
    listener: BackgroundListener, tmp_path: Path
) -> None:
    code, lines = _send(listener, tmp_path, adt("A01", "C\\F\\3"))
    assert code == 0, lines
    assert lines == ["C\\F\\3\tAA"]
