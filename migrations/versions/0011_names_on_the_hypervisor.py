"""names on the hypervisor: the installation's id, names and locations stored on rows

Every domain, volume and host device name now carries the installation's id and is
stored on its row when it is made. Rows that exist keep the names they have on their
hosts (libvirt refuses a known UUID under a new name, and nothing running is renamed):
``vm-<id>``, ``vmapi-storage-<id>``, devices ``vm<vm>-<interface>`` /
``br-<vm>-<interface>``. A device name that never fitted Linux's 15 characters (so no
device ever had it) gets the new form instead. A storage row also records where its
volume is: its node and its storage type's pool as they are now.

The installation id kept in the database: the configured one; else, for a database that
already has nodes, ``vmapi`` (the old default, which its domains' metadata carries);
else a new one (``flask vmapi seed`` makes one too, when missing).

Downgrading drops the stored names: VMs and volumes made since (with the installation
in their names) can then no longer be found by the older code.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 05:05:28.850140

"""
import hashlib
import secrets

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

LETTERS = "abcdefghijklmnopqrstuvwxyz"
ALPHABET = "0123456789" + LETTERS
LONGEST_SUFFIX = 12  # br-<suffix> within Linux's 15 characters

# The tables as this revision sees them (frozen: migrations do not import the models).
installation = sa.table(
    "installation", sa.column("id", sa.Integer), sa.column("installation_id", sa.String)
)
node = sa.table("node", sa.column("id", sa.Integer))
vm = sa.table(
    "vm", sa.column("id", sa.Integer), sa.column("node_id", sa.Integer),
    sa.column("domain_name", sa.String),
)
storage = sa.table(
    "storage", sa.column("id", sa.Integer), sa.column("vm_id", sa.Integer),
    sa.column("storage_type_id", sa.Integer), sa.column("node_id", sa.Integer),
    sa.column("pool", sa.String), sa.column("volume_name", sa.String),
)
storage_type = sa.table("storage_type", sa.column("id", sa.Integer), sa.column("pool", sa.String))
interface = sa.table(
    "interface", sa.column("id", sa.Integer), sa.column("vm_id", sa.Integer),
    sa.column("mac", sa.String), sa.column("device_suffix", sa.String),
)


def configured_installation_id():
    try:
        from flask import current_app

        return current_app.config.get("INSTALLATION_ID")
    except RuntimeError:  # run outside the app (plain alembic)
        return None


def device_suffix(installation_id, mac):
    """The new device suffix (a frozen copy of vmapi.services.names.device_suffix)."""
    number = int.from_bytes(hashlib.sha256(installation_id.encode()).digest()[:8], "big")
    number, first = divmod(number, len(LETTERS))
    tag = LETTERS[first]
    for _ in range(3):
        number, digit = divmod(number, len(ALPHABET))
        tag += ALPHABET[digit]
    return f"{tag}-{mac.replace(':', '')[6:]}"


def text(column):
    return sa.cast(column, sa.String)


def upgrade():
    conn = op.get_bind()
    op.create_table('installation',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('installation_id', sa.String(length=16), nullable=False),
    sa.CheckConstraint('id = 1', name=op.f('ck_installation_one_row')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_installation'))
    )
    in_use = conn.execute(sa.select(node.c.id).limit(1)).first() is not None
    installation_id = configured_installation_id() or (
        "vmapi" if in_use else f"vmapi-{secrets.token_hex(4)}"
    )
    conn.execute(sa.insert(installation).values(id=1, installation_id=installation_id))

    with op.batch_alter_table('interface', schema=None) as batch_op:
        batch_op.add_column(sa.Column('device_suffix', sa.String(length=12), nullable=True))
    with op.batch_alter_table('storage', schema=None) as batch_op:
        batch_op.add_column(sa.Column('node_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('pool', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('volume_name', sa.String(length=255), nullable=True))
    with op.batch_alter_table('vm', schema=None) as batch_op:
        batch_op.add_column(sa.Column('domain_name', sa.String(length=64), nullable=True))

    # today's names, so nothing already made is renamed
    conn.execute(sa.update(vm).values(domain_name=sa.literal("vm-") + text(vm.c.id)))
    conn.execute(
        sa.update(storage).values(
            volume_name=sa.literal("vmapi-storage-") + text(storage.c.id),
            node_id=sa.select(vm.c.node_id).where(vm.c.id == storage.c.vm_id).scalar_subquery(),
            pool=sa.select(storage_type.c.pool)
            .where(storage_type.c.id == storage.c.storage_type_id)
            .scalar_subquery(),
        )
    )
    legacy = text(interface.c.vm_id) + sa.literal("-") + text(interface.c.id)
    conn.execute(
        sa.update(interface)
        .where(sa.func.length(legacy) <= LONGEST_SUFFIX)
        .values(device_suffix=legacy)
    )
    too_long = sa.select(interface.c.id, interface.c.mac).where(interface.c.device_suffix.is_(None))
    for ident, mac in conn.execute(too_long).all():
        conn.execute(
            sa.update(interface)
            .where(interface.c.id == ident)
            .values(device_suffix=device_suffix(installation_id, mac))
        )

    with op.batch_alter_table('interface', schema=None) as batch_op:
        batch_op.alter_column('device_suffix', existing_type=sa.String(length=12), nullable=False)
        batch_op.create_unique_constraint(batch_op.f('uq_interface_device_suffix'), ['device_suffix'])

    with op.batch_alter_table('storage', schema=None) as batch_op:
        batch_op.alter_column('node_id', existing_type=sa.Integer(), nullable=False)
        batch_op.alter_column('pool', existing_type=sa.String(length=255), nullable=False)
        batch_op.create_index(batch_op.f('ix_storage_node_id'), ['node_id'], unique=False)
        batch_op.create_unique_constraint(batch_op.f('uq_storage_volume_name'), ['volume_name'])
        batch_op.create_foreign_key(batch_op.f('fk_storage_node_id_node'), 'node', ['node_id'], ['id'])

    with op.batch_alter_table('vm', schema=None) as batch_op:
        batch_op.create_unique_constraint(batch_op.f('uq_vm_domain_name'), ['domain_name'])


def downgrade():
    with op.batch_alter_table('vm', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_vm_domain_name'), type_='unique')
        batch_op.drop_column('domain_name')

    with op.batch_alter_table('storage', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_storage_node_id_node'), type_='foreignkey')
        batch_op.drop_constraint(batch_op.f('uq_storage_volume_name'), type_='unique')
        batch_op.drop_index(batch_op.f('ix_storage_node_id'))
        batch_op.drop_column('volume_name')
        batch_op.drop_column('pool')
        batch_op.drop_column('node_id')

    with op.batch_alter_table('interface', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_interface_device_suffix'), type_='unique')
        batch_op.drop_column('device_suffix')

    op.drop_table('installation')
