# The guard: only PID 1 of the test guest's initramfs runs this (see 00-base.sh).
[ "$$" = 1 ] && [ "${vmapi_test_guest-}" = 1 ] && case $(/bin/busybox stat -f -c %T /) in ramfs | tmpfs) ;; *) false ;; esac || { echo "vmapi test guest: refused: only PID 1 of the test guest's initramfs (kernel command line vmapi_test_guest=1) runs this; nothing was changed" >&2; exit 64; }
# The guest configures itself from the seed, as cloud-init would (this guest has none):
# each NIC of the network-config found by its MAC, given its addresses, the default
# gateways and the DNS servers; the host name of the meta-data. Then busybox httpd answers
# on port 80 with what the guest was told, for a test to read over the network. The
# parsers are etc/vmapi-guest/nics.awk and told.awk (the keys vmapi writes, nothing more).
if [ -f /mnt/cidata/network-config ]; then
  awk -f /etc/vmapi-guest/nics.awk /mnt/cidata/network-config >/tmp/nics
  ip link set lo up
  : >/tmp/resolv.conf
  while read -r name mac addrs gw4 gw6 dns; do
    # The NIC whose MAC the seed names (virtio_net may still be probing it).
    dev=""
    i=0
    while [ -z "$dev" ] && [ "$i" -lt 100 ]; do
      for path in /sys/class/net/*; do
        [ "$(cat "$path/address" 2>/dev/null)" = "$mac" ] && dev=${path##*/}
      done
      [ -z "$dev" ] && usleep 100000
      i=$((i + 1))
    done
    if [ -z "$dev" ]; then
      echo "VMAPI-ERROR no NIC has the MAC $mac of $name"
      continue
    fi
    ip link set "$dev" up
    for address in $(echo "$addrs" | tr ',' ' '); do
      case "$address" in
        -) ;;
        *:*) ip -6 addr add "$address" dev "$dev" || echo "VMAPI-ERROR ip -6 addr add $address failed" ;;
        *) ip addr add "$address" dev "$dev" || echo "VMAPI-ERROR ip addr add $address failed" ;;
      esac
    done
    [ "$gw4" = "-" ] || ip route add default via "$gw4" dev "$dev" \
      || echo "VMAPI-ERROR default route via $gw4 failed"
    if [ "$gw6" != "-" ]; then
      # the new address's on-link route comes with it, maybe a moment later: try a while
      i=0
      until ip -6 route add default via "$gw6" dev "$dev" 2>/dev/null; do
        i=$((i + 1))
        [ "$i" -ge 20 ] && { echo "VMAPI-ERROR default route via $gw6 failed"; break; }
        usleep 250000
      done
    fi
    for server in $(echo "$dns" | tr ',' ' '); do
      [ "$server" = "-" ] || echo "nameserver $server" >>/tmp/resolv.conf
    done
    echo "VMAPI-NET name=$name dev=$dev mac=$mac addresses=$addrs gateway4=$gw4 gateway6=$gw6 dns=$dns"
  done </tmp/nics
  cp /tmp/resolv.conf /etc/resolv.conf
fi
if [ -f /mnt/cidata/meta-data ]; then
  awk -f /etc/vmapi-guest/told.awk /mnt/cidata/meta-data >/tmp/told
  told_hostname=$(awk '$1 == "hostname" { print $2 }' /tmp/told)
  [ -n "$told_hostname" ] && hostname "$told_hostname"
  mkdir -p /www
  {
    echo "VMAPI-PAGE"
    echo "hostname=$(hostname)"
    awk '$1 != "hostname" { v = $0; sub(/^[^ ]+ /, "", v); print $1 "=" v }' /tmp/told
    ip -o addr show | awk '$2 != "lo" { print "address=" $4 }'
  } >/www/index.html
  echo "VMAPI-TOLD hostname=$(hostname) keys=$(grep -c '^ssh-key ' /tmp/told) instance=$(awk '$1 == "instance-id" { print $2 }' /tmp/told)"
  httpd -p 80 -h /www && echo "VMAPI-HTTPD started"
fi
