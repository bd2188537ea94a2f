#!/bin/busybox sh
# PID 1 of vmapi's test guest, assembled from tests/guest/init/*.sh in name order.
# Everything it prints goes to the first serial port, which the test reads.
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
