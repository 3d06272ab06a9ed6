"""Durable MLLP ingest against a bare asyncio ACK-echo server, in the same run.

Durable: the careloop MLLP listener with IngestSink over SQLite (WAL,
synchronous=FULL as careloop.db sets it): every ACK is sent after its message committed.
Echo: an asyncio server that frames, reads MSH-10 and answers AA, storing nothing.
Clients run in a separate process (one socket per connection, each waits for the ACK
before sending the next message, as MLLP senders do) and record send->ACK latency.

"listener, no store" is the same listener with a sink that answers from the same writer
thread without storing: the listener's own cost. "msg/commit" is how many messages shared
a commit (group commit across connections).

Run: .venv/bin/python bench/mllp_ingest.py [--messages N]
Targets (issue 3): >= 1,000 msg/s on 1 connection, >= 2,000 on 4, >= 0.4 of echo.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VT, FS_CR = b"\x0b", b"\x1c\r"
TEMPLATE = (ROOT / "fixtures" / "hl7" / "adt_a01_admit.hl7").read_bytes()


def message(conn: int, i: int, run: str) -> bytes:
    return TEMPLATE.replace(b"NW-ADT-0001", f"{run}{conn}-{i:07d}".encode())


# --------------------------------------------------------------------------- client process


def client_main(port: int, conns: int, per_conn: int, run: str) -> None:
    async def one(k: int) -> list[float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        lat = []
        for i in range(per_conn):
            t = time.perf_counter()
            writer.write(VT + message(k, i, run) + FS_CR)
            data = await reader.readuntil(FS_CR)
            lat.append(time.perf_counter() - t)
            if b"MSA|AA|" not in data:
                raise SystemExit(f"not AA: {data[:200]!r}")
        writer.close()
        return lat

    async def all_() -> dict[str, Any]:
        t0 = time.perf_counter()
        lats = await asyncio.gather(*(one(k) for k in range(conns)))
        elapsed = time.perf_counter() - t0
        flat = sorted(x for lat in lats for x in lat)
        return {
            "elapsed": elapsed,
            "n": len(flat),
            "p50": flat[len(flat) // 2],
            "p99": flat[min(len(flat) - 1, int(len(flat) * 0.99))],
        }

    print(json.dumps(asyncio.run(all_())))


def run_clients(port: int, conns: int, per_conn: int, run: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--client", str(port), str(conns), str(per_conn), run],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    res["rate"] = res["n"] / res["elapsed"]
    return res


# --------------------------------------------------------------------------- servers


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    buf = bytearray()
    try:
        while data := await reader.read(65536):
            buf += data
            while (end := buf.find(FS_CR)) >= 0:
                start = buf.find(VT)
                msg = bytes(buf[start + 1 : end])
                del buf[: end + 2]
                ctrl = msg.split(b"\r", 1)[0].split(b"|")[9]
                writer.write(
                    VT
                    + b"MSH|^~\\&|ECHO||||20260101000000||ACK|A"
                    + ctrl
                    + b"|P|2.5.1\rMSA|AA|"
                    + ctrl
                    + b"\r"
                    + FS_CR
                )
            await writer.drain()
    finally:
        writer.close()


class ServerThread:
    """An event loop in a thread hosting the servers under test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class ThreadOnlySink:
    """Answers like a sink that stored everything, from the same writer thread as
    IngestSink (the listener calls ``put_sync`` there): isolates the listener's own cost
    from the store's."""

    def put_sync(self, items: Any) -> Any:
        from careloop.model import PutResult

        return [PutResult(0, False, i.reply) for i in items]

    async def put(self, items: Any) -> Any:
        return await asyncio.to_thread(self.put_sync, items)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- disk floor


def sqlite_commit_rate(directory: str, seconds: float = 2.0) -> float:
    """Bare sqlite3 commits/s of one small row (WAL, synchronous=FULL): the fsync floor
    that bounds one-connection durable ingest, whatever the listener does."""
    import sqlite3

    con = sqlite3.connect(f"{directory}/floor.db", isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, b BLOB)")
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        con.execute("BEGIN IMMEDIATE")
        con.execute("INSERT INTO t (b) VALUES (?)", (TEMPLATE,))
        con.execute("COMMIT")
        n += 1
    con.close()
    return n / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- parse micro-bench


