"""'careloop outbox list|resolve': staff review of outbox items, above all the ``unknown`` ones.

The deliver stage (channels/outbox.py) marks an item ``unknown`` when a send may or may
not have reached the provider and the channel cannot find out; it never resends such an
item by itself. Staff find out (the provider's console, a call to the patient) and settle
it here:

- ``resolve ID --sent``: it arrived. The item becomes ``sent`` with a ``delivery_receipt``
  row saying staff resolved it, and the ``disclosure`` audit record the deliver stage
  writes for a success (the same record, ``channels.outbox.disclose``).
- ``resolve ID --not-sent``: it did not arrive. The item goes back to ``pending`` and the
  deliver stage sends it again; its send-time compliance check (a death, a STOP, an open
  escalation, consent, quiet hours, ``not_after``) runs at that claim as for any retry.
  The attempts made so far are kept, and ``last_error`` says why the item is pending
  again, so the check never takes it for a fresh first attempt.

Only ``unknown`` items can be resolved, and two staff resolving the same item cannot both
win: the change is one conditional UPDATE (``WHERE status = 'unknown'``). Every resolve,
and every refused one of an existing item, is audited as ``outbox.resolve`` by
``cli:<user>``. ``list`` shows ids, times, channel, template, playbook, purpose, status,
attempts and the last error: never the recipient's address or the message text.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import sqlalchemy as sa
import typer
from sqlalchemy.engine import Engine
from sqlmodel import Session

from careloop import audit_log
from careloop.clock import SystemClock, utc
from careloop.tables import Decision, DeliveryReceipt, OutboxItem
from channels.outbox import disclose

app = typer.Typer(
    no_args_is_help=True,
    help="Outbox items: list them, resolve the ones in doubt, release or cancel the ones held for staff.",
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="config file (for database.url)")]
# Every status an outbox row can have (careloop/tables.py, ``OutboxItem.status``).
OUTBOX_STATUSES = (
    "pending",
    "held",
    "sending",
    "sent",
    "delivered",
    "failed",
    "unknown",
    "dead",
    "captured",
    "cancelled",
)
COLUMNS = (
    "id",
    "created_at",
    "person",
    "channel",
    "template",
    "playbook",
    "purpose",
    "status",
    "attempts",
    "last_error",
)
# The outbox columns behind COLUMNS, in order.
_LISTED = tuple("person_id" if c == "person" else c for c in COLUMNS)
NOT_SENT_NOTE = "staff review: not delivered; to be sent again"
_OUTBOX = OutboxItem.__table__  # type: ignore[attr-defined]


def _actor() -> str:
    return audit_log.cli_actor()


def _engine(config: Path | None) -> Engine:
    """The configured database, which must exist (a read must not create an empty one)."""
    from careloop import config as cfgmod
    from careloop.db import database_url, existing_engine, upgrade
    from careloop.errors import ConfigError

    try:
        url = cfgmod.load(config).database.url if config is not None else None
        engine = existing_engine(database_url(url))
    except ConfigError as exc:
        for p in exc.problems:
            typer.echo(f"error: {p}", err=True)
        raise typer.Exit(2) from None
    upgrade(engine)
    return engine


def _cell(value: object) -> str:
    """One TSV cell: no tabs or line breaks inside (an error text may hold them)."""
    return "" if value is None else " ".join(str(value).split())


@app.command("list")
def list_items(
    status: Annotated[str | None, typer.Option(help="|".join(OUTBOX_STATUSES))] = None,
    limit: Annotated[int, typer.Option(min=1, help="newest first, at most this many")] = 50,
    config: ConfigOpt = None,
) -> None:
    """List outbox items, newest first, tab-separated (no recipient address, no message text)."""
    if status is not None and status not in OUTBOX_STATUSES:
        typer.echo(f"--status: {status!r} is not one of {', '.join(OUTBOX_STATUSES)}", err=True)
        raise typer.Exit(2)
    engine = _engine(config)
    # Only the columns shown: the recipient and the content are never read here.
    q = sa.select(*(_OUTBOX.c[n] for n in _LISTED)).order_by(_OUTBOX.c.id.desc()).limit(limit)
    if status is not None:
        q = q.where(_OUTBOX.c.status == status)
    try:
        with Session(engine) as s:
            rows = s.connection().execute(q).all()
            # Person ids beside what was sent to them: a staff access, audited as such.
            audit_log.append(
                s,
                at=SystemClock().now(),
                actor=audit_log.cli_actor(),
                action="outbox.list",
                detail={"status": status, "count": len(rows)},
            )
            s.commit()
    finally:
        engine.dispose()
    typer.echo("\t".join(COLUMNS))
    for r in rows:
        cells: list[Any] = list(r)
        cells[1] = utc(cells[1]).isoformat(timespec="seconds")  # created_at
        typer.echo("\t".join(_cell(c) for c in cells))


@app.command("resolve")
def resolve(
    item_id: Annotated[int, typer.Argument(help="the outbox item's id")],
    sent: Annotated[bool, typer.Option("--sent", help="staff confirmed it arrived: mark it sent")] = False,
    not_sent: Annotated[bool, typer.Option("--not-sent", help="it did not arrive: send it again")] = False,
    config: ConfigOpt = None,
) -> None:
    """Settle an 'unknown' item: --sent (it arrived) or --not-sent (send it again)."""
    if sent == not_sent:
        typer.echo("give exactly one of --sent or --not-sent", err=True)
        raise typer.Exit(2)
    choice = "sent" if sent else "not-sent"
    engine = _engine(config)
    try:
        problem = resolve_item(engine, item_id, choice, _actor())
    finally:
        engine.dispose()
    if problem is not None:
        typer.echo(problem, err=True)
        raise typer.Exit(1)
    if sent:
        typer.echo(f"outbox {item_id}: sent (resolved by staff)")
    else:
        typer.echo(f"outbox {item_id}: pending, to be sent again (the send-time check still applies)")


def resolve_item(engine: Engine, item_id: int, choice: str, actor: str) -> str | None:
    """Settle ``unknown`` item ``item_id`` as ``choice`` (``sent`` or ``not-sent``) in one
    transaction, audited as ``actor``; returns a problem (PHI-free) or None."""
    if choice not in ("sent", "not-sent"):
        raise ValueError(f"choice must be 'sent' or 'not-sent', not {choice!r}")
    now = SystemClock().now()
    if choice == "sent":
        values: dict[str, Any] = {"status": "sent", "last_error": None}
    else:
        values = {"status": "pending", "next_attempt_at": None, "last_error": NOT_SENT_NOTE}
    with Session(engine) as s:
        # Conditional: of two staff resolving one item, the second finds it no longer unknown.
        got = (
            s.connection()
            .execute(
                _OUTBOX.update()
                .where(_OUTBOX.c.id == item_id, _OUTBOX.c.status == "unknown")
                .values(**values)
                .returning(*_OUTBOX.c)
            )
            .mappings()
            .one_or_none()
        )
        if got is None:
            s.rollback()
            return _refuse(s, item_id, choice, actor, now)
        row = OutboxItem(**got)
        detail = {"choice": choice, "channel": row.channel, "template": row.template}
        if choice == "sent":
            s.add(
                DeliveryReceipt(
                    outbox_id=item_id,
                    at=now,
                    status="sent",
                    provider_id=row.provider_id,
                    detail={"resolved_by": "staff", "actor": actor},
                )
            )
            # The record the deliver stage writes for a success, so the accounting of
            # disclosures sees this one as it sees every other.
            disclose(s, row, "sent", now, ok=True)
        audit_log.append(
            s,
            at=now,
            actor=actor,
            action="outbox.resolve",
            person_id=row.person_id,
            entity=f"outbox/{item_id}",
            purpose=row.purpose,
            detail=detail,
        )
        s.commit()
    return None


def _refuse(s: Session, item_id: int, choice: str, actor: str, now: datetime) -> str:
    """The problem with resolving ``item_id``; a refused resolve of an existing item is
    audited as a rejected staff action."""
    row = s.get(OutboxItem, item_id)
    if row is None:
        return f"outbox {item_id}: not found"
    audit_log.append(
        s,
        at=now,
        actor=actor,
        action="outbox.resolve",
        outcome="rejected",
        person_id=row.person_id,
        entity=f"outbox/{item_id}",
        purpose=row.purpose,
        detail={"choice": choice, "reason": f"status is {row.status}"},
    )
    s.commit()
    return f"outbox {item_id}: status is {row.status}; only unknown items can be resolved"


@app.command("release")
def release(
    item_id: Annotated[int, typer.Argument(help="the outbox item's id")],
    config: ConfigOpt = None,
) -> None:
    """Let a 'held' item go: staff confirmed the shared phone or email may receive it. It is
    then sent like any other (the send-time check still applies, except the shared address)."""
    _settle_held(item_id, "release", config)


@app.command("cancel")
def cancel(
    item_id: Annotated[int, typer.Argument(help="the outbox item's id")],
    config: ConfigOpt = None,
) -> None:
    """Drop a 'held' item: it must not go to the shared address (staff reach the person another way)."""
    _settle_held(item_id, "cancel", config)


def _settle_held(item_id: int, choice: str, config: Path | None) -> None:
    engine = _engine(config)
    try:
        problem = settle_held(engine, item_id, choice, _actor())
    finally:
        engine.dispose()
    if problem is not None:
        typer.echo(problem, err=True)
        raise typer.Exit(1)
    typer.echo(f"outbox {item_id}: " + ("released, to be sent" if choice == "release" else "cancelled"))


def settle_held(engine: Engine, item_id: int, choice: str, actor: str) -> str | None:
    """Release (``release``) or cancel (``cancel``) ``held`` item ``item_id`` in one
    conditional update, audited as ``actor`` (``outbox.release`` / ``outbox.cancel``);
    returns a problem (PHI-free) or None."""
    if choice not in ("release", "cancel"):
        raise ValueError(f"choice must be 'release' or 'cancel', not {choice!r}")
    now = SystemClock().now()
    if choice == "release":
        values: dict[str, Any] = {
            "status": "pending",
            "next_attempt_at": None,
            "released_by": actor[:64],
            "released_at": now,
        }
    else:
        values = {"status": "cancelled", "last_error": "cancelled by staff"}
    with Session(engine) as s:
        # Conditional: of two staff settling one item, the second finds it no longer held.
        done = s.connection().execute(
            _OUTBOX.update().where(_OUTBOX.c.id == item_id, _OUTBOX.c.status == "held").values(**values)
        )
        row = s.get(OutboxItem, item_id)
        if row is None:
            return f"outbox {item_id}: not found"
        settled = done.rowcount == 1
        if settled:  # the person's timeline (careloop explain) shows what staff decided
            s.add(
                Decision(
                    person_id=row.person_id,
                    decided_at=now,
                    playbook=row.playbook or "-",
                    action=choice,
                    template=row.template,
                    channel=row.channel,
                    reason="staff-released" if choice == "release" else "staff-cancelled",
                    detail={"outbox": item_id, "by": actor},
                )
            )
        audit_log.append(
            s,
            at=now,
            actor=actor,
            action=f"outbox.{choice}",
            outcome="success" if settled else "rejected",
            person_id=row.person_id,
            entity=f"outbox/{item_id}",
            purpose=row.purpose,
            detail={"channel": row.channel, "template": row.template}
            | ({} if settled else {"reason": f"status is {row.status}"}),
        )
        s.commit()
        if not settled:
            return f"outbox {item_id}: status is {row.status}; only held items can be released or cancelled"
    return None
