#!/bin/sh
# dom0 side of the real-Xen tests, run by tests/vm/run-xen inside Xen 4.17 under QEMU
# (see scripts/test-xen). Prints DOMBUS-PASS <name> / DOMBUS-FAIL <name> <why> per check and
# exits non-zero if any failed.
cd /payload || exit 1
export DOMBUS_LINK_BIN=/payload/dombus-link RUST_BACKTRACE=1
failed=0
pass() { echo "DOMBUS-PASS $1"; }
fail() { echo "DOMBUS-FAIL $1 $2"; failed=1; }

# Waits up to $2 seconds for a line matching $1 in file $3.
wait_for() {
    i=0
    while [ "$i" -lt "$(($2 * 10))" ]; do
        grep -q "$1" "$3" 2>/dev/null && return 0
        sleep 0.1
        i=$((i + 1))
    done
    return 1
}

# Runs a test binary's ignored (real-Xen) tests one at a time.
run_tests() {
    name=$1
    shift
    if ./"$name" --ignored --test-threads 1 "$@" >"/tmp/$name.log" 2>&1; then
        pass "$name"
    else
        fail "$name" "see the log above"
    fi
    sed "s/^/[$name] /" "/tmp/$name.log"
}

# A plain file copied and compared every two seconds while the tests run (canary.sh).
./canary.sh start

echo "== dom0: the xen backend, link scenarios, sessions"
run_tests xen_backend
run_tests xen_multiprocess --nocapture

echo "== dombus-rpc over real AF_VSOCK (vsock_loopback, CID 1)"
if DOMBUS_TEST_VSOCK=1 ./conformance --exact conformance_vsock --nocapture >/tmp/conformance.log 2>&1 &&
    grep -q "vsock: conformance suite passed" /tmp/conformance.log; then
    pass "rpc-conformance-vsock"
else
    fail "rpc-conformance-vsock" "see the log above"
fi
sed "s/^/[conformance] /" /tmp/conformance.log

echo "== interoperability with libxenvchan (dom0 <-> dom0)"
# Us as server, libxenvchan as client: it sends 1 MB and checks our echo, then closes.
./dombus-link --xen serve --path data/iop-a --peer 0 echo >/tmp/iop-a.log 2>&1 &
srv=$!
if wait_for listening 30 /tmp/iop-a.log &&
    out=$(vchan-peer client 0 /local/domain/0/data/iop-a send 1000000 2>&1) &&
    echo "$out" | grep -q "echo=ok" && wait "$srv" && grep -q "echoed bytes=1000000" /tmp/iop-a.log; then
    pass "vchan-client-to-dombus-server: $out"
else
    fail "vchan-client-to-dombus-server" "$out $(cat /tmp/iop-a.log)"
fi
# libxenvchan as server, us as client: we send 1 MB and check its echo, then close.
vchan-peer server 0 /local/domain/0/data/iop-b echo >/tmp/iop-b.log 2>&1 &
srv=$!
if out=$(./dombus-link --xen connect --path data/iop-b --peer 0 --timeout-s 30 roundtrip --bytes 1000000 2>&1) &&
    echo "$out" | grep -q "echo=ok" && wait "$srv" && grep -q "echoed bytes=1000000" /tmp/iop-b.log; then
    pass "dombus-client-to-vchan-server: $(echo "$out" | grep roundtrip)"
else
    fail "dombus-client-to-vchan-server" "$out $(cat /tmp/iop-b.log)"
fi
# Debian's vchan-socket-proxy as a stdin/stdout client of our server.
./dombus-link --xen serve --path data/iop-c --peer 0 echo >/tmp/iop-c.log 2>&1 &
srv=$!
if wait_for listening 30 /tmp/iop-c.log &&
    out=$( (echo "hello through vchan-socket-proxy"; sleep 3) | timeout 20 vchan-socket-proxy 0 /local/domain/0/data/iop-c - 2>&1) &&
    echo "$out" | grep -q "hello through vchan-socket-proxy"; then
    pass "vchan-socket-proxy-to-dombus-server"
else
    fail "vchan-socket-proxy-to-dombus-server" "$out $(cat /tmp/iop-c.log)"
fi
kill "$srv" 2>/dev/null
for f in iop-a iop-b iop-c; do sed "s/^/[dom0 $f server] /" /tmp/$f.log; done

echo "== round trips under emulation (for comparison with each other only, not with hardware)"
for spin in 0 50; do
    ./dombus-link --xen serve --path data/lat$spin --peer 0 --spin-us $spin echo >/tmp/lat.log 2>&1 &
    if wait_for listening 30 /tmp/lat.log &&
        out=$(./dombus-link --xen connect --path data/lat$spin --peer 0 --spin-us $spin ping --count 2000 2>&1); then
        pass "dom0-link-ping-spin${spin}us: $(echo "$out" | grep '^ping')"
    else
        fail "dom0-link-ping-spin${spin}us" "$out $(cat /tmp/lat.log)"
    fi
    wait
done

if command -v dombus-start-domu >/dev/null && [ -d /domu ]; then
    echo "== dom0 <-> domU"
    # The domU is created paused; the dom0 ends start once it exists (xenstored drops permissions
    # naming a domain that did not exist when they were set — XSA-322) and before it runs.
    # (Processes that died in ld.so while a domU booted were the emulated XSAVE corrupting
    # registers, now turned off in tests/vm/run-xen.)
    # 256 MiB: the domU's initramfs holds our binaries; quiet kernel so the console stays readable.
    domid=$(DOMBUS_DOMU_MEMORY=256 DOMBUS_DOMU_EXTRA=loglevel=4 dombus-start-domu -p dombus-u1 | tail -n 1)
    case "$domid" in
    '' | *[!0-9]*) fail "domu-start" "no domain id: $domid" ;;
    *)
        echo "domU is domain $domid (paused)"
        ./dombus-link --xen serve --path data/u-stream --peer "$domid" --ring 1M --timeout-s 600 recv >/tmp/u-stream.log 2>&1 &
        ./dombus-link --xen serve --path data/u-mux --peer "$domid" --timeout-s 600 mux-serve >/tmp/u-mux.log 2>&1 &
        vchan-peer server "$domid" /local/domain/0/data/u-vchan echo >/tmp/u-vchan.log 2>&1 &
        ./dombus-link --xen vsock-echo --port 5000 >/tmp/u-vsock.log 2>&1 &
        wait_for listening 60 /tmp/u-stream.log && wait_for listening 60 /tmp/u-mux.log &&
            wait_for listening 60 /tmp/u-vsock.log || fail domu-servers "a dom0 server did not start"
        xl unpause dombus-u1
        if dombus-wait-domu dombus-u1 600; then pass domu; else fail domu "see the domU log above"; fi
        for f in u-stream u-mux u-vchan u-vsock; do sed "s/^/[dom0 $f] /" /tmp/$f.log; done
        grep -q "received bytes=16777216" /tmp/u-stream.log && pass "domu-stream-dom0-side" ||
            fail "domu-stream-dom0-side" "no complete stream received"
        ;;
    esac
fi

if out=$(./canary.sh stop); then
    pass "dom0-platform-canary: $out"
else
    fail dom0-platform-canary "the emulated machine corrupted a plain file copy ($out): results are not trustworthy"
fi
[ "$failed" = 0 ]
