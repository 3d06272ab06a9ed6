"""``careloop demo``: three synthetic patients through the real pipeline.

A temporary SQLite store, the shipped example config (``fixtures/config/example.yaml``)
and the demo feed (``fixtures/feeds/demo.jsonl``) are replayed on a virtual clock with
every channel capturing. The story:
  1. Ana is booked, gets the 72-hour reminder, replies "C": she gets preparation
     instructions instead of the 24-hour reminder;
  2. Bruno is booked and stays silent: both reminders go out (in Spanish);
  3. Carla is admitted and discharged: the satisfaction survey waits until her discharge
     instructions were delivered and 48 hours have passed.
It prints each person's timeline with the reason for every decision and ends by
verifying the audit chain.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlmodel import Session, col, func, select

from careloop import config as cfgmod
from careloop.errors import ConfigError
from careloop.explain import STYLE, timeline
from careloop.replay import Replayer, read_feed
from careloop.tables import AuditRecord, Person

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "fixtures" / "config" / "example.yaml"
FEED = ROOT / "fixtures" / "feeds" / "demo.jsonl"


def main(console: Console) -> int:
    try:
        cfg = cfgmod.load(CONFIG)
        lines = read_feed(FEED)
        rp = Replayer(cfg, start=lines[0].at)
    except ConfigError as exc:
        for p in exc.problems:
            console.print(f"[red]error[/red] {p}")
        return 2
    try:
        console.print(
            f"[bold]careloop demo[/bold]: replaying {len(lines)} signals from {FEED.name} "
            f"through {CONFIG.name} (virtual clock, channels capture)\n"
        )
        asyncio.run(rp.feed(lines, horizon=timedelta(days=14)))
        tz = ZoneInfo(cfg.site.timezone)
        with Session(rp.store.engine) as s:
            people = s.exec(
                select(Person).where(col(Person.merged_into).is_(None)).order_by(col(Person.id))
            ).all()
            for person in people:
                assert person.id is not None
                rows = [r for r in timeline(s, person.id) if r[1] != "schedule"]
                story = " -> ".join(dict.fromkeys(what for _, kind, what, _ in rows if kind == "event"))
                table = Table(title=Text(f"person {person.id}: {story}"), title_justify="left")
                table.add_column(f"when ({cfg.site.timezone})", no_wrap=True)
                table.add_column("", no_wrap=True)
                table.add_column("what", no_wrap=True)
                table.add_column("why", overflow="fold")
                for at, kind, what, why in rows:
                    if kind == "event":
                        why = why.split("/")[0]  # the subject's type; its id says nothing here
                    cells = (at.astimezone(tz).strftime("%a %m-%d %H:%M"), kind, what, why)
                    table.add_row(*(Text(c) for c in cells), style=STYLE.get(kind))
                console.print(table)
            n = s.exec(select(func.count()).select_from(AuditRecord)).one()
        ok, message = _verify(rp)
        colour = "green" if ok else "red"
        console.print(f"\naudit chain: [{colour}]{message}[/{colour}] ({n} records)")
        console.print(
            "Explore: careloop explain PERSON, careloop replay, careloop audit verify (see README)."
        )
        return 0 if ok else 1
    finally:
        rp.close()


def _verify(rp: Replayer) -> tuple[bool, str]:
    from audit.verify import verify_database

    rep = verify_database(rp.store.engine)
    if rep.ok:
        return True, f"verified, {rep.records} records re-hashed"
    return False, f"NOT verified: {rep.first_bad or rep.faults[0]}"
