"""The crash test: SIGKILL the deliver stage during a burst of 1,000 SMS to a local
Twilio-compatible server, restart it, and check that no key reached the provider twice
and none is lost (each is delivered, or in a visible state such as ``unknown``)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import Session, select

from careloop.clock import SystemClock
from careloop.db import make_engine, upgrade
from careloop.tables import DeliveryReceipt, OutboxItem, Person
from tests.conftest import ROOT
from tests.fake_twilio import FakeTwilio

N = 1000
WORKER = ROOT / "tests" / "outbox_crash_worker.py"


def _seed(url: str) -> None:
    engine = make_engine(url)
    upgrade(engine)
    now = SystemClock().now()
    with Session(engine) as s:
        person = Person(created_at=now)
        s.add(person)
        s.flush()
        assert person.id is not None
        for i in range(N):
            s.add(
                OutboxItem(
                    key=f"crash-{i:04d}",
                    person_id=person.id,
                    channel="sms",
                    template="appointment-reminder",
                    purpose="treatment",
                    phi_class="none",
                    recipient=f"+1555{i:07d}",
                    content={"text": "Reminder: your visit is tomorrow. Reply C to confirm."},
                    created_at=now,
                )
            )
        s.commit()
    engine.dispose()


def _worker(url: str, base_url: str, mode: str, resend: bool, log: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, str(WORKER), url, base_url, mode] + (["resend"] if resend else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_until(cond: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the burst")
        time.sleep(0.005)


@pytest.fixture
def db_dir(tmp_path: Path) -> Iterator[Path]:
    # SIGKILL loses nothing the OS already has, so the database can live on tmpfs: fsync
    # durability (power loss) is not what this test is about, and it keeps it fast.
    shm = Path("/dev/shm")
    if not shm.is_dir():
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="careloop-crash-", dir=shm))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("kill", ["mid-request", "random"])
def test_sigkill_during_a_burst_delivers_every_key_once(db_dir: Path, kill: str) -> None:
    url = f"sqlite:///{db_dir}/crash.db"
    _seed(url)
    fake = FakeTwilio()
    base_url = fake.start()
    rng = random.Random()
    at = rng.randint(200, 800)
    # "mid-request": the provider records message #at and never answers, so the kill lands
    # exactly between the provider accepting it and our commit. "random": kill at an
    # arbitrary moment of the burst; resend_if_absent lets recovery resend what Twilio
    # never got, so every key must end delivered.
    resend = kill == "random"
    if kill == "mid-request":
        fake.hang_at = at
    proc = _worker(url, base_url, "run", resend, db_dir / "run.log")
    try:
        if kill == "mid-request":
            _wait_until(fake.hung.is_set, 45)
        else:
            _wait_until(lambda: fake.posts >= at, 45)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        engine = make_engine(url)
        with Session(engine) as s:
            in_flight = s.exec(select(OutboxItem.key).where(OutboxItem.status == "sending")).all()
            pending = s.exec(select(OutboxItem.key).where(OutboxItem.status == "pending")).all()
        assert len(in_flight) <= 1  # one item in doubt per worker, never a whole batch
        assert pending, "the kill came after the burst: nothing was tested"
        if kill == "mid-request":
            assert in_flight == [f"crash-{at - 1:04d}"]
        fake.hang_at = None
        fake.release()

        restart = _worker(url, base_url, "recover", resend, db_dir / "recover.log")
        restart.wait(45)
        out = (db_dir / "recover.log").read_text()
        assert restart.returncode == 0, out[-2000:]
        report = json.loads(out.splitlines()[0])
        assert report["adopted"] + report["resend"] + report["unknown"] == len(in_flight)

        counts = fake.keys()
        twice = [k for k, n in counts.items() if n > 1]
        assert twice == [], f"delivered twice: {twice[:5]}"
        with Session(engine) as s:
            final = {r.key: r.status for r in s.exec(select(OutboxItem)).all()}
            recovered = s.exec(select(DeliveryReceipt)).all()
        engine.dispose()
        assert len(final) == N
        lost = [k for k, st in final.items() if st not in ("sent", "unknown")]
        assert lost == [], f"neither delivered nor visible: {lost[:5]}"
        sent = {k for k, st in final.items() if st == "sent"}
        assert sent <= set(counts)  # marked sent => the provider has it
        assert set(counts) - sent <= {k for k, st in final.items() if st == "unknown"}
        if kill == "mid-request":
            # the provider had the in-flight message: recovery adopted it instead of resending
            assert report["adopted"] == 1 and final[in_flight[0]] == "sent"
            assert any(r.detail.get("recovered") for r in recovered)
        assert set(final.values()) == {"sent"} and len(counts) == N
    finally:
        if proc.poll() is None:
            proc.kill()
        fake.stop()
