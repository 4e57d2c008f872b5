#!/bin/sh
# domU side of the real-Xen tests: links and virtual sockets across the domain boundary to
# dom0 (which started its servers before creating this domain), by processes attached to Xen
# themselves and then through this domain's agent. Prints DOMBUS-PASS/FAIL lines;
# run-xen's verdict expects each of them by name (../expected-pass, as dombus-u1/<name>).
cd /payload || exit 1
export NO_COLOR=1
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
# Virtual sockets through this domain's agent (dom0's half: agent_calls in guest.sh). After
# the checks above (whose processes attach to Xen themselves, and are gone), dombusd serves
# this domain and a service on port 5100 listens through it; two dom0 processes call it at
# once. When dom0 writes data/agent-test-restart in our home, its third caller is calling: the
# agent is killed (SIGKILL, as in a crash) with the service, and both start again on the same
# port; dom0's caller must get through again. data/agent-test-done: dom0's calls are over.
AGENT=/run/dombus/agent.sock
agent_up() {
    i=0
    while [ "$i" -lt "$(($1 * 5))" ]; do
        ./dombus-link --agent "$AGENT" agent-status >/dev/null 2>&1 && return 0
        sleep 0.2
        i=$((i + 1))
    done
    return 1
}
# Waits up to $2 seconds for a line matching $1 in file $3.
wait_for() {
    i=0
    while [ "$i" -lt "$(($2 * 5))" ]; do
        grep -q "$1" "$3" 2>/dev/null && return 0
        sleep 0.2
        i=$((i + 1))
    done
    return 1
}
# Waits up to $2 seconds for dom0 to write data/$1 in this domain's home.
wait_key() {
    i=0
    while [ "$i" -lt "$(($2 * 5))" ]; do
        xenstore-read "data/$1" >/dev/null 2>&1 && return 0
        sleep 0.2
        i=$((i + 1))
    done
    return 1
}
# Starts the agent and the service (logs /tmp/agent$1.log, /tmp/echo$1.log); true once both are up.
serve() {
    RUST_LOG=info,dombus_transport_xen::vsock::domain=debug ./dombusd --xen --socket "$AGENT" >/tmp/agent"$1".log 2>&1 &
    agent=$!
    agent_up 60 || return 1
    ./dombus-link --agent "$AGENT" vsock-echo --port 5100 >/tmp/echo"$1".log 2>&1 &
    echo_pid=$!
    wait_for "vsock listening port=5100" 60 /tmp/echo"$1".log
}
if serve 1; then
    pass "domu-agent-service: $(./dombus-link --agent "$AGENT" agent-status 2>&1)"
else
    fail domu-agent-service "the agent or the service did not start: $(cat /tmp/agent1.log /tmp/echo1.log)"
fi
if wait_key agent-test-restart 300; then
    awk '{ printf "the first agent used %.2f s of CPU\n", ($14 + $15) / 100 }' "/proc/$agent/stat"
    kill -9 "$agent"
    kill "$echo_pid" 2>/dev/null
    wait "$agent" "$echo_pid" 2>/dev/null
    # dom0's caller finds the service gone for a moment.
    sleep 1
    if serve 2; then
        pass "domu-agent-restart: $(./dombus-link --agent "$AGENT" agent-status 2>&1)"
    else
        fail domu-agent-restart "the agent or the service did not start again: $(cat /tmp/agent2.log /tmp/echo2.log)"
    fi
else
    fail domu-agent-restart "dom0 never asked for the restart (data/agent-test-restart)"
fi
wait_key agent-test-done 300 || fail domu-agent-done "dom0 never said its calls were over (data/agent-test-done)"
kill "$echo_pid" "$agent" 2>/dev/null
wait "$echo_pid" "$agent" 2>/dev/null
for f in /tmp/agent1.log /tmp/echo1.log /tmp/agent2.log /tmp/echo2.log; do
    [ -f "$f" ] && sed "s|^|[$(basename "$f" .log)] |" "$f"
done

if out=$(./canary.sh stop); then
    pass "domu-platform-canary: $out"
else
    fail domu-platform-canary "the emulated machine corrupted a plain file copy ($out): results are not trustworthy"
fi
[ "$failed" = 0 ]
