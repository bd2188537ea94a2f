# The guard: only PID 1 of the test guest's initramfs runs this (see 00-base.sh).
[ "$$" = 1 ] && [ "${vmapi_test_guest-}" = 1 ] && case $(/bin/busybox stat -f -c %T /) in ramfs | tmpfs) ;; *) false ;; esac || { echo "vmapi test guest: refused: only PID 1 of the test guest's initramfs (kernel command line vmapi_test_guest=1) runs this; nothing was changed" >&2; exit 64; }
# The root disk: its size as the guest sees it (a qcow2 overlay's virtual size), and the
# kernel's boot id, a random UUID drawn anew at every boot: a test tells a new boot (a
# reboot through the API) from the one before by it.
i=0
while [ ! -e /sys/block/vda/size ] && [ "$i" -lt 100 ]; do usleep 100000; i=$((i + 1)); done
echo "VMAPI-GUEST root=vda sectors=$(cat /sys/block/vda/size 2>/dev/null || echo none) boot_id=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo none)"
