# The cloud kernel's virtio, CD-ROM/ISO 9660 and ACPI button drivers are modules;
# the builder lists them in dependency order.
while read -r name; do
  insmod "/lib/modules/$name.ko" || echo "VMAPI-ERROR insmod $name failed"
done </etc/vmapi-guest/modules
