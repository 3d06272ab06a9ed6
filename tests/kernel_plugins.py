"""Small plugins for kernel tests: a JSON connector and mapper, and an SMS-like capture
channel. Registered explicitly with careloop.plugins.add by the tests that use them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar

from careloop import plugins
from careloop.errors import PermanentError, SkipMessage
from careloop.model import Identifier, MappedEvent, RawIn
from careloop.plugins import PluginConfig
from careloop.tables import RawMessage
from channels.base import ChannelCaps, ChannelConfig
from channels.capture import CaptureChannel
from connectors.base import Health


class JsonConnector:
    name: ClassVar[str] = "test_json"
    Config: ClassVar[type[PluginConfig]] = PluginConfig

    def __init__(self, id: str, config: PluginConfig) -> None:
        self.id, self.config = id, config

    def accept(self, body: bytes, headers: Mapping[str, str]) -> Sequence[RawIn]:
        doc = json.loads(body)
        return [RawIn(self.id, f"test:{doc.get('type')}", body, "application/json", doc.get("id"))]

    async def start(self, sink: Any) -> None:
        self.sink = sink

    async def stop(self) -> None:
        return None

    def health(self) -> Health:
        return Health(True)

    def router(self) -> None:
        return None


class JsonMapper:
    """{"type", "at", "mrn", "phone"?, "email"?, "appointment"?: {"id", "start", "status"}, ...}"""

    name: ClassVar[str] = "test_json"
    accepts: ClassVar[frozenset[str]] = frozenset({"test:*"})

    def map(self, raw: RawMessage) -> Sequence[MappedEvent]:
        doc = json.loads(raw.body)
        if doc.get("type") == "boom":
            raise PermanentError("this test message cannot be mapped")
        if doc.get("type") == "ignored":
            raise SkipMessage("test type ignored is not mapped")
        ids = [Identifier("urn:test:mrn", doc["mrn"])] if "mrn" in doc else []
        if "phone" in doc:
            ids.append(Identifier("phone", doc["phone"], kind="phone"))
        if "email" in doc:
            ids.append(Identifier("email", doc["email"], kind="email"))
        subject = None
        if "appointment" in doc:
            subject = {"resourceType": "Appointment", "status": "booked", **doc["appointment"]}
        if "encounter" in doc:
            subject = {"resourceType": "Encounter", "status": "in-progress", **doc["encounter"]}
        patient = doc.get("patient")
        return [
            MappedEvent(
                type=doc["type"],
                occurred_at=datetime.fromisoformat(doc["at"]),
                identifiers=ids,
                subject=subject,
                patient=patient,
                attributes=doc.get("attributes", {}),
            )
        ]


class SmsCapture(CaptureChannel):
    name: ClassVar[str] = "test_sms"
    Config: ClassVar[type[ChannelConfig]] = ChannelConfig
    capabilities: ClassVar[ChannelCaps] = ChannelCaps(
        template_kind="sms", address_kind="phone", max_phi="none"
    )


class EmailCapture(CaptureChannel):
    name: ClassVar[str] = "test_email"
    Config: ClassVar[type[ChannelConfig]] = ChannelConfig
    capabilities: ClassVar[ChannelCaps] = ChannelCaps(
        template_kind="email", address_kind="email", max_phi="limited"
    )


def register() -> None:
    plugins.add("connector", "test_json", JsonConnector)
    plugins.add("mapper", "test_json", JsonMapper)
    plugins.add("channel", "test_sms", SmsCapture)
    plugins.add("channel", "test_email", EmailCapture)
