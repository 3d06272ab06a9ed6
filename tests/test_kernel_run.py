"""``careloop run`` as a process: health and readiness, MLLP in, SIGTERM drains, a restart
resumes, and nothing acknowledged is lost."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml
from sqlmodel import Session, select

from careloop.config import load_raw
from careloop.db import make_engine
from careloop.tables import JourneyEvent, RawMessage
from tests.conftest import FIXTURES, ROOT

HL7 = (FIXTURES / "hl7" / "siu_s12_booked.hl7").read_bytes().split(b"MSH|")[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(tmp_path: Path) -> tuple[Path, int, int]:
    doc = load_raw(FIXTURES / "config" / "example.yaml")
    http, mllp = free_port(), free_port()
    doc["server"]["port"] = http
    doc["connectors"]["adt"]["port"] = mllp
    doc["connectors"]["email"]["port"] = free_port()
    doc["connectors"]["crm"]["mapping"] = str(FIXTURES / "mapping" / "crm.yaml")
    doc["audit"] = {"signing_key": str(tmp_path / "sign.pem"), "token_key": str(tmp_path / "tok.key")}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, http, mllp


def start(cfg: Path, db: str, http: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARELOOP_")}
    env["CARELOOP_DATABASE_URL"] = db
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "careloop.cli", "run", "--config", str(cfg)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=out,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"http://127.0.0.1:{http}/readyz", timeout=1)
            if r.status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, "careloop run exited early; see its log"
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("careloop run did not become ready")


def mllp_message(i: int) -> bytes:
    msg = (b"MSH|" + HL7).replace(b"NW-SIU-0001", f"RUN-{i:05d}".encode())
    return b"\x0b" + msg.rstrip(b"\r") + b"\r\x1c\r"


def send_until_stopped(port: int, n: int, stop_after: int, proc: subprocess.Popen[bytes]) -> list[str]:
    acked: list[str] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for i in range(n):
            if i == stop_after:
                proc.send_signal(signal.SIGTERM)
            try:
                sock.sendall(mllp_message(i))
                buf = b""
                while not buf.endswith(b"\x1c\r"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        return acked
                    buf += chunk
            except OSError:
                return acked
            if b"MSA|AA|" in buf or b"MSA|CA|" in buf:
                acked.append(f"RUN-{i:05d}")
    return acked


def test_sigterm_drains_and_restart_resumes_without_loss(tmp_path: Path) -> None:
    cfg, http, mllp = config(tmp_path)
    db = f"sqlite:///{tmp_path}/run.db"
    log = tmp_path / "run.log"
    proc = start(cfg, db, http, log)
    assert httpx.get(f"http://127.0.0.1:{http}/healthz").json() == {"status": "alive"}
    acked = send_until_stopped(mllp, 400, 150, proc)
    assert proc.wait(timeout=60) == 0
    assert len(acked) >= 150
    engine = make_engine(db)
    with Session(engine) as s:
        stored = {r.dedup_key.rsplit("|", 1)[-1] for r in s.exec(select(RawMessage)).all() if r.dedup_key}
    assert set(acked) <= stored  # every ACKed message is committed
    proc = start(cfg, db, http, log)  # the restart maps whatever was still pending
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with Session(engine) as s:
                pending = s.exec(select(RawMessage).where(RawMessage.status == "pending")).all()
                waiting = s.exec(select(JourneyEvent).where(JourneyEvent.status == "pending")).all()
            if not pending and not waiting:
                break
            time.sleep(0.3)
        with Session(engine) as s:
            raws = s.exec(select(RawMessage)).all()
            events = s.exec(select(JourneyEvent)).all()
        assert all(r.status == "mapped" for r in raws)
        assert len({e.raw_message_id for e in events}) == len(raws) == len(events)  # each mapped once
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    logs = log.read_text()
    assert "draining" in logs and "stopped" in logs
    assert "Testperson" not in logs and "5550101" not in logs  # no PHI in the logs


def test_settle_heap_freezes_what_startup_left_and_collects_the_young_less_often() -> None:
    import gc

    from careloop.runtime import settle_heap

    before = gc.get_threshold()
    try:
        settle_heap(young=12_345)
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (12_345, before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
