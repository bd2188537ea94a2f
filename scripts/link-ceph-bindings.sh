#!/usr/bin/env bash
# Link Ceph's Python bindings (Debian's python3-rados and python3-rbd: librados and librbd
# for Debian's Python 3.11) into the virtualenv's site-packages, when they are installed.
# They are on no Python package index, and a virtualenv does not see Debian's
# dist-packages; the API host's in-process Ceph client (vmapi/hypervisor/librbd.py) needs
# them. Exactly the two modules are linked, nothing else of dist-packages. Idempotent;
# quiet when there is nothing to do. Usage: scripts/link-ceph-bindings.sh VENV
set -euo pipefail
venv=${1:?usage: $0 VENV}
dist=${VMAPI_CEPH_BINDINGS_DIR:-/usr/lib/python3/dist-packages}
python="$venv/bin/python"
# the file name's ABI tag must be the virtualenv's Python's (cpython-311-...): a module
# built for another Python does not load
paths=$("$python" -c 'import sysconfig as s; print(s.get_config_var("EXT_SUFFIX"), s.get_paths()["platlib"])')
read -r suffix site <<<"$paths"
linked=()
for module in rados rbd; do
  source="$dist/$module$suffix"
  target="$site/$module$suffix"
  if [ ! -e "$source" ]; then
    if compgen -G "$dist/$module.cpython-*.so" >/dev/null; then
      echo "note: $dist has Ceph's $module module for another Python than $python ($suffix);" \
        "the in-process Ceph client cannot load it" >&2
    fi
    continue
  fi
  if [ "$(readlink "$target" 2>/dev/null)" != "$source" ]; then
    ln -sfn "$source" "$target"
    linked+=("$module")
  fi
done
[ ${#linked[@]} -eq 0 ] && exit 0
if ! "$python" -c 'import rados, rbd' 2>/dev/null; then
  echo "note: Ceph's Python bindings were linked into $venv but do not import:" >&2
  "$python" -c 'import rados, rbd' >&2 || true
  exit 0
fi
echo "linked Ceph's Python bindings (${linked[*]}) into $venv" >&2
