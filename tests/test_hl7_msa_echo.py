"""MSA-2 echoes MSH-10 exactly as sent, escape sequences included, on both the listener's
fast path and the general path, so the ACK keeps its structure and the sender can match it."""

from __future__ import annotations

import pytest

from careloop.clock import SystemClock
from connectors.hl7v2_accept import HL7Acceptor
from connectors.hl7v2_mllp import MLLPConfig, MLLPConnector
from tests.hl7_support import adt


@pytest.mark.parametrize("control_id", ["C\\F\\3", "C\\T\\2", "C\\S\\5", "PLAIN-1"])
def test_msa_2_is_msh_10_as_written(control_id: str) -> None:
    body = adt("A01", control_id)
    general = HL7Acceptor("adt", SystemClock(), "UTC").accept(body, {}).items[0]
    fast = MLLPConnector("adt", MLLPConfig(plugin="hl7v2_mllp"))._accept(body, {}).items[0]
    for item in (general, fast):
        assert item.reply is not None
        msa = item.reply.decode().split("\r")[1]
        assert msa == f"MSA|AA|{control_id}"
    assert general.dedup_key == fast.dedup_key == f"NWADT|NORTHWIND|{control_id}"
