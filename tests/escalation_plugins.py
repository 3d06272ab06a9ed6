"""Test plugins for escalation replays: the kernel's JSON connector with a mapper that
also links a FHIR Patient id (as the FHIR mappers do), so EHR Tasks have a patient."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import ClassVar

from careloop import plugins
from careloop.model import Identifier, MappedEvent
from careloop.tables import RawMessage
from tests.kernel_plugins import JsonConnector, JsonMapper
from tests.kernel_plugins import register as register_kernel

EHR_PATIENT = "http://127.0.0.1:8090/fhir/Patient"


class FhirJsonMapper(JsonMapper):
    """JsonMapper plus ``"fhir_patient": "<id>"`` -> ``Identifier(<base>/Patient, id, kind="fhir")``.
    Chosen by ``FhirJsonConnector`` only, never by message kind."""

    accepts: ClassVar[frozenset[str]] = frozenset()

    def map(self, raw: RawMessage) -> Sequence[MappedEvent]:
        out = list(super().map(raw))
        pid = json.loads(raw.body).get("fhir_patient")
        for ev in out:
            if pid:
                ev.identifiers.append(Identifier(EHR_PATIENT, str(pid), kind="fhir"))
        return out


class FhirJsonConnector(JsonConnector):
    name: ClassVar[str] = "test_json_fhir"

    def mapper_choice(self) -> plugins.MapperChoice:
        return plugins.MapperChoice("test_json_fhir")


def register() -> None:
    register_kernel()
    plugins.add("connector", "test_json_fhir", FhirJsonConnector)
    plugins.add("mapper", "test_json_fhir", FhirJsonMapper)
