"""Kill the MLLP listener (SIGKILL) at random points during a stream; nothing ACKed is lost
or stored twice, and mapping produces each message's event exactly once."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import func
from sqlmodel import Session, col, select

from careloop.clock import SystemClock
from careloop.db import make_engine
from careloop.pipeline import MapStage
from careloop.store import Store
from careloop.tables import JourneyEvent, RawMessage
from mapping.hl7v2 import HL7v2Mapper
from tests.hl7_support import adt, frame, msa, read_frame, seg, siu

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = 2000
# One identifier only: the test is about durability, not identity linking (which it would slow).
PID = seg("PID", {1: "1", 3: "NWCRASH1^^^NWH^MR", 5: "Crashtest^Cora"})
CLIENTS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(db: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.hl7_crash_server", str(db), str(port)], cwd=ROOT, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == b"READY", "the listener did not start"
    return proc


def _client(port: int, ids: list[str], acked: list[str], reconnects: list[int]) -> None:
    """Sends each message until it is ACKed AA; reconnects and resends after any failure."""
    i, sock, buf = 0, None, bytearray()
    deadline = time.monotonic() + 240
    while i < len(ids) and time.monotonic() < deadline:
        ctrl = ids[i]
        body = siu("S12", ctrl, pid=PID) if i % 2 else adt("A01", ctrl, pid=PID)
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                buf.clear()
            sock.sendall(frame(body))
            code, echoed = msa(read_frame(sock, buf))
            assert echoed == ctrl and code == "AA", (code, echoed, ctrl)
            acked.append(ctrl)
            i += 1
        except OSError:
            if sock is not None:
                sock.close()
            sock = None
            reconnects.append(i)  # the same message is sent again on the next connection
            time.sleep(0.02)
    if sock is not None:
        sock.close()


def test_sigkill_during_a_stream_loses_nothing_acked_and_maps_each_message_once(tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    db, port = tmp_path / "crash.db", _free_port()
    t0 = time.monotonic()
    proc = _start(db, port)
    per = MESSAGES // CLIENTS
    ids = [[f"CR{k}-{i:05d}" for i in range(per)] for k in range(CLIENTS)]
    acked: list[str] = []
    reconnects: list[int] = []
    # Mapping runs alongside the stream (as in the hub), in small batches so it holds the
    # SQLite write lock only briefly; the final drain below maps whatever is left.
    engine = make_engine(f"sqlite:///{db}")
    store = Store(engine, SystemClock())
    mapper = HL7v2Mapper()
    stage = MapStage(store, lambda raw: mapper, batch=10)
    streaming = threading.Event()
    streaming.set()

    def map_while_streaming() -> None:
        while streaming.is_set():
            try:
                if stage.run_once_sync() == 0:
                    time.sleep(0.05)
            except Exception:  # the schema may not exist yet on the very first pass
                time.sleep(0.1)

    mapping = threading.Thread(target=map_while_streaming)
    mapping.start()
    threads = [
        threading.Thread(target=_client, args=(port, ids[k], acked, reconnects)) for k in range(CLIENTS)
    ]
    for t in threads:
        t.start()
    kills = 0
    # Kill when the stream has reached random points (by messages ACKed, not by time: a fast
    # or a loaded machine would otherwise end the stream before three kills), each a few
    # random milliseconds later so it lands mid-commit or mid-ACK.
    marks = sorted(int(MESSAGES * rng.uniform(0.1, 0.8)) for _ in range(3))
    try:
        while any(t.is_alive() for t in threads):
            time.sleep(0.005)
            if kills >= 3 or len(acked) < marks[kills]:
                continue
            time.sleep(rng.uniform(0.0, 0.05))
            proc.kill()  # SIGKILL: no cleanup, mid-commit or mid-ACK
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
            kills += 1
            proc = _start(db, port)
        for t in threads:
            t.join()
    finally:
        streaming.clear()
        mapping.join()
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    print(f"stream phase {time.monotonic() - t0:.1f}s, kills {kills}, reconnects {len(reconnects)}")
    assert kills >= 3, f"seed {seed}: the stream ended before enough kills"
    assert len(acked) == MESSAGES, f"seed {seed}: some messages were never ACKed"
    assert reconnects, f"seed {seed}: no message was reconnects after a kill"

    try:
        with Session(engine) as s:
            keys = Counter(k.rsplit("|", 1)[-1] for k in s.exec(select(RawMessage.dedup_key)).all() if k)
        assert set(keys) == set(acked), f"seed {seed}"
        assert all(n == 1 for n in keys.values()), f"seed {seed}: a message was stored twice"

        t1 = time.monotonic()
        while stage.run_once_sync():
            pass
        assert stage.run_once_sync() == 0
        print(f"mapping phase {time.monotonic() - t1:.1f}s")
        with Session(engine) as s:
            per_raw = s.exec(
                select(JourneyEvent.raw_message_id, func.count()).group_by(col(JourneyEvent.raw_message_id))
            ).all()
            controls = Counter(e.attributes["control_id"] for e in s.exec(select(JourneyEvent)).all())
        assert len(per_raw) == MESSAGES and all(n == 1 for _, n in per_raw)
        assert set(controls) == set(acked) and all(n == 1 for n in controls.values())
    finally:
        engine.dispose()
