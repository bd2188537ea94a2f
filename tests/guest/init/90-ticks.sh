# A counter once a second, forever: it shows the guest is alive and never restarted.
n=0
while :; do
  n=$((n + 1))
  echo "VMAPI-TICK $n"
  sleep 1
done
