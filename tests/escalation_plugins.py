"""Capture channels for escalation tests: a FHIR write-back and a team webhook (their
capabilities are what matter in replay, where every channel captures)."""

from __future__ import annotations

from typing import ClassVar

from careloop import plugins
from channels.base import ChannelCaps, ChannelConfig
from channels.capture import CaptureChannel
from tests.kernel_plugins import register as register_kernel


class FhirCapture(CaptureChannel):
    name: ClassVar[str] = "test_fhir"
    Config: ClassVar[type[ChannelConfig]] = ChannelConfig
    capabilities: ClassVar[ChannelCaps] = ChannelCaps(
        template_kind="fhir", address_kind="none", max_phi="full"
    )


class WebhookCapture(CaptureChannel):
    name: ClassVar[str] = "test_webhook"
    Config: ClassVar[type[ChannelConfig]] = ChannelConfig
    capabilities: ClassVar[ChannelCaps] = ChannelCaps(
        template_kind="json", address_kind="none", max_phi="none"
    )


def register() -> None:
    register_kernel()
    plugins.add("channel", "test_fhir", FhirCapture)
    plugins.add("channel", "test_webhook", WebhookCapture)
