"""the send window a person engaged in

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 21:45:00.000000

Why: when a person reads, clicks or replies says which send window they are active in
(send-time optimisation): a reminder sent at 09:00 and read at 19:30 is evidence for the
evening window. ``outreach_outcome.engaged_window`` keeps the window of the outcome that
first earned the send a reward, so every later change of that reward (a reply after the
read, a STOP zeroing it) credits the same window.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outreach_outcome") as batch:
        batch.add_column(sa.Column("engaged_window", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outreach_outcome") as batch:
        batch.drop_column("engaged_window")
