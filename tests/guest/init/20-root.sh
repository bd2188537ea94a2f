# The root disk: its size as the guest sees it (a qcow2 overlay's virtual size).
i=0
while [ ! -e /sys/block/vda/size ] && [ "$i" -lt 100 ]; do usleep 100000; i=$((i + 1)); done
echo "VMAPI-GUEST root=vda sectors=$(cat /sys/block/vda/size 2>/dev/null || echo none)"
