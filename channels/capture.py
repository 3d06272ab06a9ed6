"""``capture``: records each delivery in memory instead of sending (replay and tests)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from careloop.tables import OutboxItem
from channels.base import ChannelCaps, ChannelConfig, Receipt


@dataclass(frozen=True, slots=True)
class Captured:
    key: str
    channel: str
    person_id: int
    template: str
    recipient: str
    content: dict[str, Any]


class CaptureChannel:
    """Keeps what would have been sent; the same key twice is kept once."""

    name: ClassVar[str] = "capture"
    Config: ClassVar[type[ChannelConfig]] = ChannelConfig
    capabilities: ClassVar[ChannelCaps] = ChannelCaps(
        template_kind="text", address_kind="none", max_phi="full", idempotent_key=True
    )

    def __init__(self, id: str, config: ChannelConfig, imitate: ChannelCaps | None = None) -> None:
        self.id, self.config = id, config
        self.captured: dict[str, Captured] = {}
        if imitate is not None:  # in replay, capture stands in for a real channel
            # What the gate sees is the real channel's; sending twice keeps one (by key).
            self.capabilities = replace(imitate, idempotent_key=True)  # type: ignore[misc]

    async def send(self, item: OutboxItem) -> Receipt:
        key = item.key
        if key not in self.captured:
            self.captured[key] = Captured(
                key, self.id, item.person_id, item.template, item.recipient, dict(item.content)
            )
        return Receipt("captured", provider_id=key)

    async def status(self, item: OutboxItem) -> Receipt | None:
        return Receipt("captured", provider_id=item.key) if item.key in self.captured else None

    async def aclose(self) -> None:
        return None
