"""The 'careloop' command line."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from careloop import audit_log
from careloop import config as cfgmod
from careloop.errors import ConfigError

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="careloop: a system of action for patient engagement."
)
config_app = typer.Typer(no_args_is_help=True, help="Configuration files.")
db_app = typer.Typer(no_args_is_help=True, help="The database.")
dead_app = typer.Typer(no_args_is_help=True, help="Items a stage gave up on.")
mapping_app = typer.Typer(no_args_is_help=True, help="Mapping of raw messages to journey events.")
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")
app.add_typer(dead_app, name="deadletters")
held_app = typer.Typer(no_args_is_help=True, help="Events held for staff because the person was not certain.")
app.add_typer(held_app, name="held")
app.add_typer(mapping_app, name="mapping")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="careloop YAML config")]


def _fail(problems: list[str], code: int = 2) -> None:
    for p in problems:
        err.print(f"[red]error[/red] {escape(p)}", highlight=False)
    raise typer.Exit(code)


def _load(path: Path | None) -> cfgmod.AppConfig:
    if path is None:
        return cfgmod.AppConfig()
    try:
        return cfgmod.load(path)
    except ConfigError as exc:
        _fail(exc.problems)
        raise AssertionError from None


def _engine(config: Path | None, *, create: bool = False) -> Any:
    """The configured database, migrated to the current schema; it must exist unless
    'create' ('db upgrade'): a read must not create an empty one."""
    from careloop.db import database_url, existing_engine, make_engine, upgrade

    url = database_url(_load(config).database.url)
    engine = make_engine(url) if create else existing_engine(url)
    upgrade(engine)
    return engine


@config_app.command("check")
def config_check(file: Path) -> None:
    """Validate FILE: print every problem with its path and exit 2, or print OK."""
    from careloop.wiring import check

    try:
        check(cfgmod.load(file))
    except ConfigError as exc:
        _fail(exc.problems)
    out.print(f"{file}: OK")


@db_app.command("upgrade")
def db_upgrade(config: ConfigOpt = None) -> None:
    """Apply migrations to the configured database (CARELOOP_DATABASE_URL wins)."""
    _engine(config, create=True)
    out.print("database is up to date")


@app.command()
def run(config: Annotated[Path, typer.Option("--config", "-c")]) -> None:
    """Run the hub: HTTP, MLLP listeners, stage workers and scheduled jobs."""
    from careloop import logs
    from careloop.runtime import serve

    cfg = _load(config)
    logs.setup()
    try:
        asyncio.run(serve(cfg))
    except ConfigError as exc:
        _fail(exc.problems)
    except KeyboardInterrupt:
        pass


@app.command()
def replay(
    feed: Path,
    config: Annotated[Path, typer.Option("--config", "-c")],
    report: Annotated[Path, typer.Option("--report", "-r")],
    horizon_days: Annotated[int, typer.Option(help="keep firing timers this long after the last line")] = 30,
    database: Annotated[str | None, typer.Option(help="database URL (default: a temporary SQLite)")] = None,
) -> None:
    """Replay FEED through the pipeline on a virtual clock; write the report as JSON."""
    from careloop.replay import Replayer, build_report, read_feed

    cfg = _load(config)
    try:
        lines = read_feed(feed)
        rp = Replayer(cfg, database_url=database, start=lines[0].at if lines else None)
    except ConfigError as exc:
        _fail(exc.problems)
        return
    try:
        asyncio.run(rp.feed(lines, horizon=timedelta(days=horizon_days)))
        doc = build_report(rp.store)
    except ConfigError as exc:
        _fail(exc.problems)
        return
    finally:
        rp.close()
    from careloop.db import private_file

    private_file(report)  # the report names people's identifiers
    report.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    out.print(
        f"{len(lines)} signals: {len(doc['deliveries'])} deliveries, {len(doc['suppressed'])} suppressed, "
        f"{len(doc['escalations'])} escalations -> {report}"
    )


@app.command()
def demo() -> None:
    """Three synthetic patients through the real pipeline, as a timeline, audit verified."""
    from careloop.demo import main as demo_main

    wide = Console(soft_wrap=False, width=max(out.width, 120))
    raise typer.Exit(demo_main(wide))


@app.command()
def explain(
    person: Annotated[str, typer.Argument(help="internal person id, or an identifier as SYSTEM|VALUE")],
    config: ConfigOpt = None,
) -> None:
    """One person's timeline: events, and each decision with why it was sent or suppressed.
    Showing it is an access to the person's record, audited as ``person.view``."""
    from careloop.explain import audit_view, find_person, render_timeline

    engine = _engine(config)
    pid = find_person(engine, person)
    if pid is not None:
        audit_view(engine, pid, audit_log.cli_actor())
    if pid is None or not render_timeline(engine, pid, out):
        _fail(["person not found"], code=1)  # the argument may be an MRN: not echoed


