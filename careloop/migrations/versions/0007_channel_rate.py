"""a rate-limited channel's send schedule, shared by every deliver worker

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24 10:00:00.000000

Why: ``ChannelConfig.rate_per_second`` was a token bucket in each deliver worker's memory,
so N workers on one database sent up to N times the configured rate and exceeded a
provider's per-sender limit (Twilio: 1 message per second for a long code); the 429s that
followed were handled (``channel_pause``, 0006), but the rate is one we were told never to
exceed. ``channel_rate`` holds one schedule per channel: ``next_at``, the channel's next
free send slot in seconds since the epoch on the database's clock; each send reserves its
slot with one atomic upsert and waits for it (channels/outbox.py).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "channel_rate",
        sa.Column("channel", AutoString(length=32), nullable=False),
        sa.Column("next_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("channel"),
    )


def downgrade() -> None:
    op.drop_table("channel_rate")
