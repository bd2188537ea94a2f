"""high availability: nodes' fence agents and HA state, VMs' HA policy

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-05 20:05:00

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None

HA_STATES = "ha_state IN ('ok', 'suspect', 'fencing', 'fenced', 'fence_failed', 'recovered')"


def upgrade():
    with op.batch_alter_table("node", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fence_agent", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("fence_address", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("fence_user", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("ha_state", sa.String(length=16), server_default="ok",
                                      nullable=False))
        batch_op.add_column(sa.Column("ha_misses", sa.Integer(), server_default=sa.text("0"),
                                      nullable=False))
        batch_op.add_column(sa.Column("ha_since", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_check_constraint(op.f("ck_node_ha_state_known"), HA_STATES)
    with op.batch_alter_table("vm", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ha", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("ha_priority", sa.Integer(), server_default=sa.text("0"),
                                      nullable=False))
        batch_op.add_column(sa.Column("ha_local_disks", sa.String(length=8),
                                      server_default="leave", nullable=False))
        batch_op.create_check_constraint(op.f("ck_vm_ha_local_disks_known"),
                                         "ha_local_disks IN ('leave', 'rebuild')")


def downgrade():
    with op.batch_alter_table("vm", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("ck_vm_ha_local_disks_known"), type_="check")
        batch_op.drop_column("ha_local_disks")
        batch_op.drop_column("ha_priority")
        batch_op.drop_column("ha")
    with op.batch_alter_table("node", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("ck_node_ha_state_known"), type_="check")
        batch_op.drop_column("ha_since")
        batch_op.drop_column("ha_misses")
        batch_op.drop_column("ha_state")
        batch_op.drop_column("fence_user")
        batch_op.drop_column("fence_address")
        batch_op.drop_column("fence_agent")
