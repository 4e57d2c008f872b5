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

# A subscription to a stream of dom0's (dom0's half: ticks_restart in guest.sh), through this
# domain's agent: dom0's ticks service (xen:0:5200, which a rule of dom0's policy lets us call)
# publishes 1000 ticks when our subscriber asks, and the subscriber must receive each once, in
# order (it fails on a gap, a repeat or a resync). Then we write data/ticks-restart while its
# next poll waits: dom0 kills the service and starts a new one, and the subscriber must be told
# by one new-epoch resync naming the old epoch (its poll's connection was cut: the client
# makes a new one, retrying the poll, and the line counts the polls that failed meanwhile),
# then receive the new service's 1000 ticks.
./dombus-link --agent "$AGENT" ticks-watch --to xen:0:5200 --count 1000 --restart --patience-s 120 >/tmp/ticks.log 2>&1 &
ticks=$!
if wait_for "^ticks waiting-for-restart" 180 /tmp/ticks.log; then
    xenstore-write data/ticks-restart 1
else
    xenstore-write data/ticks-restart none
fi
wait "$ticks"
rc=$?
xenstore-write data/ticks-done 1
start=$(grep "^ticks phase=start" /tmp/ticks.log)
if echo "$start" | grep -q " events=1000 ticks=1\.\.1000 "; then
    pass "domu-subscription-in-order: $start"
else
    fail domu-subscription-in-order "want ticks 1 to 1000, each once and in order; rc=$rc: $(cat /tmp/ticks.log)"
fi
again=$(grep "^ticks phase=restart" /tmp/ticks.log)
e1=$(echo "$start" | sed -n 's/.* epoch=\([0-9a-f]*\) .*/\1/p')
prev=$(echo "$again" | sed -n 's/.* previous=\([0-9a-f]*\) .*/\1/p')
e2=$(echo "$again" | sed -n 's/.* epoch=\([0-9a-f]*\) .*/\1/p')
if [ "$rc" = 0 ] && [ -n "$e1" ] && [ "$prev" = "$e1" ] && [ -n "$e2" ] && [ "$e2" != "$e1" ] &&
    echo "$again" | grep -q " events=1000 ticks=1\.\.1000 "; then
    pass "domu-subscription-across-server-restart: $again"
else
    fail domu-subscription-across-server-restart "want a resync from epoch '$e1' to a new one, then ticks 1 to 1000; rc=$rc: $(cat /tmp/ticks.log)"
fi
sed "s/^/[ticks-watch] /" /tmp/ticks.log

# The connection manager in dom0 decides this domain's connections (dom0's half: policy_checks
# in guest.sh). dom0's echo service on port 5001 is not ours to call until the toolstack adds a
# rule: the refusal names the manager's decision, which dom0 looks up in its audit trail
# (data/policy-denied); once dom0 says the rule is in force (data/policy-allowed), the same
# call goes through (tried up to 3 times, 2 s apart; the line says which attempt worked).
out=$(./dombus-link --agent "$AGENT" vsock-ping --to xen:0:5001 --count 10 --wait-s 10 2>&1)
rc=$?
decision=$(echo "$out" | sed -n "s/.*refused by the host's connection manager (decision \([0-9][0-9]*\)).*/\1/p" | head -n 1)
if [ "$rc" != 0 ] && [ -n "$decision" ]; then
    pass "domu-call-denied-by-default: $(echo "$out" | grep "decision $decision")"
    xenstore-write data/policy-denied "$decision"
else
    fail domu-call-denied-by-default "want a refusal naming the manager's decision; rc=$rc: $out"
    xenstore-write data/policy-denied none
fi
if wait_key policy-allowed 300; then
    tries=0 out=""
    while [ "$tries" -lt 3 ]; do
        tries=$((tries + 1))
        out=$(./dombus-link --agent "$AGENT" vsock-ping --to xen:0:5001 --count 100 --wait-s 10 2>&1) &&
            echo "$out" | grep -q "round_trips=100 " && break
        out="FAILED: $out"
        sleep 2
    done
    case "$out" in
    FAILED:*) fail domu-call-allowed-by-rule "the call failed $tries times after the rule: $out" ;;
    *) pass "domu-call-allowed-by-rule: attempt $tries: $(echo "$out" | grep round_trips)" ;;
    esac
else
    fail domu-call-allowed-by-rule "dom0 never said the rule was in force (data/policy-allowed)"
fi
xenstore-write data/policy-called 1

# Forged rendezvous. A guest cannot write in dom0's home, so it cannot make a directory that
# looks like the manager's rendezvous (/local/domain/0/data/dombus/rendezvous/<id>).
if out=$(xenstore-write /local/domain/0/data/dombus/rendezvous/99/ring-ref 8 2>&1); then
    fail domu-cannot-write-backend-rendezvous "xenstored let this domain write under dom0's rendezvous directory"
else
    pass "domu-cannot-write-backend-rendezvous: xenstore-write refused: $out"
fi
# What a link set-up writes, by hand, where no introduction put it: a link this domain serves
# for dom0 in the old self-service place (data/dombus/link/0: grants, event channel, ring-ref),
# one in a directory named like a rendezvous in our own home, requests for links (again for
# dom0's, which is up, and for a domain that does not exist). dom0 must join neither link: each
# server must time out with no client (dom0 checks its side meanwhile, see policy_checks).
me=$(xenstore-read domid)
./dombus-link --xen serve --path data/dombus/link/0 --peer 0 --timeout-s 30 echo >/tmp/forge-link.log 2>&1 &
forge1=$!
./dombus-link --xen serve --path data/dombus/rendezvous/99 --peer 0 --timeout-s 30 echo >/tmp/forge-rdv.log 2>&1 &
forge2=$!
xenstore-write data/dombus/want/0 99
xenstore-write "data/dombus/want/$((me + 1))" 1
if wait_for listening 30 /tmp/forge-link.log && wait_for listening 30 /tmp/forge-rdv.log; then
    xenstore-write data/forged-ready 1
fi
wait "$forge1"
rc1=$?
wait "$forge2"
rc2=$?
if [ "$rc1" != 0 ] && [ "$rc2" != 0 ] && grep -q "no client connected in time" /tmp/forge-link.log &&
    grep -q "no client connected in time" /tmp/forge-rdv.log && ! grep -q "^connected" /tmp/forge-link.log /tmp/forge-rdv.log; then
    pass "domu-forged-links-not-joined: neither forged link got a client in 30 s"
else
    fail domu-forged-links-not-joined "want both forged links to time out unjoined; rc=$rc1,$rc2: $(cat /tmp/forge-link.log /tmp/forge-rdv.log)"
fi
wait_key forged-checked 60 || fail domu-forged-links-not-joined "dom0 never said it had looked (data/forged-checked)"
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
