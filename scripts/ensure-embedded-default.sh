#!/usr/bin/env bash
# What `make run` serves, ready for the seed's example (POST /vm {cores: 2, ram: 1 GiB,
# virt_method: {id: 2}}): the configured database (default: SQLite in instance/)
# migrated and seeded, a local node on libvirt's in-process test driver, documentation
# address ranges for new VMs (ones the README's curl walk does not use itself) and a new
# admin token, printed alone on the last line. Idempotent: run it again and only the
# token is new. tests/docs/test_readme_walk.py runs this very script.
#   FLASK   the flask command (default: .venv/bin/flask --app wsgi)
set -euo pipefail
read -r -a flask <<<"${FLASK:-.venv/bin/flask --app wsgi}"

# RFC 5737 / RFC 3849 documentation ranges; the node's external addresses are in
# 192.0.2.0/24, the walk's hv1 too, the walk's VM ranges are 198.51.100.0/24 and
# 2001:db8:100::/64.
ipv4_net=203.0.113.0/24 ipv4_gw=203.0.113.1
ipv6_net=2001:db8:203::/64 ipv6_gw=2001:db8:203::1

"${flask[@]}" db upgrade
"${flask[@]}" vmapi seed
if ! "${flask[@]}" vmapi node list --quiet | grep -q .; then
  "${flask[@]}" vmapi node add --fqdn local.vmapi.test --libvirt-uri test:///default \
    --virt-method QEMU --ipv4-addr-ext 192.0.2.10/24 --ipv4-gw-ext 192.0.2.1 \
    --ipv6-addr-ext 2001:db8::10/64 --ipv6-gw-ext 2001:db8::1
fi
"${flask[@]}" vmapi network add "$ipv4_net" --gateway "$ipv4_gw" --if-missing
"${flask[@]}" vmapi network add "$ipv6_net" --gateway "$ipv6_gw" --if-missing
echo "new VMs take their addresses from $ipv4_net and the pool $ipv6_net"
echo "admin token (shown once; keep it):"
"${flask[@]}" vmapi token create --admin 2>/dev/null | tail -n 1
