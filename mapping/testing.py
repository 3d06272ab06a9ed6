"""The mapper conformance kit: checks every mapper passes, as one base test class.

    class TestHL7v2MapperConformance(MapperConformance):
        mapper_class = HL7v2Mapper
        phi = ("Testperson", "5550101")
        def samples(self) -> list[RawMessage]: ...
        def unmapped(self) -> list[RawMessage]: ...   # valid input it does not map

The checks: ``map`` is pure (the same input gives the same events, and the input is not
changed); every event has a type from the controlled vocabulary, an aware time and at least
one identifier; subjects are FHIR resources with a type and an id; a valid message it does
not map raises ``SkipMessage`` whose reason holds none of the sample's PHI.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from careloop.errors import SkipMessage
from careloop.model import is_known_event_type
from careloop.tables import RawMessage


class MapperConformance:
    mapper_class: ClassVar[Any]
    phi: ClassVar[tuple[str, ...]] = ()  # strings from the samples that must never leak

    def samples(self) -> list[RawMessage]:
        raise NotImplementedError  # every subclass provides its own samples

    def unmapped(self) -> list[RawMessage]:
        return []

    def test_map_is_pure_and_repeatable(self) -> None:
        mapper = self.mapper_class()
        for raw in self.samples():
            before = (raw.kind, bytes(raw.body), dict(raw.headers))
            first, again = mapper.map(raw), mapper.map(raw)
            assert [(e.type, e.occurred_at, e.subject, e.identifiers) for e in first] == [
                (e.type, e.occurred_at, e.subject, e.identifiers) for e in again
            ]
            assert (raw.kind, bytes(raw.body), dict(raw.headers)) == before

    def test_events_are_well_formed(self) -> None:
        mapper = self.mapper_class()
        for raw in self.samples():
            events = mapper.map(raw)
            assert events, f"sample {raw.id} maps to nothing"
            for ev in events:
                assert is_known_event_type(ev.type), ev.type
                assert ev.occurred_at.tzinfo is not None
                assert ev.identifiers, f"{ev.type} names nobody"
                if ev.subject is not None:
                    assert ev.subject.get("resourceType") and ev.subject.get("id")

    def test_unmapped_input_is_skipped_with_a_phi_free_reason(self) -> None:
        mapper = self.mapper_class()
        for raw in self.unmapped():
            with pytest.raises(SkipMessage) as exc:
                mapper.map(raw)
            assert str(exc.value)
            for needle in self.phi:
                assert needle not in str(exc.value)
