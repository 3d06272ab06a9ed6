"""'careloop audit ...' ('app') and 'careloop token ...' ('token_app').

Keys live where the config says ('audit.signing_key', 'audit.token_key'), by default in
'var/keys/'. Auditor reads made here are audited like API reads, with the operating-system
user as actor ('cli:<user>').
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from sqlalchemy.engine import Engine

from audit import checkpoint, disclosures, fhir_export, query, retention
from audit.records import iter_db, write_jsonl
from audit.verify import Report, verify_database, verify_export
from careloop import audit_log, tokens
from careloop.clock import SystemClock
from careloop.config import AppConfig, load
from careloop.db import database_url, existing_engine, private_file
from careloop.errors import ConfigError
from careloop.store import Store

app = typer.Typer(help="Audit trail: verify, query, export, checkpoints, keys.", no_args_is_help=True)
token_app = typer.Typer(help="Bearer tokens for the auditor API.", no_args_is_help=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="careloop config file")]


def _cfg(path: Path | None) -> AppConfig | None:
    if path is None:
        return None
    try:
        return load(path)
    except ConfigError as exc:
        _die("\n".join(exc.problems))


def _store(cfg: AppConfig | None) -> Store:
    engine: Engine = existing_engine(database_url(cfg.database.url if cfg else None))
    return Store(engine, SystemClock())


def _die(msg: str, code: int = 2) -> NoReturn:
    typer.echo(msg, err=True)
    raise typer.Exit(code)


def _time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        _die(f"not an ISO-8601 date or time: {value!r}")
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


def _actor() -> str:
    return audit_log.cli_actor()


# --------------------------------------------------------------------------- verify


@app.command()
def verify(
    export: Annotated[
        Path | None, typer.Option(help="verify this JSON Lines export instead of the database")
    ] = None,
    checkpoint_file: Annotated[
        list[Path] | None,
        typer.Option("--checkpoint", help="a checkpoint file kept outside the hub (repeatable)"),
    ] = None,
    public_key: Annotated[Path | None, typer.Option(help="the checkpoint signer's public key (PEM)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    config: ConfigOpt = None,
) -> None:
    """Re-hash the chain, recompute Merkle roots, check signatures and consistency."""
    try:
        saved = [c for f in checkpoint_file or [] for c in checkpoint.load_file(f)]
        keys = [checkpoint.load_public_key(public_key)] if public_key else []
    except ConfigError as exc:
        _die("\n".join(exc.problems))
    if export is not None and not export.is_file():
        _die(f"{export}: file not found")  # a usage error (2), not a failed verification (1)
    cfg = _cfg(config)
    if not keys and export is None:
        path = tokens.signing_key_path(cfg)
        if path.exists():
            keys = [checkpoint.load_private_key(path).public_key()]
            typer.echo(
                f"note: checking signatures with the hub's own key {path}; auditors should pass "
                "--public-key from their own copy",
                err=True,
            )
    if export is not None:
        rep = verify_export(export, saved=saved, public_keys=keys)
    else:
        rep = verify_database(_store(cfg).engine, saved=saved, public_keys=keys)
    _print_report(rep, as_json)
    raise typer.Exit(0 if rep.ok else 1)


def _print_report(rep: Report, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(rep.to_json(), indent=2))
        return
    last = rep.first_seq + rep.records - 1
    typer.echo(f"records verified: {rep.records} (seq {rep.first_seq}..{last})")
    typer.echo(
        f"checkpoints: {rep.checkpoints_checked} roots, {rep.signatures_checked} signatures, "
        f"{rep.consistency_proofs} consistency proofs"
    )
    for w in rep.warnings:
        typer.echo(f"warning: {w}")
    fb = rep.first_bad
    if fb is not None and fb.last is not None:
        # A signed root that does not match says only that some record in its range changed.
        typer.echo(f"FIRST BAD RECORD: somewhere in seq {fb.seq}..{fb.last} ({fb.kind}): {fb.message}")
    elif fb is not None:
        typer.echo(f"FIRST BAD RECORD: seq {fb.seq} ({fb.kind}): {fb.message}")
    for f in rep.faults:
        typer.echo(f"fault: {f}")
    typer.echo("OK" if rep.ok else "FAILED")


# --------------------------------------------------------------------------- query


@app.command("query")
def query_cmd(
    person: Annotated[int | None, typer.Option(help="internal person id")] = None,
    actor: Annotated[str | None, typer.Option()] = None,
    action: Annotated[str | None, typer.Option(help="exact, or a prefix ending in * (message.*)")] = None,
    outcome: Annotated[str | None, typer.Option()] = None,
    since: Annotated[str | None, typer.Option(help="ISO-8601, inclusive")] = None,
    until: Annotated[str | None, typer.Option(help="ISO-8601, exclusive")] = None,
    after: Annotated[int, typer.Option(help="page cursor: the previous page's next_after")] = 0,
    limit: Annotated[int, typer.Option(min=1, max=query.MAX_LIMIT)] = 100,
    fmt: Annotated[str, typer.Option("--format", help="json or csv")] = "json",
    config: ConfigOpt = None,
) -> None:
    """Query the audit log (one page; the query itself is audited)."""
    if fmt not in ("json", "csv"):
        _die("--format must be json or csv")
    store = _store(_cfg(config))
    q = query.AuditQuery(person, actor, action, outcome, _time(since), _time(until), after, limit)
    with store.session() as s:
        page = query.run_query(s, q, actor=_actor(), at=store.clock.now(), via="cli")
    if fmt == "csv":
        query.write_csv(page.records, sys.stdout)
        if page.next_after is not None:
            typer.echo(f"more: --after {page.next_after}", err=True)
    else:
        typer.echo(json.dumps(query.to_json(page), indent=2))


@app.command("disclosures")
def disclosures_cmd(
    person: Annotated[int, typer.Argument(help="internal person id")],
    since: Annotated[str | None, typer.Option(help="default: six years before --until")] = None,
    until: Annotated[str | None, typer.Option(help="default: now")] = None,
    fmt: Annotated[str, typer.Option("--format", help="json or csv")] = "json",
    config: ConfigOpt = None,
) -> None:
    """Accounting of disclosures (45 CFR 164.528) for one patient."""
    if fmt not in ("json", "csv"):
        _die("--format must be json or csv")
    store = _store(_cfg(config))
    with store.session() as s:
        rep = disclosures.accounting(s, person, since=_time(since), until=_time(until), now=store.clock.now())
        # A person row deleted by hand leaves their disclosures in the log: those are still
        # reported. Only an id with neither is unknown, and an empty report would read as
        # "nothing was disclosed" about someone who is not there.
        known = bool(rep.entries) or disclosures.person_exists(s, person)
        filters: dict[str, object] = {"since": rep.since.isoformat(), "until": rep.until.isoformat()}
        if not known:
            # The read is still audited, but tied to no one: the id may be given to a new
            # person later, whose access history this query is not part of.
            filters = {"person": person, **filters}
        query.record_query(
            s,
            actor=_actor(),
            at=store.clock.now(),
            via="cli",
            kind="disclosures",
            person_id=person if known else None,
            filters=filters,
            returned=len(rep.entries),
        )
    if not known:
        _die(f"no person with id {person}", 1)
    if fmt == "csv":
        disclosures.write_csv(rep, sys.stdout)
    else:
        typer.echo(json.dumps(rep.to_json(), indent=2))


# --------------------------------------------------------------------------- export


@app.command()
def export(
    out: Annotated[Path, typer.Option(help="output file")],
    fmt: Annotated[
        str, typer.Option("--format", help="jsonl (records), fhir (Bundle) or checkpoints")
    ] = "jsonl",
    person: Annotated[int | None, typer.Option(help="fhir only: one patient")] = None,
    since: Annotated[str | None, typer.Option(help="fhir only")] = None,
    until: Annotated[str | None, typer.Option(help="fhir only")] = None,
    validate: Annotated[bool, typer.Option(help="fhir only: validate with fhir.resources R4B")] = True,
    config: ConfigOpt = None,
) -> None:
    """Export records (JSON Lines, for `verify --export`), a FHIR AuditEvent Bundle, or checkpoints."""
    cfg = _cfg(config)
    store = _store(cfg)
    private_file(out)  # audit records name people and what was disclosed to them
    with store.session() as s:
        if fmt == "jsonl":
            with out.open("w", encoding="utf-8") as fp:
                n = write_jsonl(iter_db(s.connection()), fp)
            filters: dict[str, object] = {}
        elif fmt == "fhir":
            q = query.AuditQuery(person_id=person, since=_time(since), until=_time(until))
            doc = fhir_export.bundle(query.iter_all(s, q), at=store.clock.now(), person_id=person)
            if validate:
                fhir_export.validate(doc)
            out.write_text(json.dumps(doc, indent=1), encoding="utf-8")
            n, filters = len(doc["entry"]), q.filters()
        elif fmt == "checkpoints":
            path = tokens.signing_key_path(cfg)
            pub = checkpoint.load_private_key(path).public_key() if path.exists() else None
            doc = checkpoint.export(s, pub)
            out.write_text(json.dumps(doc, indent=1), encoding="utf-8")
            n, filters = len(doc["checkpoints"]), {}
        else:
            _die("--format must be jsonl, fhir or checkpoints")
        query.record_query(
            s,
            actor=_actor(),
            at=store.clock.now(),
            via="cli",
            kind=f"export.{fmt}",
            person_id=person if fmt == "fhir" else None,
            filters=filters,
            returned=n,
        )
    typer.echo(f"wrote {n} {'records' if fmt == 'jsonl' else 'entries'} to {out}")


# --------------------------------------------------------------------------- keys and checkpoints


@app.command()
def keygen(
    out: Annotated[Path, typer.Option(help="private key file to create (PEM, mode 0600)")],
    force: Annotated[bool, typer.Option(help="overwrite an existing file")] = False,
) -> None:
    """Create the Ed25519 checkpoint signing key; prints the public key to give to auditors."""
    try:
        key = checkpoint.generate_key(out, overwrite=force)
    except FileExistsError:
        _die(f"{out} exists; pass --force to replace it")
    typer.echo(checkpoint.public_pem(key.public_key()), nl=False)
    typer.echo(f"key id: {checkpoint.key_id(key.public_key())}", err=True)


@app.command("checkpoint")
def checkpoint_cmd(
    key: Annotated[Path | None, typer.Option(help="signing key (default: audit.signing_key)")] = None,
    config: ConfigOpt = None,
) -> None:
    """Sign a checkpoint over every record so far."""
    cfg = _cfg(config)
    try:
        priv = checkpoint.load_private_key(key or tokens.signing_key_path(cfg))
    except ConfigError as exc:
        _die("\n".join(exc.problems))
    store = _store(cfg)
    with store.session() as s:
        cp = checkpoint.make_checkpoint(s, priv, at=store.clock.now())
    if cp is None:
        typer.echo("the audit log is empty; nothing to sign")
        return
    typer.echo(json.dumps(checkpoint.SignedCheckpoint.from_row(cp).to_json(), indent=2))


@app.command()
def prune(
    raw_days: Annotated[int | None, typer.Option(help="blank finished raw messages older than this")] = None,
    audit_records: Annotated[
        bool, typer.Option(help="delete audit records past audit.retention_days")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Apply retention (raw message bodies; audit records only past the configured retention)."""
    cfg = _cfg(config) or AppConfig()
    days = raw_days or cfg.audit.raw_retention_days
    store = _store(cfg)
    now = store.clock.now()
    with store.session() as s:
        if days:
            typer.echo(
                f"raw messages pruned: {retention.prune_raw_messages(s, older_than_days=days, now=now)}"
            )
        if audit_records:
            n = retention.prune_audit_records(s, retention_days=cfg.audit.retention_days, now=now)
            typer.echo(f"audit records pruned: {n}")


