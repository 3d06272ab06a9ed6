"""'careloop learning ...' (issue 10): offline policy evaluation and the learned state.

'evaluate' estimates, from the logged learned sends and their outcomes, what other
policies would have earned (IPS, SNIPS, doubly robust; orchestrator/ope.py). 'show PERSON'
prints what the learner believes about one person: the pooled posterior of every option it
has evidence for, with the person's own counts. Neither changes the learned state or prints
identifiers; 'show' is an access to the person's record and is audited (person.view).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from sqlmodel import Session, col, select

from careloop import audit_log
from careloop.clock import SystemClock
from careloop.config import AppConfig, load
from careloop.db import database_url, existing_engine
from careloop.errors import ConfigError
from careloop.explain import audit_view
from careloop.tables import OutreachOutcome, Person
from orchestrator import learning, ope

app = typer.Typer(help="The learner: offline policy evaluation and learned state.", no_args_is_help=True)
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="careloop config file")]
out = Console(soft_wrap=True)


def _die(msg: str, code: int = 2) -> NoReturn:
    typer.echo(msg, err=True)
    raise typer.Exit(code)


def _config(path: Path | None) -> AppConfig:
    if path is None:
        return AppConfig()
    try:
        return load(path)
    except ConfigError as exc:
        _die("\n".join(exc.problems))


@app.command("evaluate")
def evaluate_cmd(
    config: ConfigOpt = None,
    policy: Annotated[
        list[str] | None,
        typer.Option(
            "--policy",
            "-p",
            help="logged | greedy | uniform | fixed | channel:ID | window:NAME | variant:NAME",
        ),
    ] = None,
    settle_hours: Annotated[
        float, typer.Option(help="only sends older than this (their outcomes are in)")
    ] = 72.0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Estimate each policy's mean reward per send from the logged learned decisions."""
    cfg = _config(config)
    names = policy or ["logged", "greedy", "fixed", "uniform"]
    try:
        policies = [(n, ope.policy_named(n)) for n in names]
    except ValueError as exc:
        _die(str(exc))
    engine = existing_engine(database_url(cfg.database.url))
    try:
        with Session(engine) as s:
            units = ope.load(s, until=ope.settled_before(SystemClock().now(), settle_hours))
    finally:
        engine.dispose()
    ests = [ope.evaluate(units, pi, n) for n, pi in policies]
    if as_json:
        typer.echo(json.dumps([asdict(e) for e in ests], indent=2))
        return
    if not units:
        _die("no learned sends with propensities to evaluate yet (is learning.enabled on?)", 1)
    table = Table(
        title=f"offline policy evaluation over {len(units)} learned sends "
        f"(logged mean reward {ests[0].logged_mean:.4f})"
    )
    for c in ("policy", "IPS", "± se", "SNIPS", "DR", "± se", "ESS"):
        table.add_column(c, justify="right" if c != "policy" else "left")
    for e in ests:
        table.add_row(
            e.policy,
            f"{e.ips:.4f}",
            f"{e.ips_se:.4f}",
            f"{e.snips:.4f}",
            f"{e.dr:.4f}",
            f"{e.dr_se:.4f}",
            f"{e.ess:.0f}",
        )
    out.print(table)


@app.command("show")
def show_cmd(person: int, config: ConfigOpt = None) -> None:
    """What the learner believes about PERSON: pooled posterior means and the person's counts."""
    cfg = _config(config)
    engine = existing_engine(database_url(cfg.database.url))
    now = SystemClock().now()
    try:
        with Session(engine) as s:
            if s.get(Person, person) is None:
                _die(f"no person {person}", 1)
        # what the learner knows of a person is part of their record: the access is audited
        # (as 'careloop explain' is), committed before anything is shown
        audit_view(engine, person, audit_log.cli_actor(), view="learned-state")
        with Session(engine) as s:
            last = s.exec(
                select(OutreachOutcome)
                .where(OutreachOutcome.person_id == person)
                .order_by(col(OutreachOutcome.sent_at).desc())
            ).first()
            segment = last.segment if last is not None and last.segment else "*"
            view = learning.DbStats(s, person_key=str(person), segment=segment, now=now, cfg=cfg.learning)
            options = sorted({(r.dimension, r.option) for r in view.rows.values()})
    finally:
        engine.dispose()
    table = Table(
        title=f"person {person}: learned state (segment {segment})",
        caption="engaged: the person's reads, clicks and replies counted for the option; for a "
        "window, those that came in its hours, whichever window the message went in",
    )
    heads = ("dimension", "option", "posterior mean", "segment mean", "sends", "engaged")
    for c in heads:
        table.add_column(c, justify="left" if c in ("dimension", "option") else "right")
    for dim, opt in options:
        post = learning.posterior(view, str(person), segment, dim, opt, cfg.learning)
        table.add_row(
            dim,
            opt,
            f"{post.mean:.3f}",
            f"{post.segment_mean:.3f}",
            str(post.person.trials),
            str(post.person.engaged),
        )
    out.print(table)
