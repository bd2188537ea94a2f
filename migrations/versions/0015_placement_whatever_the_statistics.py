"""placement whatever the statistics: a virt_method's nodes indexed with the node

``ix_virt_node_virt_method_id`` (virt_method_id) becomes ``ix_virt_node_method_node``
(virt_method_id, node_id): the scheduler's per-node check "does this node have the
method" is then an index lookup on both columns whichever index PostgreSQL picks, also
when the tables have no statistics (it picked the method's index and filtered every
node of the method, once per node visited).

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-30 09:10:00.000000

"""
from alembic import op


# revision identifiers, used by Alembic.
revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('virt_node', schema=None) as batch_op:
        batch_op.create_index('ix_virt_node_method_node', ['virt_method_id', 'node_id'], unique=False)
        batch_op.drop_index(batch_op.f('ix_virt_node_virt_method_id'))


def downgrade():
    with op.batch_alter_table('virt_node', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_virt_node_virt_method_id'), ['virt_method_id'], unique=False)
        batch_op.drop_index('ix_virt_node_method_node')
