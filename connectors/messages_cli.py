"""'careloop messages list|show|reprocess': look at stored raw messages, safely.

'list' shows ids, kinds, statuses and control ids only. 'show' masks every value that
may be PHI (all HL7 fields outside MSH/EVN, all JSON values outside a few structural keys)
unless '--unmask' is given; an unmasked view is itself recorded in the audit log.
'reprocess' puts skipped/dead/error messages back to 'pending' (recorded in the audit
log); already mapped messages are refused, since their events exist.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from careloop import audit_log
from careloop.clock import SystemClock
from careloop.hl7v2.parse import BOM, CHARSETS, HL7FormatError, read_header
from careloop.tables import RawMessage

app = typer.Typer(no_args_is_help=True, help="Stored raw messages: list, show (masked), reprocess.")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="config file (for database.url)")]
REPROCESSABLE = frozenset({"skipped", "dead", "error"})
_HL7_CLEAR = frozenset({"MSH", "EVN", "BHS", "BTS", "FHS", "FTS"})
RAW_STATUSES = ("pending", "mapped", "skipped", "error", "dead")
_JSON_CLEAR = frozenset({"resourceType", "type", "status", "id", "kind", "occurred_at"})
# Segments whose first field is a Set ID (SI, at most 4 digits), kept in clear. Elsewhere
# SEG-1 can be PHI even when it is all digits: MRG-1 is the prior MRN, SCH-1 the placer
# appointment id, PD1-1 the living dependency.
_SET_ID_FIRST = frozenset(
    [
        "PID",
        "PV1",
        "NK1",
        "AL1",
        "IAM",
        "DG1",
        "PR1",
        "GT1",
        "IN1",
        "IN3",
        "ROL",
        "OBR",
        "OBX",
        "NTE",
        "TQ1",
        "TQ2",
        "RGS",
        "AIS",
        "AIG",
        "AIL",
        "AIP",
        "DB1",
        "UB1",
        "SPM",
        "CON",
        "TXA",
    ]
)


def _engine(config: Path | None) -> Engine:
    from careloop import config as cfgmod
    from careloop.db import database_url, existing_engine, upgrade
    from careloop.errors import ConfigError

    url = None
    if config is not None:
        try:
            url = cfgmod.load(config).database.url
        except ConfigError as exc:
            for p in exc.problems:
                typer.echo(p, err=True)
            raise typer.Exit(2) from None
    engine = existing_engine(database_url(url))
    upgrade(engine)
    return engine


def _control_id(row: RawMessage) -> str:
    return row.dedup_key.rsplit("|", 1)[-1] if row.dedup_key else ""


@app.command("list")
def list_messages(
    status: Annotated[str | None, typer.Option(help="pending|mapped|skipped|dead|error")] = None,
    connector: Annotated[str | None, typer.Option(help="connector id")] = None,
    limit: Annotated[int, typer.Option(help="newest first, at most this many")] = 50,
    config: ConfigOpt = None,
) -> None:
    """List stored messages (no PHI: ids, kinds, statuses, control ids, reasons)."""
    if status is not None and status not in RAW_STATUSES:
        typer.echo(f"--status: {status!r} is not one of {', '.join(RAW_STATUSES)}", err=True)
        raise typer.Exit(2)
    engine = _engine(config)
    with Session(engine) as s:
        q = select(RawMessage).order_by(col(RawMessage.id).desc()).limit(limit)
        if status:
            q = q.where(RawMessage.status == status)
        if connector:
            q = q.where(RawMessage.connector == connector)
        rows = s.exec(q).all()
    engine.dispose()
    for r in rows:
        reason = f"\t{r.status_reason}" if r.status_reason else ""
        typer.echo(
            f"{r.id}\t{r.received_at:%Y-%m-%dT%H:%M:%S}\t{r.connector}\t{r.kind}\t{r.status}\t"
            f"{_control_id(r)}{reason}"
        )


def mask_hl7(text: str) -> str:
    """Keep segment ids, MSH/EVN and set ids; replace every other non-empty field."""
    out = []
    for line in text.replace("\r\n", "\r").replace("\n", "\r").split("\r"):
        if not line:
            continue
        name = line[:3]
        if name in _HL7_CLEAR or len(line) < 4:
            out.append(line)
            continue
        sep = line[3]
        fields = line.split(sep)
        set_id = name in _SET_ID_FIRST
        masked = [fields[0]] + [
            f if not f or (i == 1 and set_id and f.isdigit() and len(f) <= 4) else "***"
            for i, f in enumerate(fields[1:], start=1)
        ]
        out.append(sep.join(masked))
    return "\n".join(out)


def mask_json(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: mask_json(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_json(v, key) for v in value]
    if key in _JSON_CLEAR or value is None or isinstance(value, bool):
        return value
    return "***"


def hl7_text(data: bytes) -> str:
    """HL7 v2 bytes as text in the character set their MSH-18 names (an 8859/1 message is
    not UTF-8); bytes that do not decode (a message kept with an AE) show as U+FFFD."""
    data = data[len(BOM) :] if data.startswith(BOM) else data
    codec = "utf-8"
    try:
        start = data.find(b"MSH")
        if start >= 0:
            codec = CHARSETS.get(" ".join(read_header(data[start:]).charset_name.split()), "utf-8")
    except HL7FormatError:
        pass
    return data.decode(codec, errors="replace")


def render_body(row: RawMessage, unmask: bool) -> str:
    body = bytes(row.body)
    if row.kind.startswith("hl7v2:") or body.lstrip(b"\xef\xbb\xbf").startswith(b"MSH"):
        text = hl7_text(body)
        return text.replace("\r", "\n").strip() if unmask else mask_hl7(text)
    text = body.decode("utf-8", errors="replace")
    try:
        doc = json.loads(text)
    except ValueError:
        return text if unmask else f"<{len(body)} bytes, masked>"
    return json.dumps(doc if unmask else mask_json(doc), indent=2)


@app.command("show")
def show(
    message_id: Annotated[int, typer.Argument(help="raw message id")],
    unmask: Annotated[bool, typer.Option("--unmask", help="show PHI (the view is audited)")] = False,
    config: ConfigOpt = None,
) -> None:
    """Show one message: metadata, body (PHI masked unless --unmask) and the stored ACK."""
    engine = _engine(config)
    try:
        with Session(engine, expire_on_commit=False) as s:
            row = s.get(RawMessage, message_id)
            if row is None:
                typer.echo(f"no raw message {message_id}", err=True)
                raise typer.Exit(1)
            if unmask:
                audit_log.append(
                    s,
                    at=SystemClock().now(),
                    actor=audit_log.cli_actor(),
                    action="message.view",
                    entity=f"raw_message/{message_id}",
                    detail={"unmasked": True},
                )
                s.commit()
    finally:
        engine.dispose()
    typer.echo(
        f"id: {row.id}\nconnector: {row.connector}\nkind: {row.kind}\nreceived_at: {row.received_at}\n"
        f"status: {row.status}"
        + (f" ({row.status_reason})" if row.status_reason else "")
        + f"\ncontrol_id: {_control_id(row)}\n"
    )
    typer.echo(render_body(row, unmask))
    if row.ack:
        typer.echo("\nack:\n" + hl7_text(bytes(row.ack)).replace("\r", "\n").strip())


@app.command("reprocess")
def reprocess(
    message_ids: Annotated[list[int], typer.Argument(help="raw message ids")],
    config: ConfigOpt = None,
) -> None:
    """Put skipped/dead/error messages back to pending so the mapping stage runs again."""
    engine = _engine(config)
    refused = 0
    try:
        with Session(engine) as s:
            for mid in message_ids:
                row = s.get(RawMessage, mid)
                if row is None:
                    typer.echo(f"{mid}\tnot found", err=True)
                    refused += 1
                    continue
                if row.status not in REPROCESSABLE:
                    typer.echo(f"{mid}\trefused: status is {row.status}", err=True)
                    refused += 1
                    continue
                before = row.status
                row.status, row.status_reason, row.attempts, row.next_attempt_at = "pending", None, 0, None
                audit_log.append(
                    s,
                    at=SystemClock().now(),
                    actor=audit_log.cli_actor(),
                    action="message.reprocess",
                    entity=f"raw_message/{mid}",
                    detail={"from": before},
                )
                typer.echo(f"{mid}\tpending (was {before})")
            s.commit()
    finally:
        engine.dispose()
    if refused:
        raise typer.Exit(1)
