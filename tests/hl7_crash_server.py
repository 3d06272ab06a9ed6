"""An MLLP listener over a SQLite file, for the crash test: ``python -m tests.hl7_crash_server DB PORT``.

Prints READY once listening, then serves until killed (the test SIGKILLs it)."""

from __future__ import annotations

import asyncio
import sys

from careloop.clock import SystemClock
from careloop.db import make_engine, upgrade
from careloop.ingest import IngestSink
from careloop.store import Store
from connectors.hl7v2_mllp import MLLPConfig, MLLPConnector


async def main(db: str, port: int) -> None:
    engine = make_engine(f"sqlite:///{db}")
    upgrade(engine)
    connector = MLLPConnector("adt", MLLPConfig(plugin="hl7v2_mllp", port=port, idle_timeout_s=30))
    await connector.start(IngestSink(Store(engine, SystemClock())))
    print("READY", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
