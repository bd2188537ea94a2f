"""rbd storage types: volumes in a Ceph pool through libvirt's rbd pools

``storage_type.backend`` (dir, the only kind so far; or rbd) and what an rbd type needs:
the cluster's monitors, the Ceph pool, the cephx user and the UUID of the libvirt secret
that holds the user's key on each node (the key itself stays in a file of the API host).

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-05 17:40:00

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

BACKEND_FIELDS = (
    "backend = 'rbd' AND ceph_monitors IS NOT NULL AND ceph_pool IS NOT NULL "
    "AND ceph_user IS NOT NULL AND ceph_secret_uuid IS NOT NULL AND format = 'raw' AND shared "
    "OR backend = 'dir' AND ceph_monitors IS NULL AND ceph_pool IS NULL AND ceph_user IS NULL "
    "AND ceph_secret_uuid IS NULL"
)


def upgrade():
    with op.batch_alter_table("storage_type", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("backend", sa.String(length=8), server_default="dir", nullable=False)
        )
        batch_op.add_column(sa.Column("ceph_monitors", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("ceph_pool", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("ceph_user", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("ceph_secret_uuid", sa.String(length=36), nullable=True))
        batch_op.create_check_constraint(
            op.f("ck_storage_type_backend"), "backend IN ('dir', 'rbd')"
        )
        batch_op.create_check_constraint(op.f("ck_storage_type_backend_fields"), BACKEND_FIELDS)


def downgrade():
    # an rbd type cannot be told apart from a dir one without its columns: refuse rather
    # than leave types whose volumes would be looked for in a directory
    rbd = op.get_bind().execute(sa.text("SELECT count(*) FROM storage_type WHERE backend = 'rbd'"))
    if rbd.scalar():
        raise RuntimeError("rbd storage types exist: delete them before downgrading")
    with op.batch_alter_table("storage_type", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_storage_type_backend_fields"), type_="check")
        batch_op.drop_constraint(op.f("ck_storage_type_backend"), type_="check")
        batch_op.drop_column("ceph_secret_uuid")
        batch_op.drop_column("ceph_user")
        batch_op.drop_column("ceph_pool")
        batch_op.drop_column("ceph_monitors")
        batch_op.drop_column("backend")
