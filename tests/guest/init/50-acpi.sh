# The ACPI power button (libvirt's shutdown, and its reboot, which powers the guest off
# and starts it again) runs /etc/acpi/PWRF/00000080. acpid logs the events it sees to
# the console (its default log folder does not exist here).
acpid -c /etc/acpi -l /dev/ttyS0 && echo "VMAPI-ACPID started"
