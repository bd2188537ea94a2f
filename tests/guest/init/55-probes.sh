# The guard: only PID 1 of the test guest's initramfs runs this (see 00-base.sh).
[ "$$" = 1 ] && [ "${vmapi_test_guest-}" = 1 ] && case $(/bin/busybox stat -f -c %T /) in ramfs | tmpfs) ;; *) false ;; esac || { echo "vmapi test guest: refused: only PID 1 of the test guest's initramfs (kernel command line vmapi_test_guest=1) runs this; nothing was changed" >&2; exit 64; }
# The probes: the web server 45-network.sh started runs /www/cgi-bin/probe on request
# (the test asks the guest to try one thing, a spoof most often, and reads what it did;
# tests/hypervisor/probes.py); raw frames go out through /bin/vmapi-sendframe.
if [ -x /www/cgi-bin/probe ] && [ -x /bin/vmapi-sendframe ]; then
  echo "VMAPI-PROBES ready"
else
  echo "VMAPI-ERROR the probe CGI or /bin/vmapi-sendframe is missing"
fi
