"""'careloop fhir ...': the state of the hub's FHIR subscriptions and pollers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlmodel import Session, col, select

from careloop.clock import utc
from careloop.errors import ConfigError
from careloop.tables import FhirSubscriptionState

app = typer.Typer(no_args_is_help=True, help="FHIR connectors: subscriptions and pollers.")

FHIR_PLUGINS = ("fhir_subscription", "fhir_poll")


def rows(engine: Any, connectors: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per subscription (or poller type), configured ones first even if not created yet."""
    fhir = {cid: c for cid, c in connectors.items() if c.get("plugin") in FHIR_PLUGINS}
    with Session(engine) as s:
        states = s.exec(
            select(FhirSubscriptionState).order_by(
                col(FhirSubscriptionState.connector), col(FhirSubscriptionState.id)
            )
        ).all()
    out_rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for st in states:
        if st.connector not in fhir:
            continue
        seen.add((st.connector, st.name or ""))
        out_rows.append(
            {
                "connector": st.connector,
                "name": st.name,
                "subscription": st.subscription,
                "status": st.status,
                "topic": st.topic,
                "events_since_start": st.events_since_start,
                "stored_through": st.contiguous,
                "seen_above": list(st.seen_above),
                "gap_since": _iso(st.gap_since),
                "last_seen_at": _iso(st.last_seen_at),
                "heartbeat_s": st.heartbeat_s,
                "error": st.error,
                "pending_fetch": len(st.pending_fetch),
            }
        )
    for cid, c in fhir.items():
        for spec in c.get("subscriptions") or []:
            if isinstance(spec, dict) and (cid, spec.get("name", "")) not in seen:
                out_rows.append(
                    {
                        "connector": cid,
                        "name": spec.get("name"),
                        "subscription": None,
                        "status": "not created",
                        "topic": spec.get("topic") or spec.get("criteria"),
                    }
                )
    return out_rows


def _iso(v: Any) -> str | None:
    return utc(v).isoformat() if v is not None else None


@app.command("subscriptions")
def subscriptions(
    config: Annotated[Path, typer.Option("--config", "-c", help="careloop YAML config")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Status of every FHIR subscription the hub knows: server id, status, event counters,
    gaps, last contact."""
    from careloop import config as cfgmod
    from careloop.db import database_url, existing_engine, upgrade

    try:
        cfg = cfgmod.load(config)
    except ConfigError as exc:
        for p in exc.problems:
            Console(stderr=True).print(f"[red]error[/red] {p}", highlight=False)
        raise typer.Exit(2) from None
    engine = existing_engine(database_url(cfg.database.url))
    upgrade(engine)
    data = rows(engine, cfg.connectors)
    out = Console() if sys.stdout.isatty() else Console(width=200)  # piped: do not cut columns
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    if not data:
        out.print("no FHIR subscriptions")
        return
    t = Table(
        "connector",
        "name",
        "subscription",
        "status",
        "events",
        "stored through",
        "gap since",
        "last seen",
        "error",
    )
    for r in data:
        t.add_row(
            r["connector"],
            str(r.get("name") or "-"),
            str(r.get("subscription") or "-"),
            r["status"],
            str(r.get("events_since_start", "-")),
            str(r.get("stored_through", "-")),
            str(r.get("gap_since") or "-"),
            str(r.get("last_seen_at") or "-"),
            str(r.get("error") or "-"),
        )
    out.print(t)
