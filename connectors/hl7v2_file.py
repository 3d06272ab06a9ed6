"""HL7 v2 files dropped in a directory: single messages, back-to-back messages or batches.

Each ``*.hl7`` file is read, its messages are committed to the store, and only then is the
file moved to ``done/`` (every message accepted) or ``error/`` (unreadable, or a message
answered AE or AR, e.g. undecodable bytes, also when the file is seen again; those messages
are still stored for inspection). An unreadable file is not stored; a PHI-free reason is
written next to it in ``error/``. If the store fails the file stays where it is and is tried
again on the next scan. A crash between
the commit and the move is harmless: the file is read again and its messages are
duplicates (same MSH-3, MSH-4, MSH-10), which are not stored twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from careloop.clock import Clock, SystemClock
from careloop.config import TimeZoneName
from careloop.hl7v2.parse import HL7FormatError
from careloop.model import RawIn
from careloop.plugins import PluginConfig
from connectors.base import Health, RawSink
from connectors.hl7v2_accept import HL7Acceptor

log = logging.getLogger("careloop.connectors.hl7v2_file")


class FileConfig(PluginConfig):
    plugin: str = "hl7v2_file"
    directory: Path
    pattern: str = "*.hl7"
    done_dir: Path | None = Field(None, description="default: <directory>/done")
    error_dir: Path | None = Field(None, description="default: <directory>/error")
    poll_interval_s: float = Field(1.0, gt=0)
    min_age_s: float = Field(0.5, ge=0, description="skip files modified more recently (still being written)")
    max_file_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    timezone: TimeZoneName | None = Field(
        None, description="zone for timestamps without offset; default: site"
    )


class FileConnector:
    """Watches a directory for HL7 v2 files and moves each to done/ or error/ after commit."""

    name: ClassVar[str] = "hl7v2_file"
    Config: ClassVar[type[FileConfig]] = FileConfig

    def __init__(
        self, id: str, config: FileConfig, clock: Clock | None = None, app_config: Any = None
    ) -> None:
        self.id, self.config = id, config
        self.clock: Clock = clock or SystemClock()
        site_tz = getattr(getattr(app_config, "site", None), "timezone", None)
        self.timezone: str = config.timezone or site_tz or "UTC"
        self.done_dir = config.done_dir or config.directory / "done"
        self.error_dir = config.error_dir or config.directory / "error"
        self._acceptor = HL7Acceptor(id, self.clock, self.timezone)
        self._task: asyncio.Task[None] | None = None
        self._sink: RawSink | None = None
        self._lock = asyncio.Lock()
        self.files_done = self.files_error = self.store_failures = 0

    def accept(self, body: bytes, headers: Mapping[str, str]) -> list[RawIn]:
        return self._acceptor.accept(body, headers).items

    async def start(self, sink: RawSink) -> None:
        self._sink = sink
        for d in (self.config.directory, self.done_dir, self.error_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def health(self) -> Health:
        ok = self._task is not None and not self._task.done()
        return Health(
            ok, f"done={self.files_done} error={self.files_error} store_failures={self.store_failures}"
        )

    def router(self) -> None:
        return None

    async def _run(self) -> None:
        while True:
            try:
                await self.scan_once()
            except Exception as exc:  # keep watching; the next scan retries
                log.warning("connector %s: scan failed: %s", self.id, type(exc).__name__)
            await asyncio.sleep(self.config.poll_interval_s)

    async def scan_once(self) -> int:
        """Process every ready file once; returns how many files were moved."""
        async with self._lock:  # the watcher and an explicit scan never work on one file together
            return await self._scan()

    async def _scan(self) -> int:
        assert self._sink is not None, "start() was not called"
        now = time.time()
        moved = 0
        files = sorted(p for p in self.config.directory.glob(self.config.pattern) if p.is_file())
        for path in files:
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if now - st.st_mtime < self.config.min_age_s:
                continue
            if st.st_size > self.config.max_file_bytes:
                self._move(
                    path, self.error_dir, f"the file is larger than {self.config.max_file_bytes} bytes"
                )
                moved += 1
                continue
            data = path.read_bytes()
            try:
                accepted = self._acceptor.accept(data, {"file": path.name})
            except HL7FormatError as exc:
                self._move(path, self.error_dir, str(exc))
                moved += 1
                continue
            try:
                await self._sink.put(accepted.items)
            except Exception as exc:
                self.store_failures += 1
                log.warning(
                    "connector %s: store failed for a file, will retry: %s", self.id, type(exc).__name__
                )
                return moved
            # A message kept with an error ACK has a dedup key over its bytes, so the same file
            # seen again (a crash before the move, a file dropped twice) holds duplicates of
            # those error messages: it goes to error/ again, as the first time.
            acks = sorted({item.headers["hl7_ack"] for item in accepted.items if "hl7_error" in item.headers})
            errors = sum("hl7_error" in item.headers for item in accepted.items)
            if errors:
                self._move(
                    path,
                    self.error_dir,
                    f"{errors} message(s) stored with an error ACK ({', '.join(acks)})",
                )
            else:
                self._move(path, self.done_dir, None)
            moved += 1
        return moved

    def _move(self, path: Path, target: Path, reason: str | None) -> None:
        target.mkdir(parents=True, exist_ok=True)
        dest = target / path.name
        if dest.exists():  # a file of the same name was processed before: keep both
            dest = target / f"{path.stem}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}{path.suffix}"
        os.replace(path, dest)
        if reason is None:
            self.files_done += 1
        else:
            self.files_error += 1
            dest.with_name(dest.name + ".error.txt").write_text(reason + "\n", encoding="utf-8")
