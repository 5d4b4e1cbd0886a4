"""tenant allowed_apis: which inference APIs (chat, completions, messages, responses, embeddings) a tenant may use

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 13:50:00.000000

Existing tenants get `[]` (every API), so nothing they do today is refused after the upgrade.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("allowed_apis", sa.JSON(), nullable=False, server_default=sa.text("'[]'")))


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("allowed_apis")
