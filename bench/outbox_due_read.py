"""The deliver stage's due read on PostgreSQL: the one-range read it replaced (the baseline:
``ORDER BY next_attempt_at NULLS FIRST, id``, which PostgreSQL's ``ix_outbox_due``, NULLs
last, cannot serve) against ``channels.outbox._DUE`` (two index-ordered halves). A fresh
schema holds N pending and N sent rows, interleaved, the pending ones due at times that are
not in id order (and, in a second round, a few untimed). Prints each read's median
``EXPLAIN ANALYZE`` execution time, whether its plan uses ``ix_outbox_due``, and the ratio;
checks both return the same rows; asserts no timing.

    CARELOOP_BENCH_DATABASE_URL=postgresql+psycopg://... .venv/bin/python bench/outbox_due_read.py [N]

(``CARELOOP_TEST_DATABASE_URL`` serves too; with neither set it says so and exits.)
"""

from __future__ import annotations

import os
import statistics
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, or_, text
from sqlalchemy import select as select_core
from sqlalchemy.engine import Connection
from sqlmodel import Session

from careloop.db import make_engine, upgrade
from careloop.tables import OutboxItem, Person
from channels.outbox import _DUE

_OUTBOX = OutboxItem.__table__  # type: ignore[attr-defined]
BASELINE = (
    select_core(_OUTBOX.c.id, _OUTBOX.c.channel)
    .where(
        _OUTBOX.c.status == "pending",
        or_(
            _OUTBOX.c.next_attempt_at.is_(None),
            _OUTBOX.c.next_attempt_at <= bindparam("now", type_=_OUTBOX.c.next_attempt_at.type),
        ),
    )
    .order_by(_OUTBOX.c.next_attempt_at.asc().nulls_first(), _OUTBOX.c.id)
    .limit(bindparam("n"))
)
RUNS = 15
BATCH = 50


def fill(c: Connection, n: int, untimed: int, now: datetime) -> None:
    """``n`` pending rows (the first ``untimed`` with no time, the others due within the
    last day, in no id order) interleaved with ``n`` sent ones; one synthetic person."""
    with Session(bind=c) as s:
        person = Person(created_at=now)
        s.add(person)
        s.flush()
        pid = person.id
    c.execute(
        text(
            """
            INSERT INTO outbox (key, person_id, channel, template, purpose, phi_class,
                recipient, content, created_at, status, attempts, next_attempt_at)
            SELECT 'bench-' || i, :pid, 'sms', 'appointment-reminder', 'treatment', 'none',
                'bench-recipient', '{}', :now,
                CASE WHEN i % 2 = 0 THEN 'pending' ELSE 'sent' END, 0,
                CASE WHEN i % 2 = 0 AND i / 2 < :untimed THEN NULL
                     ELSE :now - make_interval(secs => ((i * 7919) % 86400) + 1) END
            FROM generate_series(0, 2 * :n - 1) AS i
            """
        ),
        {"pid": pid, "now": now, "untimed": untimed, "n": n},
    )
    c.execute(text("ANALYZE outbox"))


def explain(c: Connection, stmt: Any, params: dict[str, Any]) -> tuple[float, bool, list[Any]]:
    """Execution time (ms), whether the plan uses ``ix_outbox_due``, and the rows."""
    compiled = stmt.compile(dialect=c.dialect)
    sql, args = str(compiled), compiled.construct_params(params)
    plan = c.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, args).scalar()
    assert plan is not None
    return (
        float(plan[0]["Execution Time"]),
        "ix_outbox_due" in str(plan),
        [tuple(r) for r in c.exec_driver_sql(sql, args)],
    )


def measure(url: str, n: int, untimed: int) -> None:
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = make_engine(url)
    with admin.begin() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        engine = make_engine(url, schema=schema)
        upgrade(engine)
        now = datetime.now(UTC)
        with engine.begin() as c:
            fill(c, n, untimed, now)
        params = {"now": now, "n": BATCH}
        times: dict[str, list[float]] = {"baseline": [], "due": []}
        index: dict[str, bool] = {}
        got: dict[str, list[Any]] = {}
        with engine.connect() as c:
            for _ in range(RUNS + 1):  # the first round warms up, and is not counted
                for name, stmt in (("baseline", BASELINE), ("due", _DUE)):
                    ms, index[name], got[name] = explain(c, stmt, params)
                    times[name].append(ms)
        engine.dispose()
        assert got["baseline"] == got["due"], "the two reads disagree"
        med = {name: statistics.median(t[1:]) for name, t in times.items()}
        print(f"{n} pending + {n} sent, {untimed} untimed, batch {BATCH}, median of {RUNS}:")
        for name in ("baseline", "due"):
            print(f"  {name:8s} {med[name]:8.3f} ms  uses ix_outbox_due: {index[name]}")
        print(f"  ratio baseline/due: {med['baseline'] / med['due']:.1f}x (same {len(got['due'])} rows)")
    finally:
        with admin.begin() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def main(n: int) -> None:
    url = os.environ.get("CARELOOP_BENCH_DATABASE_URL") or os.environ.get("CARELOOP_TEST_DATABASE_URL")
    if not url or not url.startswith("postgresql"):
        print("skipped: set CARELOOP_BENCH_DATABASE_URL (or CARELOOP_TEST_DATABASE_URL) to a PostgreSQL URL")
        return
    measure(url, n, untimed=0)
    measure(url, n, untimed=100)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000)
