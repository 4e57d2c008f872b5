#!/bin/sh
# Self-test domU part (see ../guest.sh): runs in the PV domU started with
# `dombus-start-domu t1`; dom0 runs the echo server for our domid.

failures=0
d=$(xenstore-read domid 2>&1)
case "$d" in
'' | 0 | *[!0-9]*)
    echo "DOMBUS-FAIL domu-xenstore-domid got '$d'"
    failures=$((failures + 1))
    ;;
*) echo "DOMBUS-PASS domu-xenstore-domid" ;;
esac

for dev in evtchn gntdev gntalloc; do
    if [ -c "/dev/xen/$dev" ]; then
        echo "DOMBUS-PASS domu-dev-xen-$dev"
    else
        echo "DOMBUS-FAIL domu-dev-xen-$dev missing"
        failures=$((failures + 1))
    fi
done

if vchan-peer client 0 /local/domain/0/data/vdomu send 200000; then
    echo "DOMBUS-PASS domu-vchan-client"
else
    echo "DOMBUS-FAIL domu-vchan-client vchan-peer client failed"
    failures=$((failures + 1))
fi
exit "$failures"
