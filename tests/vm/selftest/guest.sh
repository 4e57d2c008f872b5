#!/bin/sh
# Self-test payload of tests/vm/run-xen: runs in dom0 (busybox sh) and proves
# that the harness gives a working Xen dom0 toolstack, real libxenvchan peers
# dom0<->dom0 and domU<->dom0, and a PV domU whose result comes back.
#   tests/vm/run-xen --payload tests/vm/selftest
# Prints DOMBUS-PASS <name> / DOMBUS-FAIL <name> <why> per check; exits with
# the number of failures. run-xen also requires exactly the names listed in
# expected-pass (the domU's as t1/<name>): keep it in step with this script.

failures=0
pass() { echo "DOMBUS-PASS $1"; }
fail() {
    name=$1
    shift
    echo "DOMBUS-FAIL $name $*"
    failures=$((failures + 1))
}
# show FILE: print a helper's output, indented, for the console log.
show() { sed 's/^/    | /' "$1"; }

# CRC-32 (zlib) of the first N bytes of vchan-peer's test pattern, computed on
# the host with Python's zlib.crc32 — an independent check of vchan-peer's own.
CRC_1000000=16ff1a2e
CRC_200000=ef2da2f9

# --- dom0 basics ------------------------------------------------------------
t=$(cat /sys/hypervisor/type 2>/dev/null)
if [ "$t" = xen ]; then pass hypervisor-type; else fail hypervisor-type "/sys/hypervisor/type is '$t'"; fi

for dev in evtchn gntdev gntalloc privcmd; do
    if [ -c "/dev/xen/$dev" ]; then pass "dev-xen-$dev"; else fail "dev-xen-$dev" "/dev/xen/$dev missing"; fi
done

d=$(xenstore-read domid 2>&1)
if [ "$d" = 0 ]; then pass xenstore-read-domid; else fail xenstore-read-domid "got '$d'"; fi

# AF_VSOCK loopback: busybox has no vsock client, so only check that the
# transport is there (module loaded, /dev/vsock present).
if grep -q '^vsock_loopback ' /proc/modules && [ -c /dev/vsock ]; then
    pass vsock-loopback-loaded
else
    fail vsock-loopback-loaded "vsock_loopback not loaded or /dev/vsock missing"
fi

# --- libxenvchan dom0 <-> dom0 -----------------------------------------------
vchan_dom0() {
    path=/local/domain/0/data/vtest
    vchan-peer server 0 "$path" echo >/tmp/vtest-server.out 2>&1 &
    spid=$!
    start=$(date +%s)
    vchan-peer client 0 "$path" send 1000000 >/tmp/vtest-client.out 2>&1
    crc=$?
    wait "$spid"
    src=$?
    echo "  vchan dom0<->dom0 1000000 bytes: $(($(date +%s) - start)) s"
    show /tmp/vtest-server.out
    show /tmp/vtest-client.out
    if [ "$crc" != 0 ] || [ "$src" != 0 ]; then
        fail vchan-dom0-dom0 "client rc=$crc server rc=$src"
    elif ! grep -qx "vchan-peer sent bytes=1000000 crc=$CRC_1000000 echo=ok" /tmp/vtest-client.out; then
        fail vchan-dom0-dom0 "client output/crc unexpected"
    elif ! grep -qx "vchan-peer echoed bytes=1000000" /tmp/vtest-server.out; then
        fail vchan-dom0-dom0 "server did not echo 1000000 bytes"
    elif xenstore-exists "$path/ring-ref" 2>/dev/null; then
        fail vchan-dom0-dom0 "server left $path in xenstore after close"
    else
        pass vchan-dom0-dom0
    fi
}
vchan_dom0

# --- PV domU, libxenvchan domU <-> dom0 ---------------------------------------
vchan_domu() {
    start=$(date +%s)
    if ! id=$(dombus-start-domu t1); then
        fail domu-start "dombus-start-domu failed"
        return
    fi
    case "$id" in
    '' | *[!0-9]*)
        fail domu-start "bad domid '$id'"
        return
        ;;
    esac
    echo "  domU t1 is domain $id (xl create took $(($(date +%s) - start)) s)"
    pass domu-start

    # The server grants its ring to the domU's id and lets that domain read
    # its xenstore keys (libxenvchan sets the permissions), so it can only be
    # started now. The domU's client retries until the keys appear.
    path=/local/domain/0/data/vdomu
    # Its idle limit counts from before the domU boots: generous, as a loaded host is slow.
    VCHAN_PEER_IDLE_TIMEOUT=600 vchan-peer server "$id" "$path" echo >/tmp/vdomu-server.out 2>&1 &
    spid=$!

    dombus-wait-domu t1 180
    wrc=$?
    wait "$spid"
    src=$?
    echo "  domU run took $(($(date +%s) - start)) s"
    show /tmp/vdomu-server.out
    if [ "$wrc" != 0 ]; then
        fail domu-vchan "domU rc=$wrc"
    elif [ "$src" != 0 ]; then
        fail domu-vchan "dom0 server rc=$src"
    elif ! grep -qx "vchan-peer echoed bytes=200000" /tmp/vdomu-server.out; then
        fail domu-vchan "dom0 server did not echo 200000 bytes"
    elif ! grep -q "vchan-peer sent bytes=200000 crc=$CRC_200000 echo=ok" /var/log/xen/console/guest-t1.log; then
        fail domu-vchan "domU client output/crc unexpected"
    else
        pass domu-vchan
    fi

    # on_poweroff="destroy": the domain goes away after its init powers off.
    i=0
    while xl domid t1 >/dev/null 2>&1 && [ "$i" -lt 50 ]; do
        i=$((i + 1))
        sleep 0.2
    done
    if xl domid t1 >/dev/null 2>&1; then fail domu-destroyed "t1 still exists"; else pass domu-destroyed; fi
}
vchan_domu

echo "selftest: $failures failure(s)"
exit "$failures"
