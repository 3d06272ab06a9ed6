"""one outbox item per provider message

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 21:40:00.000000

Why: a provider's message belongs to one outbox item. Crash recovery adopts a message it
finds for an interrupted item only if no other row holds its provider id, but that check
took no lock: on PostgreSQL two workers whose recovery passes overlap, each settling a
different twin (the same text to the same phone), could both pass it and both adopt the
same Twilio SID, one message recorded as two sent items, one of which never went. The
unique index ``uq_outbox_provider`` makes the second adoption fail (the deliver stage
then leaves that item ``unknown`` for staff, audited ``provider-id-owned``), and makes
the check an index lookup instead of a scan.

Scope: per channel. No channel gives two outbox items the same provider id on itself:
capture, console and webhook report the item's own key (unique in ``outbox``), SMTP a
Message-ID hashed from it, Twilio a SID it never reuses, and FHIR write-back the id of the
resource its conditional create made or found by the item's own key as identifier (a
second item has another key, so another resource). But a provider id is unique only
within its provider: two write-back channels to two EHRs may both be handed
``Communication/1``, so the same id on two channels is two messages. Rows without a
provider id (not sent yet, or never known) are left out.

A database that already holds duplicates (rows recorded by the race above) stops the
upgrade with how many pairs there are: which item a message belongs to is for staff to
decide, not for a migration to guess.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

INDEX = "uq_outbox_provider"
HAS_PROVIDER_ID = "provider_id IS NOT NULL"

_DUPLICATED = sa.text(
    "SELECT COUNT(*) FROM (SELECT channel, provider_id FROM outbox WHERE provider_id IS NOT NULL "
    "GROUP BY channel, provider_id HAVING COUNT(*) > 1) AS shared"
)
# What the operator runs to see them (outbox ids and statuses only: no person, no address).
_LIST = (
    "SELECT channel, provider_id, id, status FROM outbox WHERE provider_id IS NOT NULL AND "
    "(channel, provider_id) IN (SELECT channel, provider_id FROM outbox WHERE provider_id IS NOT "
    "NULL GROUP BY channel, provider_id HAVING COUNT(*) > 1) ORDER BY channel, provider_id, id"
)


def upgrade() -> None:
    shared = op.get_bind().execute(_DUPLICATED).scalar_one()
    if shared:
        raise RuntimeError(
            f"migration 0005: {shared} (channel, provider_id) pair(s) are each held by more than "
            f"one outbox row, so the unique index {INDEX} cannot be created; nothing was changed. "
            "Each pair is one provider message recorded as sent for several outbox items, of "
            f"which at most one sent it. List the rows with: {_LIST}. For each pair keep the "
            "provider_id on one row (twins, the same text to the same address, got one message "
            "between them: either), set provider_id to NULL and status to 'unknown' on the others, "
            "run the upgrade again, then have staff settle those rows with "
            "`careloop outbox resolve ID --sent` or `--not-sent`."
        )
    op.create_index(
        INDEX,
        "outbox",
        ["channel", "provider_id"],
        unique=True,
        postgresql_where=sa.text(HAS_PROVIDER_ID),
        sqlite_where=sa.text(HAS_PROVIDER_ID),
    )


def downgrade() -> None:
    op.drop_index(INDEX, table_name="outbox")
