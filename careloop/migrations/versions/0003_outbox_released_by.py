"""outbox items held for staff, and who released them

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 17:05:00.000000

Why: a message that would go to a phone or email several people's records hold (a family
phone) is queued with status ``held`` for staff instead of being sent or dropped; a staff
member who confirms it may go releases it (``careloop outbox release``), and the send-time
gate must then not hold it again for the same reason: ``released_by`` records who did,
``released_at`` when (caps and learning count the message from then).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("released_by", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("released_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("released_at")
        batch.drop_column("released_by")