@dead_app.command("list")
def dead_list(config: ConfigOpt = None, all_: Annotated[bool, typer.Option("--all")] = False) -> None:
    """Dead letters not yet retried ('--all' for every one)."""
    from careloop.deadletters import list_rows

    list_rows(_engine(config), out, include_retried=all_)


@dead_app.command("show")
def dead_show(id: int, config: ConfigOpt = None) -> None:
    from careloop.deadletters import show

    if not show(_engine(config), id, out):
        _fail([f"dead letter {id}: not found"], code=1)


@dead_app.command("retry")
def dead_retry(id: int, config: ConfigOpt = None) -> None:
    """Put the item back in its stage's queue."""
    from careloop.deadletters import retry

    problem = retry(_engine(config), id)
    if problem:
        _fail([problem], code=1)
    out.print(f"dead letter {id}: re-queued")


@held_app.command("list")
def held_list(config: ConfigOpt = None) -> None:
    """Journey events held because linking them to a person would have been a guess."""
    from careloop.held import list_held

    list_held(_engine(config), out)


@held_app.command("assign")
def held_assign(
    event: Annotated[int, typer.Argument(help="the held journey event's id")],
    person: Annotated[int, typer.Argument(help="the internal person id it belongs to")],
    config: ConfigOpt = None,
) -> None:
    """Assign a held EVENT to PERSON and release it to the orchestrator."""
    from careloop.held import assign

    problem = assign(_engine(config), event, person)
    if problem:
        _fail([problem], code=1)
    out.print(f"event {event}: assigned and released")


@mapping_app.command("test")
def mapping_test(
    config: Annotated[Path, typer.Option("--config", "-c")],
    connector: Annotated[str, typer.Option()],
    sample: Annotated[Path, typer.Option()],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Map one sample offline (no store): what events and FHIR resources it yields."""
    from careloop.mapping_test import map_sample

    try:
        doc = map_sample(_load(config), connector, sample.read_bytes())
    except ConfigError as exc:
        _fail(exc.problems)
        return
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        raise typer.Exit(1 if doc.get("errors") else 0)
    for ev in doc["events"]:
        out.print(
            f"{ev['occurred_at']}  {ev['type']:<32} subject={ev['subject']}  ids={len(ev['identifiers'])}"
        )
    for note in doc.get("skipped", []):
        out.print(f"skipped: {note}")
    if doc.get("errors"):
        _fail(doc["errors"], code=1)


# Sub-apps that live in the plugin packages (module path, attribute, command name).
_SUBAPPS = [
    ("connectors.hl7_cli", "app", "hl7"),
    ("connectors.messages_cli", "app", "messages"),
    ("audit.cli", "app", "audit"),
    ("audit.cli", "token_app", "token"),
    ("connectors.fhir_cli", "app", "fhir"),
    ("orchestrator.escalation_cli", "app", "escalations"),
    ("orchestrator.learning_cli", "app", "learning"),
    ("channels.cli", "app", "channels"),
    ("channels.outbox_cli", "app", "outbox"),
]
for _mod, _attr, _name in _SUBAPPS:
    try:
        app.add_typer(getattr(importlib.import_module(_mod), _attr), name=_name)
    except ModuleNotFoundError as exc:  # that capability is not part of this build
        if exc.name != _mod:
            raise


def main() -> None:
    """'careloop': expected failures (a configuration problem, an unreachable host, a
    port in use, a missing file, a message that is not HL7) end with one line on stderr and
    an exit code, never a traceback. The texts are PHI-free by construction: our own errors
    say what and where, not the data; OS errors name hosts, ports and paths."""
    from jinja2 import TemplateError

    from careloop.errors import CareloopError

    try:
        app()
    except ConfigError as exc:
        for p in exc.problems:
            err.print(f"[red]error[/red] {escape(p)}", highlight=False)
        raise SystemExit(2) from None
    except (CareloopError, OSError, TemplateError) as exc:
        err.print(f"[red]error[/red] {escape(_describe(exc))}", highlight=False)
        raise SystemExit(1) from None


def _describe(exc: BaseException) -> str:
    from jinja2 import TemplateError

    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    if isinstance(exc, TemplateError):  # a rendering error may quote a value: the type only
        return f"template error ({type(exc).__name__})"
    return str(exc) or type(exc).__name__


if __name__ == "__main__":
    main()
