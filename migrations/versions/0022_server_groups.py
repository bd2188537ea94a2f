"""server groups: /server_group and the group a VM joins when it is made

A server group is a customer's (or an admin's) set of VMs that the scheduler places by
one policy (anti-affinity, affinity, soft-anti-affinity); ``vm.server_group_id`` names a
VM's group (null: none), indexed for the scheduler's per-node member lookups.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-06 09:00:00

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "server_group",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("policy", sa.String(length=32), nullable=False),
        sa.Column("customer_id", sa.BigInteger(), nullable=True),
        sa.CheckConstraint(
            "policy IN ('anti-affinity', 'affinity', 'soft-anti-affinity')",
            name=op.f("ck_server_group_policy"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_server_group")),
    )
    with op.batch_alter_table("server_group", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_server_group_customer_id"), ["customer_id"], unique=False
        )

    with op.batch_alter_table("vm", schema=None) as batch_op:
        batch_op.add_column(sa.Column("server_group_id", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_vm_server_group_id"), ["server_group_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_vm_server_group_id_server_group"), "server_group",
            ["server_group_id"], ["id"],
        )


def downgrade():
    with op.batch_alter_table("vm", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_vm_server_group_id_server_group"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_vm_server_group_id"))
        batch_op.drop_column("server_group_id")
    with op.batch_alter_table("server_group", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_server_group_customer_id"))
    op.drop_table("server_group")
