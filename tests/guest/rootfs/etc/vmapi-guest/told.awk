# What a NoCloud meta-data (as vmapi writes it) tells the guest: lines "instance-id ID",
# "hostname NAME" and one "ssh-key KEY" per public key, in order.
function unquote(v) {
  if (v ~ /^\047.*\047$/) { v = substr(v, 2, length(v) - 2); gsub(/\047\047/, "\047", v) }
  else if (v ~ /^".*"$/) { v = substr(v, 2, length(v) - 2) }
  return v
}
/^[^ -]/ {
  key = $0; sub(/:.*/, "", key)
  value = substr($0, length(key) + 2); sub(/^ */, "", value)
  value = unquote(value)
  if (key == "local-hostname") print "hostname", value
  if (key == "instance-id") print "instance-id", value
  next
}
/^- / && key == "public-keys" { print "ssh-key", unquote(substr($0, 3)) }
