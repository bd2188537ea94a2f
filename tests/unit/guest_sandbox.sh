#!/bin/sh
# A throwaway sandbox for the test guest's scripts (tests/unit/test_guest_guard.py).
#
# Started only as: setpriv --reuid=65534 ... unshare --user --map-root-user --mount --uts
# --net --pid --ipc --fork sh guest_sandbox.sh WORK MODE MARKER. So it runs as the user
# nobody on the host, root only inside a user namespace of its own: no capability on the
# host (no devices, modules, kernel log level, reboot of the host), its own host name,
# network (no interfaces but a loopback that is down) and mounts. The script under test
# then runs chrooted into a fresh tmpfs holding a copy of the guest's files, a sandbox
# /etc/resolv.conf and nothing of the host's but /dev/null: even a script without its
# guard can only change the sandbox, which dies with this process.
#
# WORK: a folder holding subject (the script), target (its path in the guest), rootfs/
# (the guest's files), root/ (an empty mount point) and io/ (for its output). MODE: child (run as a child of
# this shell) or pid1 (as PID 1 of a PID namespace of its own). MARKER: yes to set
# vmapi_test_guest=1 in its environment, as the guest's kernel does for /init.
# WAIT (optional): a line the script prints once it has done its work; it is left
# running until then (a guard-less /init never ends) and killed afterwards.
set -eu
work=$1 mode=$2 marker=$3 wait_for=${4:-}

# Refuse unless this really is the sandbox: PID 1 of a new PID namespace, in a user
# namespace that maps root to someone else than the host's root.
[ "$$" = 1 ] || { echo "sandbox: not PID 1 of a new PID namespace" >&2; exit 99; }
read -r inside outside count </proc/self/uid_map
[ "$inside" = 0 ] && [ "$outside" != 0 ] && [ "$count" = 1 ] \
  || { echo "sandbox: not in a user namespace of its own" >&2; exit 99; }

r=$work/root
mount -t tmpfs -o size=64m,mode=755 tmpfs "$r"
mkdir -p "$r/bin" "$r/dev" "$r/etc" "$r/mnt/cidata" "$r/tmp" "$r/proc" "$r/sys" "$r/www"
cp /bin/busybox "$r/bin/busybox"
chroot "$r" /bin/busybox --install -s /bin
cp -R "$work/rootfs/." "$r/"
printf 'MARKER_SECTOR=131072\n' >"$r/etc/vmapi-guest/env"
: >"$r/etc/vmapi-guest/modules"
printf 'nameserver 192.0.2.53\n' >"$r/etc/resolv.conf"
printf 'instance-id: i-sandbox\nlocal-hostname: the-guest-was-here\n' >"$r/mnt/cidata/meta-data"
printf 'version: 2\n' >"$r/mnt/cidata/network-config"
: >"$r/dev/null"
mount --bind /dev/null "$r/dev/null"
: >"$r/dev/ttyS0"
target=$(cat "$work/target")
mkdir -p "$r$(dirname "$target")"
cp "$work/subject" "$r$target"
chmod 755 "$r$target"
# the PWRF helper reads the kernel's command line: the host's, which has no marker
mount -t proc proc "$r/proc"
busybox hostname sandbox-host

state() {
  echo "hostname=$(cat /proc/sys/kernel/hostname)"
  echo "resolv=$(base64 -w0 <"$r/etc/resolv.conf")"
  echo "listeners=$(cat /proc/net/tcp /proc/net/tcp6 | awk '$4 == "0A"' | wc -l)"
  echo "mounts=$(wc -l </proc/self/mountinfo)"
  echo "files=$(cd "$r" && find . -xdev | sort | md5sum | cut -c1-32)"
}
state | sed 's/^/before_/'

env="PATH=/bin"
[ "$marker" = yes ] && env="$env vmapi_test_guest=1"
set +e
case $mode in
  child) set -- chroot "$r" /bin/busybox env -i $env "$target" ;;
  pid1) set -- unshare --pid --fork --kill-child chroot "$r" /bin/busybox env -i $env "$target" ;;
  *) echo "sandbox: unknown mode $mode" >&2; exit 99 ;;
esac
if [ -z "$wait_for" ]; then
  "$@" >"$work/io/out" 2>"$work/io/err"
  rc=$?
else
  "$@" >"$work/io/out" 2>"$work/io/err" &
  pid=$!
  i=0
  until grep -q "$wait_for" "$r/dev/ttyS0" || ! kill -0 "$pid" 2>/dev/null || [ "$i" -ge 600 ]; do
    sleep 0.1
    i=$((i + 1))
  done
  state | sed 's/^/during_/'
  kill -KILL "$pid" 2>/dev/null  # unshare ignores TERM; its child then gets KILL
  wait "$pid"
  rc=$?
fi
echo "rc=$rc"
state | sed 's/^/after_/'
echo "stderr=$(base64 -w0 <"$work/io/err")"
echo "console=$(base64 -w0 <"$r/dev/ttyS0")"
