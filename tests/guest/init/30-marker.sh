# The guard: only PID 1 of the test guest's initramfs runs this (see 00-base.sh).
[ "$$" = 1 ] && [ "${vmapi_test_guest-}" = 1 ] && case $(/bin/busybox stat -f -c %T /) in ramfs | tmpfs) ;; *) false ;; esac || { echo "vmapi test guest: refused: only PID 1 of the test guest's initramfs (kernel command line vmapi_test_guest=1) runs this; nothing was changed" >&2; exit 64; }
# A write to the root disk past the image's end: on an overlay it lands in the overlay
# and leaves the base alone. The previous boot's marker, if any, is read back first.
if [ "$(cat /sys/block/vda/size 2>/dev/null || echo 0)" -gt "$MARKER_SECTOR" ]; then
  previous=$(dd if=/dev/vda bs=512 skip="$MARKER_SECTOR" count=1 2>/dev/null | tr -cd 'a-z0-9-')
  marker="vmapi-marker-$(cat /proc/sys/kernel/random/uuid)"
  echo "$marker" | dd of=/dev/vda bs=512 seek="$MARKER_SECTOR" count=1 conv=sync,notrunc,fsync 2>/dev/null
  echo "VMAPI-MARKER sector=$MARKER_SECTOR wrote=$marker previous=${previous:-none}"
else
  echo "VMAPI-MARKER skipped: the root disk ends before sector $MARKER_SECTOR"
fi
