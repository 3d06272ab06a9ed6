"""The connector conformance kit: checks every connector passes, as one base test class.

A connector's test module subclasses ``ConnectorConformance`` and fills in the hooks; pytest
runs every check against it:

    class TestMLLPConformance(ConnectorConformance):
        connector_class = MLLPConnector
        config = {"plugin": "hl7v2_mllp", "port": 2575}
        bad_configs = [({"port": 70000}, "port")]
        def samples(self) -> list[tuple[bytes, dict[str, str]]]: ...

The checks: a bad config is rejected naming the field; secrets never appear in the
connector's repr or its config's repr or dump; ``accept`` (the replay entry point, after
transport and signature checks) is deterministic and touches no store; every raw message
it yields names this connector and has a kind of the form ``family:detail``; a payload
accepted twice yields the same dedup keys, so the sink stores it once; and ``health``
answers before ``start``. What a transport does on the wire (ACK only after the commit,
4xx with an OperationOutcome) is tested in each connector's own module, where a real
client speaks to it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from pydantic import ValidationError

from careloop.config import format_errors
from careloop.plugins import build


class ConnectorConformance:
    """Base test class; fill in ``connector_class``, ``config``, ``samples``."""

    connector_class: ClassVar[Any]
    config: ClassVar[dict[str, Any]]
    secrets: ClassVar[tuple[str, ...]] = ()
    # (changes to the valid config, the field the error must name)
    bad_configs: ClassVar[tuple[tuple[dict[str, Any], str], ...]] = ()

    def samples(self) -> list[tuple[bytes, dict[str, str]]]:
        """Payloads as the transport hands them to ``accept`` (body, headers)."""
        raise NotImplementedError  # every subclass provides its own samples

    # ---------------------------------------------------------------- helpers

    def make(self) -> Any:
        cls = self.connector_class
        return build(cls, "conformance", cls.Config.model_validate(self.config))

    # ---------------------------------------------------------------- checks

    def test_bad_config_is_rejected_naming_the_field(self) -> None:
        for change, field in self.bad_configs:
            with pytest.raises(ValidationError) as exc:
                self.connector_class.Config.model_validate({**self.config, **change})
            assert any(p.split(":")[0].endswith(field) for p in format_errors(exc.value)), field

    def test_unknown_keys_are_rejected(self) -> None:
        with pytest.raises(ValidationError) as exc:
            self.connector_class.Config.model_validate({**self.config, "no_such_option": 1})
        assert "no_such_option: unknown key" in format_errors(exc.value)

    def test_secrets_never_in_repr_or_dump(self) -> None:
        conn = self.make()
        shown = repr(conn) + repr(conn.config) + str(conn.config.model_dump())
        for secret in self.secrets:
            assert secret not in shown

    def test_accept_is_deterministic_and_names_the_connector(self) -> None:
        conn = self.make()
        samples = self.samples()
        assert samples, "a conformance test needs at least one sample"
        for body, headers in samples:
            first, again = conn.accept(body, headers), conn.accept(body, headers)
            assert first, "a valid sample yields at least one raw message"
            assert [(r.kind, r.body, r.dedup_key) for r in first] == [
                (r.kind, r.body, r.dedup_key) for r in again
            ]
            for raw in first:
                assert raw.connector == "conformance"
                family, _, detail = raw.kind.partition(":")
                assert family and detail, raw.kind
                assert raw.body, "the raw bytes are kept for inspection and replay"

    def test_health_answers_before_start(self) -> None:
        health = self.make().health()
        assert isinstance(health.ok, bool)
