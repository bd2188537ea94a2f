#!/bin/sh
# A throwaway sandbox for the test guest's scripts (tests/unit/test_guest_guard.py).
#
# Started only as: setpriv --reuid=65534 ... unshare --user --map-root-user --mount --uts
# --net --pid --ipc --fork sh guest_sandbox.sh WORK MODE MARKER. So it runs as the user
# nobody on the host, root only inside a user namespace of its own: no capability on the
# host (no devices, modules, kernel log level, reboot of the host), its own host name,
# network (no interfaces but a loopback that is down) and mounts. The sandbox then moves
# its own root into a fresh tmpfs holding a copy of the guest's files and a sandbox
# /etc/resolv.conf (pivot_root), and detaches the host's root (umount -l): nothing of the
# host's file system is left in reach but /dev/null and the output files it holds open
# (the script under test gets stdout and stderr only). Not a chroot, which root of a user namespace (it has CAP_SYS_CHROOT) can leave.
# Even a script without its guard can only change the sandbox, which dies with this
# process (PID 1 of its PID namespace: every process in it goes with it).
#
# WORK: a folder holding subject (the script), target (its path in the guest), rootfs/
# (the guest's files), root/ (an empty mount point) and io/ (for its output). MODE: child (run as a child of
# this shell) or pid1 (as PID 1 of a PID namespace of its own). MARKER: yes to set
# vmapi_test_guest=1 in its environment, as the guest's kernel does for /init.
# WAIT (optional): a line the script prints once it has done its work; it is left
# running until then (a guard-less /init never ends) and killed afterwards.
# ENV (optional): more NAME=VALUE words for its environment (a CGI's QUERY_STRING).
set -eu
work=$1 mode=$2 marker=$3 wait_for=${4:-} extra=${5:-}

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

# Into the tmpfs for good: the host's root is detached, not just out of sight.
exec 3>"$work/io/out" 4>"$work/io/err" 5<"$work/io/err"
mkdir "$r/.old-root"
cd "$r"
pivot_root . .old-root
cd /
PATH=/bin
export PATH
/bin/busybox --install -s /bin
umount -l /.old-root
rmdir /.old-root
r=
left=$(awk '$5 != "/" && $5 != "/dev/null" && $5 != "/proc"' /proc/self/mountinfo)
[ ! -e /.old-root ] && [ -z "$left" ] || { echo "sandbox: host mounts left: $left" >&2; exit 99; }

state() {
  echo "hostname=$(cat /proc/sys/kernel/hostname)"
  echo "resolv=$(base64 -w0 <"$r/etc/resolv.conf")"
  echo "listeners=$(cat /proc/net/tcp /proc/net/tcp6 | awk '$4 == "0A"' | wc -l)"
  echo "mounts=$(wc -l </proc/self/mountinfo)"
  echo "files=$(cd / && find . -xdev | sort | md5sum | cut -c1-32)"
}
state | sed 's/^/before_/'

env="PATH=/bin"
[ "$marker" = yes ] && env="$env vmapi_test_guest=1"
[ -n "$extra" ] && env="$env $extra"
set +e
case $mode in
  child) set -- /bin/busybox env -i $env "$target" ;;
  pid1) set -- /bin/busybox unshare --pid --fork /bin/busybox env -i $env "$target" ;;
  *) echo "sandbox: unknown mode $mode" >&2; exit 99 ;;
esac
if [ -z "$wait_for" ]; then
  "$@" >&3 2>&4 3>&- 4>&- 5<&-
  rc=$?
else
  "$@" >&3 2>&4 3>&- 4>&- 5<&- &
  pid=$!
  i=0
  until grep -q "$wait_for" "$r/dev/ttyS0" || ! kill -0 "$pid" 2>/dev/null || [ "$i" -ge 600 ]; do
    sleep 0.1
    i=$((i + 1))
  done
  state | sed 's/^/during_/'
  kill -KILL "$pid" 2>/dev/null
  wait "$pid"
  rc=$?
  kill -KILL -1 2>/dev/null  # all the rest (PID 1 of this namespace: only the sandbox's)
  wait
fi
echo "rc=$rc"
state | sed 's/^/after_/'
echo "stderr=$(base64 -w0 <&5)"
echo "console=$(base64 -w0 <"$r/dev/ttyS0")"
