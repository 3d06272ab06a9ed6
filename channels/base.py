"""The Channel contract: delivery of one outbox item.

A channel declares what it can carry as data (``ChannelCaps``), is built from its
validated Config, and sends one ``OutboxItem`` at a time, idempotently per ``item.key``:
sending the same key twice must not reach the recipient twice (pass the key to providers
that accept one; remember it otherwise). Errors cross the boundary as careloop errors:
``TransientError`` (timeouts, 429, 5xx: retried with backoff), its ``ChannelUnavailable``
(the provider rejected the channel's credentials: the item waits, the attempt not counted)
or ``PermanentError`` (other 4xx, bad address: dead-lettered). Messages hold no PHI.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

from pydantic import Field

from careloop.errors import TransientError
from careloop.plugins import PluginConfig
from careloop.tables import OutboxItem

PhiClass = Literal["none", "limited", "full"]
PHI_ORDER: dict[str, int] = {"none": 0, "limited": 1, "full": 2}

# What a template must provide for a channel: "sms" (short text), "email" (subject, text,
# html), "text" (any text: console, capture), "fhir" or "json" (structured, no template body).
TemplateKind = Literal["sms", "email", "text", "fhir", "json"]
# Which of a person's contact points the channel delivers to.
AddressKind = Literal["phone", "email", "fhir", "none"]


@dataclass(frozen=True, slots=True)
class ChannelCaps:
    template_kind: TemplateKind
    address_kind: AddressKind
    max_phi: PhiClass
    max_length: int | None = None
    receipts: bool = False  # the provider reports delivery later (status callbacks)
    can_query_status: bool = False  # ``status()`` can ask the provider about a key
    # The receiving end de-duplicates on ``item.key`` (FHIR conditional create, Standard
    # Webhooks ``webhook-id``), so sending an item again can never deliver it twice: the
    # outbox may then claim several items per commit and resend an interrupted one.
    idempotent_key: bool = False


class DeliveryUncertain(TransientError):
    """The request may have reached the provider (a read timeout, a dropped connection
    after sending). Retrying blindly could deliver twice, so the outbox keeps the item in
    ``sending`` and settles it through ``Channel.status`` like an interrupted send."""


# ``Channel.status`` answer: the provider confirms it never got the message.
ABSENT = "absent"


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a send returned: ``status`` is queued|sent|delivered|captured."""

    status: str
    provider_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class SentMemory:
    """The receipts of the keys this process sent, newest ``capacity`` only.

    It answers a repeated ``send`` and a ``status`` asked soon after a send whose outcome
    was not committed (recovery comes after the outbox's lease, minutes later). Bounded, so
    a hub that runs for months does not keep every key it ever sent: an evicted key is
    answered from the provider (where it can be asked) or becomes ``unknown`` like any
    interrupted send, never sent blindly."""

    def __init__(self, capacity: int = 50_000) -> None:
        self.capacity = capacity
        self._receipts: OrderedDict[str, Receipt] = OrderedDict()

    def get(self, key: str) -> Receipt | None:
        return self._receipts.get(key)

    def __setitem__(self, key: str, receipt: Receipt) -> None:
        self._receipts[key] = receipt
        self._receipts.move_to_end(key)
        while len(self._receipts) > self.capacity:
            self._receipts.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._receipts

    def __len__(self) -> int:
        return len(self._receipts)


class ChannelConfig(PluginConfig):
    phi_class: PhiClass | None = None  # the most this deployment lets the channel carry
    rate_per_second: float | None = Field(None, gt=0)  # sends per second, every worker together


class Channel(Protocol):
    """A delivery plugin. Besides the methods below a channel may define
    ``health() -> careloop.plugins.Health`` (optional, so not part of this protocol; the
    hub looks for it): ``/readyz`` then lists it as ``channel:<id>``, with the reason when it
    is degraded (its credentials rejected, until a send succeeds). A degraded channel does
    not make the hub unready, as a degraded connector does not: the hub still takes
    everything in and the items wait in the outbox; only ``ok=False`` does. Channels without
    ``health()`` are not listed."""

    name: ClassVar[str]
    capabilities: ClassVar[ChannelCaps]
    id: str

    @property
    def Config(self) -> type[ChannelConfig]:
        """Read-only, so a channel's own ``ChannelConfig`` subclass fits (a settable
        ``ClassVar`` would be invariant)."""
        ...

    async def send(self, item: OutboxItem) -> Receipt:
        """Deliver ``item`` once (idempotent per ``item.key``)."""
        ...

    async def status(self, item: OutboxItem) -> Receipt | None:
        """Ask the provider what became of ``item`` (after a crash mid-send); None if it
        cannot be asked or cannot tell. ``Receipt(ABSENT)`` means the provider confirms
        it never accepted the message, so sending it again is safe."""
        ...

    async def aclose(self) -> None: ...


def max_phi(channel: Channel) -> str:
    """The effective PHI ceiling: the lower of the plugin's and the deployment's."""
    caps = channel.capabilities.max_phi
    cfg = getattr(getattr(channel, "config", None), "phi_class", None)
    if cfg is None:
        return caps
    return cfg if PHI_ORDER[cfg] < PHI_ORDER[caps] else caps
