"""seed the audit chain head

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 16:55:00.000000

Why: appenders lock the ``audit_head`` row (``SELECT ... FOR UPDATE``) to keep the chain
linear, but on a brand-new database there is no row to lock, so the first writers of two
connections could both compute seq 1 and one would fail. With the row there from the
start, the very first appends queue on it like every later one. The row is written only
when the table has none, so an existing chain's head is never moved.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# careloop.audit_log.GENESIS, written out: a migration must keep meaning what it meant
# when it was written, whatever the application code later says.
GENESIS = "0" * 64


def upgrade() -> None:
    # One statement, so it inserts nothing when a row is already there (no separate read).
    op.execute(
        sa.text(
            "INSERT INTO audit_head (id, seq, hash) "
            "SELECT 1, 0, :genesis WHERE NOT EXISTS (SELECT 1 FROM audit_head)"
        ).bindparams(genesis=GENESIS)
    )


def downgrade() -> None:
    # Only the untouched seed goes: a head row that has moved records a real chain.
    op.execute(
        sa.text("DELETE FROM audit_head WHERE id = 1 AND seq = 0 AND hash = :genesis").bindparams(
            genesis=GENESIS
        )
    )
