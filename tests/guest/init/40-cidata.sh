# The guard: only PID 1 of the test guest's initramfs runs this (see 00-base.sh).
[ "$$" = 1 ] && [ "${vmapi_test_guest-}" = 1 ] && case $(/bin/busybox stat -f -c %T /) in ramfs | tmpfs) ;; *) false ;; esac || { echo "vmapi test guest: refused: only PID 1 of the test guest's initramfs (kernel command line vmapi_test_guest=1) runs this; nothing was changed" >&2; exit 64; }
# A NoCloud seed: the ISO 9660 volume labelled cidata, if one is attached.
if seed=$(findfs LABEL=cidata 2>/dev/null); then
  mkdir -p /mnt/cidata
  if mount -t iso9660 -o ro "$seed" /mnt/cidata; then
    echo "VMAPI-CIDATA device=$seed"
    for f in /mnt/cidata/*; do
      [ -f "$f" ] && echo "VMAPI-CIDATA file=${f##*/} bytes=$(wc -c <"$f")"
    done
  else
    echo "VMAPI-ERROR mount of $seed (cidata) failed"
  fi
fi
