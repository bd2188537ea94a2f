"""image_rbd: an image written once into an rbd storage type's Ceph pool; an active image
may live in Ceph only (raw, no file in the store)

The parent of the RBD clones that root disks of the image in that type are (one per image
and rbd type; image_id null: an RBD image left to remove).

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-05 19:50:00

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "image_rbd",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=True),
        sa.Column("storage_type_id", sa.Integer(), nullable=False),
        sa.Column("ceph_pool", sa.String(length=255), nullable=False),
        sa.Column("rbd_name", sa.String(length=255), nullable=False),
        sa.Column("snapshot", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"], ["image.id"], name=op.f("fk_image_rbd_image_id_image"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["storage_type_id"], ["storage_type.id"],
            name=op.f("fk_image_rbd_storage_type_id_storage_type"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_image_rbd")),
        sa.UniqueConstraint("image_id", "storage_type_id",
                            name=op.f("uq_image_rbd_image_id_storage_type_id")),
    )
    with op.batch_alter_table("image_rbd", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_image_rbd_storage_type_id"), ["storage_type_id"], unique=False
        )


    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("ck_image_active_has_file"), type_="check")
        batch_op.create_check_constraint(op.f("ck_image_active_has_content"), ACTIVE_HAS_CONTENT)


#: an active image has its figures, and a file with its checksum, or (a raw image saved
#: from an RBD disk, in Ceph only) neither
ACTIVE_HAS_CONTENT = (
    "state != 'active' OR size IS NOT NULL AND virtual_size IS NOT NULL AND "
    "(file IS NOT NULL AND checksum IS NOT NULL OR file IS NULL AND format = 'raw')"
)
ACTIVE_HAS_FILE = (
    "state != 'active' OR file IS NOT NULL AND size IS NOT NULL AND "
    "virtual_size IS NOT NULL AND checksum IS NOT NULL"
)


def downgrade():
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("ck_image_active_has_content"), type_="check")
        batch_op.create_check_constraint(op.f("ck_image_active_has_file"), ACTIVE_HAS_FILE)
    with op.batch_alter_table("image_rbd", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_image_rbd_storage_type_id"))
    op.drop_table("image_rbd")
