#!/bin/sh
# domU side of the real-Xen tests: links and virtual sockets across the domain boundary to
# dom0 (which started its servers before creating this domain). Prints DOMBUS-PASS/FAIL lines;
# run-xen's verdict expects each of them by name (../expected-pass, as dombus-u1/<name>).
cd /payload || exit 1
failed=0
pass() { echo "DOMBUS-PASS $1"; }
fail() { echo "DOMBUS-FAIL $1 $2"; failed=1; }

check() {
    name=$1
    want=$2
    shift 2
    if out=$("$@" 2>&1) && echo "$out" | grep -q "$want"; then
        pass "$name: $(echo "$out" | grep "$want")"
    else
        fail "$name" "$out"
    fi
}

# The same platform canary as dom0's (canary.sh).
./canary.sh start

# The CRC-32s are the pattern's, computed on the host (see guest.sh); dom0 checks the stream's
# receiving end byte by byte and compares it with the line printed here.
check domu-link-stream "sent bytes=16777216 crc=c6c011d9 " ./dombus-link --xen connect --path data/u-stream --peer 0 --ring 1M send --bytes 16M
check domu-sessions "mux echo conns=4 ok=4" ./dombus-link --xen connect --path data/u-mux --peer 0 mux-check --conns 4
check domu-vchan-interop "roundtrip bytes=1000000 crc=16ff1a2e echo=ok" ./dombus-link --xen connect --path data/u-vchan --peer 0 roundtrip --bytes 1000000
check domu-vsock "round_trips=400" ./dombus-link --xen vsock-ping --to xen:0:5000 --conns 4 --count 100 --wait-s 60
check domu-ping "p50_us" ./dombus-link --xen vsock-ping --to xen:0:5000 --conns 1 --count 500 --wait-s 60
if out=$(./canary.sh stop); then
    pass "domu-platform-canary: $out"
else
    fail domu-platform-canary "the emulated machine corrupted a plain file copy ($out): results are not trustworthy"
fi
[ "$failed" = 0 ]
