"""'careloop hl7 send FILE --host --port': an MLLP client that checks each ACK.

Sends every message of FILE (single, back-to-back or batch; LF or CR separated; BOM
tolerated) on one connection, waits for each acknowledgment, prints one line per message
(control id and MSA-1, plus the ERR code and text on errors) and exits 1 if any message
was not accepted (AE, AR, CE, CR, or no answer), 2 if FILE cannot be read.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Annotated

import typer

from careloop.hl7v2.ack import Outcome, should_send
from careloop.hl7v2.parse import HL7FormatError, parse_bytes, read_header, split_messages

app = typer.Typer(no_args_is_help=True, help="HL7 v2 tools.")


@app.callback()
def _group() -> None:
    """HL7 v2 tools (a group, so that 'send' keeps its name when more commands come)."""


VT, FS_CR = b"\x0b", b"\x1c\r"


def _read_frame(sock: socket.socket, buf: bytearray) -> bytes:
    while True:
        end = buf.find(FS_CR)
        if end >= 0:
            start = buf.find(VT)
            payload = bytes(buf[start + 1 : end]) if 0 <= start < end else bytes(buf[:end])
            del buf[: end + 2]
            return payload
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        buf += chunk


def _describe(ack: bytes) -> tuple[str, str]:
    """(MSA-1, detail) of an acknowledgment (detail: ERR code and text, PHI-free by design)."""
    try:
        m = parse_bytes(ack)
    except HL7FormatError:
        return "?", "unreadable acknowledgment"
    msa = m.segment("MSA")
    code = msa.get(1) if msa else "?"
    err = m.segment("ERR")
    detail = ""
    if err is not None:
        detail = " ".join(
            x for x in (err.get(3, 1) or err.get(1, 4), err.get(8) or (msa.get(3) if msa else "")) if x
        )
    return code, detail


@app.command("send")
def send(
    file: Annotated[Path, typer.Argument(help="a .hl7 file: one message, several, or a batch")],
    host: Annotated[str, typer.Option(help="MLLP listener host")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="MLLP listener port")] = 2575,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each ACK")] = 10.0,
    tls: Annotated[bool, typer.Option(help="use TLS")] = False,
    ca: Annotated[Path | None, typer.Option(help="CA bundle to verify the server (implies --tls)")] = None,
    cert: Annotated[Path | None, typer.Option(help="client certificate for mutual TLS")] = None,
    key: Annotated[Path | None, typer.Option(help="client key for mutual TLS")] = None,
) -> None:
    """Send FILE over MLLP and check every acknowledgment."""
    try:
        messages = split_messages(file.read_bytes())
    except OSError as exc:
        typer.echo(f"cannot read {file}: {exc.strerror}", err=True)
        raise typer.Exit(2) from None
    except HL7FormatError as exc:
        typer.echo(f"{file}: {exc}", err=True)
        raise typer.Exit(2) from None
    failures = 0
    try:
        raw_sock = socket.create_connection((host, port), timeout=timeout)
        sock: socket.socket = raw_sock
        if tls or ca or cert:
            ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
            if cert:
                ctx.load_cert_chain(str(cert), str(key) if key else None)
            sock = ctx.wrap_socket(raw_sock, server_hostname=host)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        mode = " (TLS)" if tls or ca or cert else ""
        typer.echo(f"cannot reach an MLLP listener at {host}:{port}{mode}: {reason}", err=True)
        raise typer.Exit(1) from None
    buf = bytearray()
    with sock:
        for msg in messages:
            hdr = read_header(msg)
            sock.sendall(VT + msg + FS_CR)
            if not should_send(hdr, Outcome.OK) and not should_send(hdr, Outcome.ERROR):
                typer.echo(f"{hdr.control_id}\t(no ACK requested: MSH-15 NE)")
                continue
            try:
                code, detail = _describe(_read_frame(sock, buf))
            except (TimeoutError, ConnectionError) as exc:
                typer.echo(f"{hdr.control_id}\tno acknowledgment ({type(exc).__name__})")
                failures += 1
                break
            typer.echo(f"{hdr.control_id}\t{code}" + (f"\t{detail}" if detail else ""))
            if code not in ("AA", "CA"):
                failures += 1
    if failures:
        raise typer.Exit(1)
