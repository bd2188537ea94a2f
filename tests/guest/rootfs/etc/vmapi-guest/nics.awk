# The NICs of a NoCloud network-config (version 2) as vmapi writes it (PyYAML, block
# style): one line per NIC, "name mac addresses gateway4 gateway6 dns", lists joined by
# commas, "-" for nothing. Only the keys vmapi writes are read.
function unquote(v) {
  # a plain or single-quoted scalar (PyYAML quotes what would read as another type, e.g.
  # a MAC of digits only, and doubles a quote inside); double quotes carry no escapes here
  if (v ~ /^\047.*\047$/) { v = substr(v, 2, length(v) - 2); gsub(/\047\047/, "\047", v) }
  else if (v ~ /^".*"$/) { v = substr(v, 2, length(v) - 2) }
  return v
}
function dash(v) { return v == "" ? "-" : v }
function flush() {
  if (name != "") print name, mac, dash(addrs), dash(gw4), dash(gw6), dash(dns)
  name = mac = addrs = gw4 = gw6 = dns = key4 = key6 = ""
}
/^ethernets:/ { in_eth = 1; next }
/^[^ ]/ { in_eth = 0 }
!in_eth || /^ *$/ { next }
{
  match($0, /^ */); n = RLENGTH; text = substr($0, n + 1)
  if (n == 2) { flush(); name = text; sub(/:$/, "", name); next }
  item = (text ~ /^- /)
  value = text
  if (item) sub(/^- /, "", value)
  else {
    key = value; sub(/:.*/, "", key)
    value = substr(value, length(key) + 2); sub(/^ */, "", value)
  }
  value = unquote(value)
  if (n == 4 && item && key4 == "addresses") addrs = addrs (addrs == "" ? "" : ",") value
  else if (n == 4 && !item) {
    key4 = key
    if (key == "gateway4") gw4 = value
    if (key == "gateway6") gw6 = value
  }
  else if (n == 6 && !item) {
    key6 = key
    if (key == "macaddress" && key4 == "match") mac = value
  }
  else if (n == 6 && item && key4 == "nameservers" && key6 == "addresses")
    dns = dns (dns == "" ? "" : ",") value
}
END { flush() }
