# The guard: only PID 1 of the test guest's initramfs runs this (see 00-base.sh).
[ "$$" = 1 ] && [ "${vmapi_test_guest-}" = 1 ] && case $(/bin/busybox stat -f -c %T /) in ramfs | tmpfs) ;; *) false ;; esac || { echo "vmapi test guest: refused: only PID 1 of the test guest's initramfs (kernel command line vmapi_test_guest=1) runs this; nothing was changed" >&2; exit 64; }
# The cloud kernel's virtio, CD-ROM/ISO 9660 and ACPI button drivers are modules;
# the builder lists them in dependency order.
while read -r name; do
  insmod "/lib/modules/$name.ko" || echo "VMAPI-ERROR insmod $name failed"
done </etc/vmapi-guest/modules
