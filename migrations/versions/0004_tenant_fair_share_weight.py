"""tenant fair-share weight: a tenant's share of a full profile's fair queue, set in the console, API or CLI

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 13:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL: the platform file's `gateway.tenant_weights`, else 1 (every existing tenant keeps its weight).
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("fair_share_weight", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("fair_share_weight")
