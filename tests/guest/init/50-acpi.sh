# The guard: only PID 1 of the test guest's initramfs runs this (see 00-base.sh).
[ "$$" = 1 ] && [ "${vmapi_test_guest-}" = 1 ] && case $(/bin/busybox stat -f -c %T /) in ramfs | tmpfs) ;; *) false ;; esac || { echo "vmapi test guest: refused: only PID 1 of the test guest's initramfs (kernel command line vmapi_test_guest=1) runs this; nothing was changed" >&2; exit 64; }
# The ACPI power button (libvirt's shutdown, and its reboot, which powers the guest off
# and starts it again) runs /etc/acpi/PWRF/00000080. acpid logs the events it sees to
# the console (its default log folder does not exist here).
acpid -c /etc/acpi -l /dev/ttyS0 && echo "VMAPI-ACPID started"
