"""idempotency keys: the request that runs a key (owner), and what it made and what it
left building, committed with the objects themselves

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-05 23:00:00

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = "0024"
down_revision = "0023"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("idempotency_key", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("made", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("building", sa.Text(), nullable=True))


def downgrade():
    with op.batch_alter_table("idempotency_key", schema=None) as batch_op:
        batch_op.drop_column("building")
        batch_op.drop_column("made")
        batch_op.drop_column("owner")
