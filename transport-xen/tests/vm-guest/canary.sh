#!/bin/sh
# Platform canary for the real-Xen runs, in dom0 and in the domU: while the tests run, a plain
# file is copied and the copy compared every two seconds. A difference means the emulated
# machine itself corrupted memory (as it did while it offered XSAVE, see tests/vm/run-xen), so
# that a damaged stream is never mistaken for a dombus bug.
#
#   canary.sh start   starts the loop, detached (not a child of the caller, whose bare `wait`s
#                     must not wait for it)
#   canary.sh stop    stops it and prints "copies=N bad=M"; exits 0 only if no copy differed
file=/payload/dombus-link
case "$1" in
start)
    rm -f /tmp/canary.stop /tmp/canary.result
    (
        (
            n=0 bad=0
            while [ ! -e /tmp/canary.stop ]; do
                cp "$file" /tmp/canary.copy
                cmp -s "$file" /tmp/canary.copy || bad=$((bad + 1))
                n=$((n + 1))
                sleep 2
            done
            echo "copies=$n bad=$bad" >/tmp/canary.result
        ) </dev/null >/dev/null 2>&1 &
    )
    ;;
stop)
    touch /tmp/canary.stop
    i=0
    while [ ! -s /tmp/canary.result ] && [ "$i" -lt 300 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    result=$(cat /tmp/canary.result 2>/dev/null)
    echo "${result:-the canary never reported}"
    case "$result" in
    *" bad=0") exit 0 ;;
    *) exit 1 ;;
    esac
    ;;
*)
    echo "usage: canary.sh start|stop" >&2
    exit 2
    ;;
esac
