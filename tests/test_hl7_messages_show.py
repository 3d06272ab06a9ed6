"""``careloop messages show``: masking keeps no PHI, unmasking shows the message as sent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from careloop.clock import SystemClock
from careloop.db import make_engine, upgrade
from careloop.ingest import IngestSink
from careloop.store import Store
from connectors import messages_cli
from connectors.hl7v2_mllp import MLLPConfig, MLLPConnector
from tests.hl7_support import adt, msh, seg

runner = CliRunner()


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    url = f"sqlite:///{tmp_path}/show.db"
    monkeypatch.setenv("CARELOOP_DATABASE_URL", url)
    engine = make_engine(url)
    upgrade(engine)
    yield Store(engine, SystemClock())
    engine.dispose()


def _store(store: Store, body: bytes) -> int:
    c = MLLPConnector("adt", MLLPConfig(plugin="hl7v2_mllp"))
    return IngestSink(store).put_sync(c.accept(body, {}))[0].raw_id


def test_show_masks_an_all_digit_prior_mrn_in_mrg(db: Store) -> None:
    body = (
        "\r".join(
            [
                msh("ADT^A40^ADT_A39", "MG1"),
                seg("EVN", {1: "A40", 2: "20260302081500-0500"}),
                seg("PID", {1: "1", 3: "NW300001^^^NWH^MR", 5: "Mergeson^Iva"}),
                seg("MRG", {1: "4417730"}),
            ]
        )
        + "\r"
    ).encode()
    masked = runner.invoke(messages_cli.app, ["show", str(_store(db, body))])
    assert masked.exit_code == 0, masked.output
    assert "4417730" not in masked.output
    assert "MRG|***" in masked.output and "PID|1||***||***" in masked.output


def test_show_unmask_reads_the_body_and_ack_in_their_msh18_charset(db: Store) -> None:
    body = adt("A01", "L1", charset="8859/1").replace(b"Examplar^Dora", "Exámplar^Dóra".encode("latin-1"))
    rid = _store(db, body)
    clear = runner.invoke(messages_cli.app, ["show", str(rid), "--unmask"])
    assert clear.exit_code == 0, clear.output
    assert "Exámplar^Dóra" in clear.output and "\ufffd" not in clear.output
    assert "MSA|AA|L1" in clear.output
