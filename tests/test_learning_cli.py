"""``careloop learning show|evaluate`` (issue 10) read the learned state and the logged
decisions of a real replayed run, on SQLite and PostgreSQL, through the Typer CliRunner.
Neither prints the person's identifiers. Synthetic people only."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from typer.testing import CliRunner

from careloop import cli as careloop_cli
from careloop.tables import AuditRecord, Person
from tests.test_channels_outbox_cli import cli_db  # noqa: F401  (fixture)
from tests.test_learning_replay import CONFIG, WHO, _rounds

runner = CliRunner()


def _rows(output: str) -> dict[tuple[str, str], list[str]]:
    """The table's body rows keyed by (dimension, option); cells as printed."""
    out: dict[tuple[str, str], list[str]] = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 6 and cells[0] in ("channel", "window", "variant"):
            out[(cells[0], cells[1])] = cells[2:]
    return out


def test_show_prints_each_options_posterior_and_the_persons_counts(cli_db: Engine) -> None:  # noqa: F811
    rp, sent = _rounds(cli_db, 8, replies_on="email")
    rp.close()
    with Session(cli_db) as s:
        [person] = s.exec(select(Person)).all()
    assert person.id is not None
    got = runner.invoke(careloop_cli.app, ["learning", "show", str(person.id), "-c", str(CONFIG)])
    assert got.exit_code == 0, got.output
    rows = _rows(got.output)
    emails = sum(1 for i in sent if i.channel == "email")
    smses = len(sent) - emails
    assert emails and smses  # the learner tried both, so both rows carry the person's counts
    # columns: posterior mean, segment mean, sends, engaged
    assert rows[("channel", "email")][2:] == [str(emails), str(emails)]
    assert rows[("channel", "sms")][2:] == [str(smses), "0"]
    assert float(rows[("channel", "email")][0]) > float(rows[("channel", "sms")][0])
    # a window's engaged counts the replies that came in its hours: never more than all of them
    windows = [v for (dim, _), v in rows.items() if dim == "window"]
    assert windows and sum(int(v[3]) for v in windows) == emails
    assert "engaged:" in got.output  # the caption says what the column counts
    for value in WHO.values():
        assert value not in got.output
    with Session(cli_db) as s:  # showing it was an access to the person's record, audited
        views = s.exec(select(AuditRecord).where(AuditRecord.action == "person.view")).all()
    assert [(v.person_id, v.detail) for v in views] == [(person.id, {"view": "learned-state"})]


def test_show_unknown_person_exits_1(cli_db: Engine) -> None:  # noqa: F811
    got = runner.invoke(careloop_cli.app, ["learning", "show", "424242", "-c", str(CONFIG)])
    assert got.exit_code == 1 and "no person 424242" in got.output


def test_evaluate_estimates_the_logged_policy_at_its_logged_mean(cli_db: Engine) -> None:  # noqa: F811
    rp, sent = _rounds(cli_db, 8, replies_on="email")
    rp.close()
    got = runner.invoke(careloop_cli.app, ["learning", "evaluate", "--json", "-c", str(CONFIG)])
    assert got.exit_code == 0, got.output
    ests: list[dict[str, Any]] = json.loads(got.output)
    by = {e["policy"]: e for e in ests}
    assert set(by) == {"logged", "greedy", "fixed", "uniform"}
    assert by["logged"]["ips"] == pytest.approx(by["logged"]["logged_mean"])
    assert all(e["n"] == len(sent) for e in ests)
    table = runner.invoke(careloop_cli.app, ["learning", "evaluate", "-c", str(CONFIG)])
    assert table.exit_code == 0 and f"over {len(sent)} learned sends" in table.output


def test_evaluate_refuses_an_unknown_policy_naming_it(cli_db: Engine) -> None:  # noqa: F811
    got = runner.invoke(careloop_cli.app, ["learning", "evaluate", "-p", "telepathy", "-c", str(CONFIG)])
    assert got.exit_code == 2 and "telepathy" in got.output
