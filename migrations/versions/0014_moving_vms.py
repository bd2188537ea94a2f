"""moving VMs: nodes' migration URI and address, shared storage types, a move's marker

``node.migration_uri`` (how another node's libvirtd reaches this one) and
``node.migration_address`` (where QEMU's migration stream connects), both nullable;
``storage_type.shared`` (its pool is the same on every node: moved VMs keep their
volumes where they are), false for every existing type; ``vm.migration_node_id``, the
node a move in progress has claimed (null: none); the ``leftover`` table, domains and
volumes a node still has but should not (reconcile --fix removes them).

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30 09:00:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('leftover',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('node_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('pool', sa.String(length=255), nullable=True),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('vm_id', sa.Integer(), nullable=True),
    sa.Column('reason', sa.String(length=255), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("(kind = 'domain') = (pool IS NULL)", name=op.f('ck_leftover_domain_has_no_pool')),
    sa.CheckConstraint("kind IN ('domain', 'volume', 'log')", name=op.f('ck_leftover_kind')),
    sa.ForeignKeyConstraint(['node_id'], ['node.id'], name=op.f('fk_leftover_node_id_node'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_leftover'))
    )
    with op.batch_alter_table('leftover', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_leftover_node_id'), ['node_id'], unique=False)

    with op.batch_alter_table('node', schema=None) as batch_op:
        batch_op.add_column(sa.Column('migration_uri', sa.String(length=1024), nullable=True))
        batch_op.add_column(sa.Column('migration_address', sa.String(length=255), nullable=True))

    with op.batch_alter_table('storage_type', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('shared', sa.Boolean(), server_default=sa.text('false'), nullable=False)
        )

    with op.batch_alter_table('vm', schema=None) as batch_op:
        batch_op.add_column(sa.Column('migration_node_id', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_vm_migration_node_id'), ['migration_node_id'],
                              unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_vm_migration_node_id_node'), 'node',
                                    ['migration_node_id'], ['id'])


def downgrade():
    with op.batch_alter_table('vm', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_vm_migration_node_id_node'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_vm_migration_node_id'))
        batch_op.drop_column('migration_node_id')

    with op.batch_alter_table('storage_type', schema=None) as batch_op:
        batch_op.drop_column('shared')

    with op.batch_alter_table('node', schema=None) as batch_op:
        batch_op.drop_column('migration_address')
        batch_op.drop_column('migration_uri')

    with op.batch_alter_table('leftover', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_leftover_node_id'))

    op.drop_table('leftover')
