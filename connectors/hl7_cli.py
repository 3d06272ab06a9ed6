"""'careloop hl7 send FILE --host --port': an MLLP client that checks each ACK.

Sends every message of FILE (single, back-to-back or batch; LF or CR separated; BOM
tolerated) on one connection, waits for each acknowledgment, prints one line per message
(control id and MSA-1, plus the ERR code and text on errors) and exits 1 if any message
was not accepted (AE, AR, CE, CR, or no answer), 2 if FILE cannot be read. A message that
asks for no ACK (MSH-15 NE) is not waited for; one that asks for an ACK only on error
(MSH-15 ER) is accepted when no ACK comes for it.
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


def _describe(ack: bytes) -> tuple[str, str, str]:
    """(MSA-1, MSA-2, detail) of an acknowledgment (detail: ERR code and text, PHI-free by
    design)."""
    try:
        m = parse_bytes(ack)
    except HL7FormatError:
        return "?", "", "unreadable acknowledgment"
    msa = m.segment("MSA")
    code = msa.get(1) if msa else "?"
    err = m.segment("ERR")
    detail = ""
    if err is not None:
        detail = " ".join(
            x for x in (err.get(3, 1) or err.get(1, 4), err.get(8) or (msa.get(3) if msa else "")) if x
        )
    return code, msa.raw(2) if msa else "", detail  # MSA-2 as written, like MSH-10


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
    headers = []
    for n, msg in enumerate(messages, start=1):
        try:
            headers.append(read_header(msg))
        except HL7FormatError as exc:  # checked before sending anything: no half-sent file
            typer.echo(f"{file}: message {n}: {exc}; nothing was sent", err=True)
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
    # Messages sent with MSH-15 ER get an ACK only on error. The listener answers in order,
    # so an ER message is accepted once the ACK of a later message arrives without one for
    # it, or when none came within --timeout after the last message.
    silent_ok: list[str] = []
    with sock:
        for msg, hdr in zip(messages, headers, strict=True):
            sock.sendall(VT + msg + FS_CR)
            on_ok, on_error = should_send(hdr, Outcome.OK), should_send(hdr, Outcome.ERROR)
            if not on_ok and not on_error:
                typer.echo(f"{hdr.control_id}\t(no ACK requested: MSH-15 NE)")
                continue
            if not on_ok:
                silent_ok.append(hdr.control_id)
                continue
            try:
                while True:
                    code, acked, detail = _describe(_read_frame(sock, buf))
                    if acked in silent_ok and acked != hdr.control_id:
                        failures += _report(silent_ok, acked, code, detail)
                        continue
                    break
            except (TimeoutError, ConnectionError) as exc:
                failures += _unknown(silent_ok)
                why = "the server closed the connection" if isinstance(exc, ConnectionError) else "timed out"
                if isinstance(exc, ConnectionError) and sock is not raw_sock and cert is None:
                    why += "; a listener with mutual TLS needs --cert and --key"
                typer.echo(f"{hdr.control_id}\tno acknowledgment ({why})")
                failures += 1
                break
            _accepted_silently(silent_ok)
            if code != "?" and acked != hdr.control_id:  # MSA-2 must echo MSH-10: not our ACK
                typer.echo(
                    f"{hdr.control_id}\t{code}\tthe ACK's MSA-2 is {acked!r}, not this message's MSH-10"
                )
                failures += 1
                break
            typer.echo(f"{hdr.control_id}\t{code}" + (f"\t{detail}" if detail else ""))
            if code not in ("AA", "CA"):
                failures += 1
        while silent_ok:  # trailing ER messages: an ACK now can only be an error
            try:
                code, acked, detail = _describe(_read_frame(sock, buf))
            except TimeoutError:
                break
            except ConnectionError:
                failures += _unknown(silent_ok)
                break
            failures += _report(silent_ok, acked, code, detail)
        _accepted_silently(silent_ok)
    if failures:
        raise typer.Exit(1)


def _report(silent_ok: list[str], acked: str, code: str, detail: str) -> int:
    """Print the ACK of an MSH-15 ER message (sent only on error), after the silent
    acceptances of the ER messages sent before it. Returns 1 if it is not an acceptance."""
    i = silent_ok.index(acked) if acked in silent_ok else len(silent_ok)
    before = silent_ok[:i]
    del silent_ok[: i + 1]
    _accepted_silently(before)
    typer.echo(f"{acked}\t{code}" + (f"\t{detail}" if detail else ""))
    return 0 if code in ("AA", "CA") else 1


def _accepted_silently(silent_ok: list[str]) -> None:
    for control_id in silent_ok:
        typer.echo(f"{control_id}\taccepted (no ACK: MSH-15 ER)")
    silent_ok.clear()


def _unknown(silent_ok: list[str]) -> int:
    """MSH-15 ER messages whose outcome cannot be known: the connection ended first."""
    for control_id in silent_ok:
        typer.echo(
            f"{control_id}\tno acknowledgment (MSH-15 ER; the connection ended first: outcome unknown)"
        )
    n = len(silent_ok)
    silent_ok.clear()
    return n
