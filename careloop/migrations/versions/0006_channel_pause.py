"""a provider's pause of a channel, shared by every deliver worker

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22 23:30:00.000000

Why: a provider that answers 429 or 503 with ``Retry-After`` (Twilio, a webhook receiver, a
FHIR server) asks the hub, not one process, to wait. The pause was kept in the memory of the
worker that got the answer: the other deliver workers kept calling the provider until each
got its own 429, and the worker that knew claimed every item of the channel that came up
meanwhile only to put it back (an update and an audit record per item, per pause).
``channel_pause`` holds the pause: one row per channel, until when and why; the due read
and the claim of every worker leave a paused channel's items pending, untouched, and one
audit record (``channel.pause``) marks each pause instead of one per item.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "channel_pause",
        sa.Column("channel", AutoString(length=32), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", AutoString(length=64), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("channel"),
    )


def downgrade() -> None:
    op.drop_table("channel_pause")