def parse_bench() -> list[tuple[str, float]]:
    import hl7
    from hl7apy.parser import parse_message

    from careloop.hl7v2.parse import decode, parse_bytes, read_header

    msg = TEMPLATE
    text = msg.decode()
    out = []

    def rate(fn: Any, n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return n / (time.perf_counter() - t)

    from connectors.hl7v2_accept import HL7Acceptor
    from connectors.hl7v2_mllp import MLLPConfig, MLLPConnector

    connector = MLLPConnector("bench", MLLPConfig(plugin="hl7v2_mllp"))
    general = HL7Acceptor("bench", connector.clock, "UTC")
    out.append(
        ("MLLP accept + ACK (cached MSH shape, hot path)", rate(lambda: connector._accept(msg, {}), 20000))
    )
    out.append(("HL7Acceptor accept + ACK (general path)", rate(lambda: general.accept(msg, {}), 20000)))
    out.append(("careloop header+decode", rate(lambda: decode(msg, read_header(msg)), 20000)))
    out.append(("careloop full tokenize (parse_bytes)", rate(lambda: parse_bytes(msg), 20000)))
    out.append(("python-hl7 hl7.parse", rate(lambda: hl7.parse(text), 5000)))
    out.append(("hl7apy parse_message", rate(lambda: parse_message(text.replace("\n", "\r")), 100)))
    return out


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=2000, help="messages per scenario")
    args = ap.parse_args()

    from careloop.clock import SystemClock
    from careloop.db import make_engine, upgrade
    from careloop.ingest import IngestSink
    from careloop.store import Store
    from connectors.hl7v2_mllp import MLLPConfig, MLLPConnector

    n = args.messages
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    srv = ServerThread()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        floor_before = sqlite_commit_rate(tmp)
        engine = make_engine(f"sqlite:///{tmp}/bench.db")
        upgrade(engine)
        store = Store(engine, SystemClock())

        echo_port = free_port()

        async def start_echo() -> asyncio.Server:
            return await asyncio.start_server(echo_handler, "127.0.0.1", echo_port)

        echo = srv.call(start_echo())
        for conns in (1, 4):
            run_clients(echo_port, conns, 100, f"WE{conns}")  # warm-up
            results[f"echo x{conns}"] = run_clients(echo_port, conns, n // conns, f"E{conns}")

        async def stop_echo() -> None:
            echo.close()
            await echo.wait_closed()

        srv.call(stop_echo())

        scenarios: list[tuple[str, Any, int]] = [
            ("listener, no store", ThreadOnlySink(), 1),
            ("durable", IngestSink(store), 1),
        ]
        for idx, (label, sink, scale) in enumerate(scenarios):
            connector = MLLPConnector("bench", MLLPConfig(plugin="hl7v2_mllp", port=free_port()))
            srv.call(connector.start(sink))
            for conns in (1, 4):
                tag = f"S{idx}C{conns}-"  # unique control ids: no scenario sees another's as duplicates
                run_clients(connector.port, conns, 100, "W" + tag)
                committer = connector._committer
                commits_before = committer.commits if committer is not None else 0
                res = run_clients(connector.port, conns, n // conns // scale, tag)
                if committer is not None and committer.commits > commits_before:
                    res["per_commit"] = res["n"] / (committer.commits - commits_before)
                results[f"{label} x{conns}"] = res
            srv.call(connector.stop())
        engine.dispose()
        floor_after = sqlite_commit_rate(tmp)
    srv.close()

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average before / after: {load_before} / {load} on {os.cpu_count()} CPUs")
    print(
        f"MLLP ingest, {n} ADT^A01 messages per scenario ({len(TEMPLATE)} bytes each), SQLite WAL "
        "synchronous=FULL, ACK after commit"
    )
    print(
        f"disk floor: bare SQLite commits/s (one row, synchronous=FULL) before/after: "
        f"{floor_before:.0f} / {floor_after:.0f}"
    )
    print(f"{'scenario':32} {'msg/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'msg/commit':>10}")
    for name, r in results.items():
        per_commit = f"{r['per_commit']:10.1f}" if "per_commit" in r else f"{'':10}"
        print(f"{name:32} {r['rate']:9.0f} {r['p50'] * 1000:8.2f} {r['p99'] * 1000:8.2f} {per_commit}")
    for conns, target in ((1, 1000), (4, 2000)):
        d, e = results[f"durable x{conns}"]["rate"], results[f"echo x{conns}"]["rate"]
        ratio = d / e
        verdict = "meets" if d >= target and ratio >= 0.4 else "MISSES"
        print(
            f"durable/echo on {conns} connection(s): {ratio:.2f} (target >= 0.40); "
            f"{d:.0f} msg/s (target >= {target}): {verdict} target"
        )
    print()
    print(f"{'parser (one ADT^A01)':48} {'msg/s':>9}")
    for name, rate in parse_bench():
        print(f"{name:48} {rate:9.0f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
