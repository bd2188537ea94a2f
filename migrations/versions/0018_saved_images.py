"""saved images: images made from VMs' and volumes' disks, backups

``image.kind`` (upload, snapshot, backup; every image so far was uploaded), what a saved
image was saved from (plain ids: the image outlives its VM), the ``saving`` state of an
image whose file is being made, and ``vm.backup_keep`` (null: no backups).

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-05 16:40:00

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

OLD_STATES = "state IN ('queued', 'active', 'error')"
NEW_STATES = "state IN ('queued', 'active', 'error', 'saving')"


def upgrade():
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=8), server_default="upload", nullable=False)
        )
        batch_op.add_column(sa.Column("source_vm_id", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("source_storage_id", sa.BigInteger(), nullable=True))
        batch_op.create_index(batch_op.f("ix_image_source_vm_id"), ["source_vm_id"], unique=False)
        batch_op.drop_constraint(op.f("ck_image_state_known"), type_="check")
        batch_op.create_check_constraint(op.f("ck_image_state_known"), NEW_STATES)
        batch_op.create_check_constraint(
            op.f("ck_image_kind_known"), "kind IN ('upload', 'snapshot', 'backup')"
        )
        batch_op.create_check_constraint(
            op.f("ck_image_saved_has_source"),
            "kind = 'upload' OR source_vm_id IS NOT NULL OR source_storage_id IS NOT NULL",
        )

    with op.batch_alter_table("vm", schema=None) as batch_op:
        batch_op.add_column(sa.Column("backup_keep", sa.Integer(), nullable=True))
        batch_op.create_check_constraint(
            op.f("ck_vm_backup_keep_positive"), "backup_keep IS NULL OR backup_keep > 0"
        )


def downgrade():
    with op.batch_alter_table("vm", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_vm_backup_keep_positive"), type_="check")
        batch_op.drop_column("backup_keep")

    # the images saved from disks are images like any other once the columns are gone;
    # one still being saved has no file and goes back to queued
    op.execute("UPDATE image SET state = 'queued' WHERE state = 'saving'")
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_image_saved_has_source"), type_="check")
        batch_op.drop_constraint(op.f("ck_image_kind_known"), type_="check")
        batch_op.drop_constraint(op.f("ck_image_state_known"), type_="check")
        batch_op.create_check_constraint(op.f("ck_image_state_known"), OLD_STATES)
        batch_op.drop_index(batch_op.f("ix_image_source_vm_id"))
        batch_op.drop_column("source_storage_id")
        batch_op.drop_column("source_vm_id")
        batch_op.drop_column("kind")
