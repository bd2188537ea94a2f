#!/bin/busybox sh
# PID 1 of vmapi's test guest, assembled from tests/guest/init/*.sh in name order.
# Everything it prints goes to the first serial port, which the test reads.
# The guard (every part has it, so a part run alone refuses too): this runs only as
# PID 1 of the test guest's initramfs, whose kernel command line carries
# vmapi_test_guest=1 (the kernel hands it to init as a variable). Anywhere else, a
# host above all, it changes nothing: host name, resolv.conf, listeners, disks.
[ "$$" = 1 ] && [ "${vmapi_test_guest-}" = 1 ] && case $(/bin/busybox stat -f -c %T /) in ramfs | tmpfs) ;; *) false ;; esac || { echo "vmapi test guest: refused: only PID 1 of the test guest's initramfs (kernel command line vmapi_test_guest=1) runs this; nothing was changed" >&2; exit 64; }
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /mnt /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/null >/dev/ttyS0 2>&1
# From here on the kernel keeps quiet on the console, so its messages do not cut
# through our lines (the boot messages before this point are still there to read).
dmesg -n 1
. /etc/vmapi-guest/env
