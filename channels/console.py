"""``console``: prints a one-line notice of each delivery (the demo's channel)."""

from __future__ import annotations

from typing import ClassVar

from rich.console import Console

from careloop.tables import OutboxItem
from channels.base import ChannelCaps, ChannelConfig, Receipt


class ConsoleConfig(ChannelConfig):
    show_body: bool = False  # bodies may hold PHI: off unless asked


class ConsoleChannel:
    """Writes to the terminal instead of a provider; no PHI unless ``show_body``."""

    name: ClassVar[str] = "console"
    Config: ClassVar[type[ConsoleConfig]] = ConsoleConfig
    capabilities: ClassVar[ChannelCaps] = ChannelCaps(
        template_kind="text", address_kind="none", max_phi="full"
    )

    def __init__(self, id: str, config: ConsoleConfig, console: Console | None = None) -> None:
        self.id, self.config = id, config
        self._console = console or Console(stderr=True)
        self._seen: set[str] = set()

    async def send(self, item: OutboxItem) -> Receipt:
        if item.key not in self._seen:
            self._seen.add(item.key)
            line = f"[{self.id}] person {item.person_id}: {item.template}"
            if self.config.show_body:
                line += f" — {item.content.get('text', '')}"
            self._console.print(line, markup=False, highlight=False)
        return Receipt("delivered", provider_id=item.key)

    async def status(self, item: OutboxItem) -> Receipt | None:
        return Receipt("delivered", provider_id=item.key) if item.key in self._seen else None

    async def aclose(self) -> None:
        return None
