"""keyset pages whatever the statistics: a customer's VMs indexed in id order

``ix_vm_customer_id`` (customer_id) becomes ``ix_vm_customer_page`` (customer_id, id): a
customer's page of ``GET /vm`` (``customer_id = ? AND id > ? ORDER BY id LIMIT ?``) walks
it and stops after the page, also when it is planned with sorting off on a table without
statistics (with the old index PostgreSQL then walked the primary key and filtered every
VM of every other customer). Lookups by customer_id alone use it as they used the old one.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05 11:00:00.000000

"""
from alembic import op


# revision identifiers, used by Alembic.
revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('vm', schema=None) as batch_op:
        batch_op.create_index('ix_vm_customer_page', ['customer_id', 'id'], unique=False)
        batch_op.drop_index(batch_op.f('ix_vm_customer_id'))


def downgrade():
    with op.batch_alter_table('vm', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_vm_customer_id'), ['customer_id'], unique=False)
        batch_op.drop_index('ix_vm_customer_page')
