"""``careloop learning show|evaluate`` (issue 10) read the learned state and the logged
decisions of a real replayed run, on SQLite and PostgreSQL, through the Typer CliRunner.
Neither prints the person's identifiers. Synthetic people only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from typer.testing import CliRunner

from careloop import cli as careloop_cli
from careloop import config as cfgmod
from careloop.tables import AuditRecord, OutreachOutcome, Person
from orchestrator import learning_cli, ope
from tests.test_channels_outbox_cli import cli_db  # noqa: F401  (fixture)
from tests.test_learning_replay import CONFIG, START, WHO, _rounds

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
    assert "P(active)" not in got.output and "link:" not in got.output  # model: beta, no belief
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


def test_evaluate_flags_estimates_resting_on_too_few_matching_sends(cli_db: Engine) -> None:  # noqa: F811
    rp, sent = _rounds(cli_db, 4, replies_on="email")
    rp.close()
    got = runner.invoke(careloop_cli.app, ["learning", "evaluate", "-p", "logged", "-c", str(CONFIG)])
    assert got.exit_code == 0, got.output
    row = next(line for line in got.output.splitlines() if "logged (!)" in line)
    assert row.rstrip(" │").endswith(str(len(sent)))  # 4 sends: an ESS of 4, below MIN_ESS
    none = ope.Estimate("channel:fax", 4, 0.0, 0.0, 0.0, 0.21, 0.05, 0.0, 0.3)  # nothing matched
    assert learning_cli.estimate_row(none)[:4] == ["channel:fax (!)", "-", "-", "-"]
    many = ope.Estimate("greedy", 400, 0.2, 0.01, 0.2, 0.21, 0.01, 250.0, 0.3)
    assert learning_cli.estimate_row(many)[:2] == ["greedy", "0.2000"]


def test_evaluate_refuses_an_unknown_policy_naming_it(cli_db: Engine) -> None:  # noqa: F811
    got = runner.invoke(careloop_cli.app, ["learning", "evaluate", "-p", "telepathy", "-c", str(CONFIG)])
    assert got.exit_code == 2 and "telepathy" in got.output


# --------------------------------------------------------------------------- learning.model: belief


def _belief_config(tmp_path: Path) -> Path:
    """The replay fixture's config with the belief model (its file pins beta)."""
    text = CONFIG.read_text()
    assert "model: beta" in text
    path = tmp_path / "learning-belief.yaml"
    path.write_text(text.replace("model: beta", "model: belief"))
    return path


def _cells(output: str, n: int) -> list[list[str]]:
    """The body rows of every table printed with ``n`` columns, cells as printed."""
    rows = []
    for line in output.splitlines():
        if "│" not in line:
            continue
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == n:
            rows.append(cells)
    return rows


def _belief_tables(output: str) -> tuple[dict[tuple[str, str], list[str]], dict[str, list[str]]]:
    """The history table ((dimension, option) -> [sends, engaged]) and the 3-column rows
    (window or channel -> [belief, prior])."""
    history = {(c[0], c[1]): c[2:] for c in _cells(output, 4) if c[0] in ("channel", "window", "variant")}
    three = {c[0]: c[1:] for c in _cells(output, 3) if c[0] not in ("window", "channel")}
    return history, three


def test_show_with_the_belief_model_prints_its_history_belief_and_link(
    cli_db: Engine,  # noqa: F811
    tmp_path: Path,
) -> None:
    path = _belief_config(tmp_path)
    cfg = cfgmod.load(path)
    rp, sent = _rounds(cli_db, 8, replies_on="email", config=cfg)
    rp.close()
    with Session(cli_db) as s:
        [person] = s.exec(select(Person)).all()
        stored = s.exec(select(OutreachOutcome).where(OutreachOutcome.learned == True)).all()  # noqa: E712
    assert person.id is not None and len(stored) == len(sent)
    got = runner.invoke(careloop_cli.app, ["learning", "show", str(person.id), "-c", str(path)])
    assert got.exit_code == 0, got.output
    history, three = _belief_tables(got.output)
    # the history it reads: every settled learned send, counted as stored
    assert f"({len(stored)} settled sends" in got.output
    for channel in ("sms", "email"):
        rows = [r for r in stored if r.channel == channel]
        engaged = [r for r in rows if r.read_at or r.clicked_at or r.replied_at or r.confirmed_at]
        assert rows, channel  # the learner tried both
        assert history[("channel", channel)] == [str(len(rows)), str(len(engaged))]
    emails = sum(1 for i in sent if i.channel == "email")
    assert history[("channel", "email")] == [str(emails), str(emails)]
    assert history[("channel", "sms")][1] == "0"
    windows = {opt: v for (dim, opt), v in history.items() if dim == "window"}
    assert sum(int(v[0]) for v in windows.values()) == len(stored)
    assert sum(int(v[1]) for v in windows.values()) == emails  # responses by the window they came in
    assert "engaged:" in got.output
    # the belief now: P(each configured window is the active one), summing to 1
    shares = {wn: three[wn] for wn in cfg.learning.windows}
    assert abs(sum(float(v[0]) for v in shares.values()) - 1.0) < 0.002
    assert abs(sum(float(v[1]) for v in shares.values()) - 1.0) < 0.002
    top = max(shares, key=lambda wn: float(shares[wn][0]))
    assert f"P(reply) in the {top} window" in got.output
    # P(reply) per channel: email, where every reply came, above sms and above its own prior
    assert float(three["email"][0]) > float(three["sms"][0])
    assert float(three["email"][0]) > float(three["email"][1])
    assert "link: floor 0.300, slope 1.000, cap 0.990, late 0.300, where 0.075, n 0" in got.output
    assert "posterior mean" not in got.output  # not the beta table
    for value in WHO.values():
        assert value not in got.output
    with Session(cli_db) as s:
        views = s.exec(select(AuditRecord).where(AuditRecord.action == "person.view")).all()
    assert [(v.person_id, v.detail) for v in views] == [(person.id, {"view": "learned-state"})]


@pytest.mark.parametrize("no_channels", [False, True], ids=["site-channels", "no-site-channels"])
def test_show_with_the_belief_model_and_no_sends_prints_the_prior(
    cli_db: Engine,  # noqa: F811
    tmp_path: Path,
    no_channels: bool,
) -> None:
    path = _belief_config(tmp_path)
    if no_channels:  # nothing to show per channel, and nothing to divide by
        text = path.read_text().replace("channels: [sms, email]}", "channels: []}")
        assert "channels: []" in text
        path.write_text(text)
    with Session(cli_db) as s:
        p = Person(created_at=START)
        s.add(p)
        s.commit()
        pid = p.id
    got = runner.invoke(careloop_cli.app, ["learning", "show", str(pid), "-c", str(path)])
    assert got.exit_code == 0, got.output
    history, three = _belief_tables(got.output)
    assert "(0 settled sends" in got.output and history == {}
    shares = [three[wn] for wn in cfgmod.load(path).learning.windows]
    assert len(shares) == 3
    assert abs(sum(float(v[0]) for v in shares) - 1.0) < 0.002
    assert all(v[0] == v[1] for v in shares)  # nothing of theirs: the belief is the prior
    if no_channels:
        assert "sms" not in three and "email" not in three
        return
    assert three["sms"][0] == three["sms"][1] and three["email"][0] == three["email"][1]
