"""guest configuration: host name, SSH keys, user data and the seed's place; node bridge

A VM gains what its guest is told (``hostname``, ``ssh_keys``, ``user_data``) and where
its cloud-init seed volume is (``seed_pool``, ``seed_volume``, ``seed_path``; null until
it has one). VMs that exist get their name as their host name (the default of a new VM)
and no keys. A node gains ``bridge``, the template of the bridges its NICs join (null:
the configured ``BRIDGE_TEMPLATE``).

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30 06:10:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None

vm = sa.table("vm", sa.column("id", sa.Integer), sa.column("hostname", sa.String))


def upgrade():
    with op.batch_alter_table('vm', schema=None) as batch_op:
        batch_op.add_column(sa.Column('hostname', sa.String(length=253), nullable=True))
        batch_op.add_column(sa.Column('ssh_keys', sa.JSON(), server_default=sa.text("'[]'"), nullable=False))
        batch_op.add_column(sa.Column('user_data', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('seed_pool', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('seed_volume', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('seed_path', sa.String(length=1024), nullable=True))
        batch_op.create_unique_constraint(batch_op.f('uq_vm_seed_volume'), ['seed_volume'])

    op.get_bind().execute(
        sa.update(vm).values(hostname=sa.literal("vm-") + sa.cast(vm.c.id, sa.String))
    )

    with op.batch_alter_table('node', schema=None) as batch_op:
        batch_op.add_column(sa.Column('bridge', sa.String(length=64), nullable=True))


def downgrade():
    with op.batch_alter_table('node', schema=None) as batch_op:
        batch_op.drop_column('bridge')

    with op.batch_alter_table('vm', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_vm_seed_volume'), type_='unique')
        batch_op.drop_column('seed_path')
        batch_op.drop_column('seed_volume')
        batch_op.drop_column('seed_pool')
        batch_op.drop_column('user_data')
        batch_op.drop_column('ssh_keys')
        batch_op.drop_column('hostname')
