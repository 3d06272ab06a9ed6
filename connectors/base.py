"""The Connector contract: a transport in.

A connector receives signals from outside, turns each into ``RawIn`` values with
``accept`` (pure: no I/O, also the replay entry point, after transport and signature
checks), hands them to the ``RawSink`` and acknowledges upstream only after
``sink.put`` returned, i.e. after the commit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

from fastapi import APIRouter

from careloop.model import PutResult, RawIn
from careloop.plugins import Health as Health  # the kernel's, shared with channels; importable here as before
from careloop.plugins import PluginConfig


class RawSink(Protocol):
    async def put(self, items: Sequence[RawIn]) -> list[PutResult]:
        """Store ``items`` durably (committed when this returns); duplicates by
        (connector, dedup_key) are not stored again and return the first copy's reply."""
        ...


class Connector(Protocol):
    name: ClassVar[str]
    id: str

    @property
    def Config(self) -> type[PluginConfig]:
        """Read-only, so a connector's own ``PluginConfig`` subclass fits (a settable
        ``ClassVar`` would be invariant)."""
        ...

    def accept(self, body: bytes, headers: Mapping[str, str]) -> Sequence[RawIn]:
        """Turn one received payload into raw messages (a batch file gives several)."""
        ...

    async def start(self, sink: RawSink) -> None: ...

    async def stop(self) -> None: ...

    def health(self) -> Health: ...

    def router(self) -> APIRouter | None:
        """HTTP routes to mount on the app (None for non-HTTP transports)."""
        ...


def connector_attrs(config: Any) -> dict[str, Any]:
    """Non-secret config fields, for logs and status pages."""
    return {k: v for k, v in config.model_dump().items() if "secret" not in k and "password" not in k}
