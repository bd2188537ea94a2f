"""node_storage_access: whether a node reached an rbd type's cluster at its last check

``flask vmapi node check`` records, per node and rbd storage type, whether the node
reached the type's Ceph cluster; the scheduler keeps a VM with volumes of the type off a
node recorded as unable (no row: never checked, counted as reachable).

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-05 18:10:00

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "node_storage_access",
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("storage_type_id", sa.Integer(), nullable=False),
        sa.Column("reachable", sa.Boolean(), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["node_id"], ["node.id"],
            name=op.f("fk_node_storage_access_node_id_node"), ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["storage_type_id"], ["storage_type.id"],
            name=op.f("fk_node_storage_access_storage_type_id_storage_type"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("node_id", "storage_type_id", name=op.f("pk_node_storage_access")),
    )
    with op.batch_alter_table("node_storage_access", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_node_storage_access_storage_type_id"), ["storage_type_id"], unique=False
        )


def downgrade():
    with op.batch_alter_table("node_storage_access", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_node_storage_access_storage_type_id"))
    op.drop_table("node_storage_access")