# --------------------------------------------------------------------------- tokens


@token_app.command("keygen")
def token_keygen(
    out: Annotated[
        Path | None, typer.Option(help="default: audit.token_key or var/keys/audit-token.key")
    ] = None,
    force: Annotated[bool, typer.Option(help="overwrite (invalidates every issued token)")] = False,
    config: ConfigOpt = None,
) -> None:
    """Create the HS256 secret that signs auditor API tokens."""
    path = out or tokens.token_key_path(_cfg(config))
    try:
        tokens.generate_token_key(path, overwrite=force)
    except FileExistsError:
        _die(f"{path} exists; pass --force to replace it")
    typer.echo(f"wrote {path}")


@token_app.command("issue")
def token_issue(
    role: Annotated[list[str], typer.Option(help="role to grant (repeatable), e.g. auditor")],
    subject: Annotated[str, typer.Option(help="who the token is for (becomes the audit actor)")] = "auditor",
    ttl: Annotated[int, typer.Option(help="lifetime in seconds", min=60)] = 3600,
    key: Annotated[
        Path | None, typer.Option(help="default: audit.token_key or var/keys/audit-token.key")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Print a signed bearer token."""
    path = key or tokens.token_key_path(_cfg(config))
    try:
        secret = tokens.load_token_key(path)
    except ConfigError as exc:
        _die("\n".join(exc.problems))
    try:
        typer.echo(tokens.issue(secret, subject=subject, roles=role, ttl=ttl))
    except ConfigError as exc:
        _die("\n".join(exc.problems))
    expires = datetime.now(UTC) + timedelta(seconds=ttl)
    typer.echo(f"expires {expires.isoformat(timespec='seconds')}", err=True)
