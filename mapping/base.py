"""The Mapper contract: raw message -> canonical events, as a pure function."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol

from careloop.model import MappedEvent
from careloop.tables import RawMessage


class Mapper(Protocol):
    """Maps one stored raw message to journey events. Pure: no I/O, no clock.

    ``accepts`` lists the raw kinds it maps (``"hl7v2:SIU^S12"``) or a family
    (``"hl7v2:*"``). Raise ``SkipMessage`` for a valid message with nothing to map, and
    ``PermanentError`` (PHI-free message) for one that cannot be mapped.
    """

    name: ClassVar[str]
    accepts: ClassVar[frozenset[str]]

    def map(self, raw: RawMessage) -> Sequence[MappedEvent]: ...


def accepts(mapper: type[Mapper] | Mapper, kind: str) -> bool:
    family = kind.split(":", 1)[0] + ":*"
    return kind in mapper.accepts or family in mapper.accepts
