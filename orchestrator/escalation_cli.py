"""'careloop escalations ...': the work queue from the command line.

Changes made here are audited like API changes, with the operating-system user as actor
('cli:<user>'); 'show' (which prints the patient's message) is audited as a view.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from careloop import audit_log
from careloop.clock import SystemClock
from careloop.config import load
from careloop.db import database_url, existing_engine
from careloop.errors import ConfigError
from careloop.store import Store
from orchestrator import escalation
from orchestrator.triage import TIERS

app = typer.Typer(
    help="Escalations: the staff work queue (list, show, ack, resolve, report).", no_args_is_help=True
)
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="careloop config file")]


def _die(msg: str, code: int = 2) -> NoReturn:
    typer.echo(msg, err=True)
    raise typer.Exit(code)


def _store(config: Path | None) -> Store:
    url = None
    if config is not None:
        try:
            url = load(config).database.url
        except ConfigError as exc:
            _die("\n".join(exc.problems))
    return Store(existing_engine(database_url(url)), SystemClock())


def _actor() -> str:
    return audit_log.cli_actor()


@app.command("list")
def list_cmd(
    config: ConfigOpt = None,
    status: Annotated[list[str] | None, typer.Option(help="open|acknowledged|resolved")] = None,
    severity: Annotated[str | None, typer.Option(help="emergency|urgent|routine")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The queue, most severe first (open and acknowledged unless --status says otherwise)."""
    # A misspelt filter must not show an empty queue while emergencies wait.
    for value in status or []:
        if value not in escalation.STATUSES:
            _die(f"--status: {value!r} is not one of {', '.join(escalation.STATUSES)}")
    if severity is not None and severity not in TIERS:
        _die(f"--severity: {severity!r} is not one of {', '.join(TIERS)}")
    store = _store(config)
    with store.session() as s:
        rows = escalation.list_escalations(s, status=status or list(escalation.OPEN), severity=severity)
        docs = [escalation.to_json(e, evidence=False) for e in rows]
    if as_json:
        typer.echo(json.dumps(docs, indent=2))
        return
    for d in docs:
        typer.echo(
            f"#{d['id']:<5} {d['severity']:<9} {d['status']:<12} level {d['level']}  "
            f"person {d['person']}  {d['reason']}  rule={d['rule']}  due {d['due_at']}"
        )
    if not docs:
        typer.echo("no escalations")


@app.command()
def show(esc_id: int, config: ConfigOpt = None) -> None:
    """One escalation with its evidence (the message and the rules that matched)."""
    store = _store(config)
    with store.session() as s:
        try:
            esc = escalation.get(s, esc_id)
        except escalation.EscalationError as exc:
            _die(str(exc), 1)
        audit_log.append(
            s,
            at=store.clock.now(),
            actor=_actor(),
            action="escalation.view",
            person_id=esc.person_id,
            entity=f"escalation/{esc.id}",
            detail={"via": "cli"},
        )
        doc = escalation.to_json(esc)
    typer.echo(json.dumps(doc, indent=2, ensure_ascii=False))


@app.command("ack")
def ack(esc_id: int, config: ConfigOpt = None) -> None:
    """Acknowledge: you have it; re-escalation stops."""
    store = _store(config)
    with store.session() as s:
        try:
            escalation.acknowledge(s, esc_id, actor=_actor(), now=store.clock.now())
        except escalation.EscalationError as exc:
            _die(str(exc), 1)
    typer.echo(f"escalation {esc_id} acknowledged")


Feedback = Annotated[str, typer.Option("--feedback", "-f", help="needed | not_needed (was a person needed?)")]


@app.command()
def resolve(esc_id: int, feedback: Feedback, config: ConfigOpt = None) -> None:
    """Resolve with feedback; automated outreach to the person resumes."""
    store = _store(config)
    with store.session() as s:
        try:
            escalation.resolve(s, esc_id, actor=_actor(), now=store.clock.now(), feedback=feedback)
        except escalation.EscalationError as exc:
            _die(str(exc), 1)
    typer.echo(f"escalation {esc_id} resolved ({feedback})")


@app.command("feedback")
def feedback_cmd(esc_id: int, feedback: Feedback, config: ConfigOpt = None) -> None:
    """Correct the feedback of a resolved escalation."""
    store = _store(config)
    with store.session() as s:
        try:
            escalation.set_feedback(s, esc_id, actor=_actor(), now=store.clock.now(), feedback=feedback)
        except escalation.EscalationError as exc:
            _die(str(exc), 1)
    typer.echo(f"escalation {esc_id} feedback: {feedback}")


@app.command()
def report(config: ConfigOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Precision per rule from staff feedback: needed / (needed + not needed)."""
    store = _store(config)
    with store.session() as s:
        rows = escalation.precision_report(s)
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "rule": r.rule,
                        "escalations": r.escalations,
                        "needed": r.needed,
                        "not_needed": r.not_needed,
                        "precision": r.precision,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return
    typer.echo(f"{'rule':<32} {'escalations':>11} {'needed':>7} {'not':>5} {'precision':>9}")
    for r in rows:
        p = "-" if r.precision is None else f"{r.precision:.2f}"
        typer.echo(f"{r.rule:<32} {r.escalations:>11} {r.needed:>7} {r.not_needed:>5} {p:>9}")
