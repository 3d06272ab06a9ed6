"""'careloop learning ...' (issue 10): offline policy evaluation and the learned state.

'evaluate' estimates, from the logged learned sends and their outcomes, what other
policies would have earned (IPS, SNIPS, doubly robust; orchestrator/ope.py). 'show PERSON'
prints what the learner believes about one person: the pooled posterior of every option it
has evidence for, with the person's own counts (``learning.model: beta``), or, with the belief
model (the default), the settled sends it reads, its belief about them now and the fitted link,
built by the functions a decision uses. Neither changes the learned state or prints
identifiers; 'show' is an access to the person's record and is audited (person.view).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import datetime
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
from orchestrator import belief, learning, ope

app = typer.Typer(help="The learner: offline policy evaluation and learned state.", no_args_is_help=True)
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="careloop config file")]
MIN_ESS = 30  # fewer effective logged sends than this: an estimate is flagged, not trusted
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
        f"(logged mean reward {ests[0].logged_mean:.4f})",
        caption=f"ESS: how many logged sends an estimate rests on, in effect. Below {MIN_ESS} (!) the "
        "policy chose as the log did too rarely to trust IPS and SNIPS, and DR is mostly its "
        "reward model; none (-): no logged send matches it",
    )
    for c in ("policy", "IPS", "± se", "SNIPS", "DR", "± se", "ESS"):
        table.add_column(c, justify="right" if c != "policy" else "left")
    for e in ests:
        table.add_row(*estimate_row(e))
    out.print(table)


def estimate_row(e: ope.Estimate) -> list[str]:
    """One policy's cells: flagged (!) below MIN_ESS; IPS and SNIPS shown as "-" when no
    logged send matches the policy (they would print a confident 0)."""
    none = e.ess == 0
    return [
        e.policy + (" (!)" if e.ess < MIN_ESS else ""),
        "-" if none else f"{e.ips:.4f}",
        "-" if none else f"{e.ips_se:.4f}",
        "-" if none else f"{e.snips:.4f}",
        f"{e.dr:.4f}",
        f"{e.dr_se:.4f}",
        f"{e.ess:.0f}",
    ]


ENGAGED_CAPTION = (
    "engaged: the person's reads, clicks and replies counted for the option; for a window, those "
    "that came in its hours, whichever window the message went in"
)
DIM_ORDER = {d: i for i, d in enumerate(learning.DIMENSIONS)}


@dataclass(frozen=True, slots=True)
class BeliefState:
    """What the belief model holds about one person at ``now``, built as a decision builds it."""

    now: datetime
    sends: int  # the settled sends it reads (learning.history)
    counts: dict[tuple[str, str], tuple[int, int]]  # (dimension, option) -> (engaged, sends)
    active: dict[str, tuple[float, float]]  # window -> P(it is the person's active one): belief, prior
    top: str  # the most likely active window
    reply: dict[str, tuple[float, float]]  # channel -> P(reply) in ``top``, default wording: belief, prior
    link: belief.Link


def _mean(w: list[float], q: list[float]) -> float:
    return math.fsum(x * y for x, y in zip(w, q, strict=True))


def belief_state(
    s: Session, cfg: AppConfig, person: int, segment: str, template: str, tz: str, now: datetime
) -> BeliefState:
    """The person's belief at ``now`` over every configured window and the site's channels
    (and any other their history holds), with the default wording: a decision's options are
    those the gate allows at that moment, so its prior may lend over a different set."""
    lc = cfg.learning
    hist = learning.history(s, person, now, lc, tz)
    model = learning.Model(
        hist, learning.LinkCache().get(s, lc, cfg.site.timezone), lc.rewards.get("read", 0.0)
    )
    view = learning.DbStats(s, person_key=str(person), segment=segment, now=now, cfg=lc)
    channels = list(dict.fromkeys([*cfg.site.channels, *(o.channel for o in hist)]))
    joint = learning.joint_belief(
        model,
        view,
        str(person),
        segment,
        channels,
        dict.fromkeys(lc.windows, now),
        lambda c: [],
        template,
        lc,
        tz,
        now=now,
    )
    p, w = joint.pool, joint.weights
    active = {
        wn: (belief.active_share(p, w, wn), belief.active_share(p, joint.prior, wn)) for wn in p.windows
    }
    top = max(p.windows, key=lambda wn: active[wn][0])  # first in configured order on ties
    reply = {}
    for c in channels:
        q = p.q(c, top, f"{template}/default")
        reply[c] = (_mean(w, q), _mean(joint.prior, q))
    return BeliefState(now, len(hist), learning.model_counts(hist), active, top, reply, joint.link)


def _print_belief(person: int, segment: str, st: BeliefState) -> None:
    table = Table(
        title=f"person {person}: the belief model's history ({st.sends} settled sends, segment {segment})",
        caption=ENGAGED_CAPTION,
    )
    for c in ("dimension", "option", "sends", "engaged"):
        table.add_column(c, justify="left" if c in ("dimension", "option") else "right")
    for (dim, opt), (engaged, sends) in sorted(
        st.counts.items(), key=lambda kv: (DIM_ORDER[kv[0][0]], kv[0][1])
    ):
        table.add_row(dim, opt, str(sends), str(engaged))
    out.print(table)
    at = st.now.strftime("%Y-%m-%d %H:%M UTC")
    active = Table(
        title=f"person {person}: P(active window) at {at}",
        caption="prior: the pool tilted toward the segment, before the person's own sends",
    )
    for c in ("window", "P(active)", "prior"):
        active.add_column(c, justify="left" if c == "window" else "right")
    for wn, (now_p, prior_p) in st.active.items():
        active.add_row(wn, f"{now_p:.3f}", f"{prior_p:.3f}")
    out.print(active)
    reply = Table(title=f"person {person}: P(reply) in the {st.top} window, default wording, at {at}")
    for c in ("channel", "P(reply)", "prior"):
        reply.add_column(c, justify="left" if c == "channel" else "right")
    for ch, (now_p, prior_p) in st.reply.items():
        reply.add_row(ch, f"{now_p:.3f}", f"{prior_p:.3f}")
    out.print(reply)
    k = st.link
    fitted = f"fitted from {k.n} settled sends" if k.n else "not fitted yet: the generic defaults"
    out.print(
        f"link: floor {k.floor:.3f}, slope {k.slope:.3f}, cap {k.cap:.3f}, late {k.late:.3f}, "
        f"where {k.where:.3f}, n {k.n} ({fitted})"
    )


@app.command("show")
def show_cmd(person: int, config: ConfigOpt = None) -> None:
    """What the learner believes about PERSON: with the belief model, the settled sends it
    reads, its belief now and the fitted link; with beta, pooled posterior means and counts."""
    cfg = _config(config)
    joint = cfg.learning.model == "belief"
    if joint and not cfg.learning.windows:
        _die("learning.windows: the belief model needs at least one send window")
    engine = existing_engine(database_url(cfg.database.url))
    now = SystemClock().now()
    state: BeliefState | None = None
    try:
        with Session(engine) as s:
            who = s.get(Person, person)
            if who is None:
                _die(f"no person {person}", 1)
            tz = who.timezone or cfg.site.timezone  # as the gate's PersonFacts
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
            if joint:
                template = last.template if last is not None else "default"
                state = belief_state(s, cfg, person, segment, template, tz, now)
            else:
                view = learning.DbStats(s, person_key=str(person), segment=segment, now=now, cfg=cfg.learning)
                options = sorted({(r.dimension, r.option) for r in view.rows.values()})
    finally:
        engine.dispose()
    if state is not None:
        _print_belief(person, segment, state)
        return
    table = Table(title=f"person {person}: learned state (segment {segment})", caption=ENGAGED_CAPTION)
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
