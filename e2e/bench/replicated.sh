#!/usr/bin/env bash
# Scenario 7 with persistent sessions: three ringmq nodes on this machine,
# `cluster.replication_factor` 1 against 2, in alternating rounds (each on
# fresh data directories). Three load generators run at once, one per node,
# every client with cleanSession=false, QoS 1: with factor 2 each PUBACK
# waits until the subscriber's session's replica has the message too.
# Prints every round, the medians and their ratio (issue target: factor 2
# at least 0.6x factor 1); a round whose generators gave up shows 0 msg/s
# and -1 lost.
#
#   e2e/bench/replicated.sh [ROUNDS] [PAIRS_PER_GENERATOR] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
. e2e/bench/lib.sh
rounds="${1:-3}"
pairs="${2:-6}"
secs="${3:-10}"
work=$(mktemp -d)
# The nodes run in the rounds' subshells: found by their configuration's path.
trap 'kill $(jobs -p) 2>/dev/null || true; pkill -f -- "--config $work/" || true; rm -rf "$work"' EXIT
build_release
broker="$bin/ringmq-broker"
bench="$bin/ringmq-bench"
ulimit -n 20000 2>/dev/null || true
echo "bench-cluster-secret" >"$work/secret"

# node <i> <factor> <mqtt port> <cluster port> <seed cluster port or empty>
node() {
    local peers=""
    [ -n "$5" ] && peers="  peers: [\"127.0.0.1:$5\"]"
    {
        printf 'node_id: n%s\nlisteners:\n  tcp: "127.0.0.1:%s"\n  ws: null\n  tls: null\n  wss: null\n  admin: null\n' "$1" "$3"
        printf 'limits:\n  max_subscriptions_per_client: 0\ntrace:\n  message_events: 500000\n'
        printf 'persistence:\n  dir: %s\n' "$work/n$1-data"
        printf 'cluster:\n  listen: "127.0.0.1:%s"\n  secret_file: %s\n  replication_factor: %s\n%s\n' \
            "$4" "$work/secret" "$2" "$peers"
    } >"$work/n$1.yaml"
    RUST_LOG=error "$broker" --config "$work/n$1.yaml" >"$work/n$1.log" 2>&1 &
    echo $!
}

# round <factor> <n>: a fresh three-node cluster, three generators at once;
# prints "msgs/s lost".
round() {
    local f=$1 n=$2 i=0 files=() pids
    rm -rf "$work"/n*-data
    pids=("$(node 0 "$f" 23101 23201 "")")
    wait_port 23201
    pids+=("$(node 1 "$f" 23102 23202 23201)" "$(node 2 "$f" 23103 23203 23201)")
    wait_port 23101
    wait_port 23102
    wait_port 23103
    sleep 5 # the ring forms and settles
    local gens=()
    for p in 23101 23102 23103; do
        i=$((i + 1))
        "$bench" --port "$p" --scenario one-to-one --clients "$pairs" --qos 1 --payload 64 \
            --persistent --duration "$secs" --tag "r${f}x${n}g$i" >"$work/f$f-$n-$i.json" 2>/dev/null &
        gens+=("$!")
        files+=("$work/f$f-$n-$i.json")
    done
    wait "${gens[@]}" 2>/dev/null || true
    # Not this shell's children (started in command substitutions): gone
    # at once, and waited for until their ports are free.
    kill -9 "${pids[@]}" 2>/dev/null || true
    while kill -0 "${pids[@]}" 2>/dev/null; do sleep 0.1; done
    python3 - "${files[@]}" <<'PY'
import json, sys
lines = [open(f).read().strip().splitlines() for f in sys.argv[1:]]
if not all(lines):
    # A generator gave up (its receivers did not get every message in
    # time): the round counts as 0 msg/s, and -1 lost says why.
    print(0, -1)
else:
    rs = [json.loads(l[-1]) for l in lines]
    print(sum(r["msgs_per_sec"] for r in rs), sum(r["lost"] for r in rs))
PY
}

one=()
two=()
for n in $(seq "$rounds"); do
    # Alternating, so that a slower hour of the machine hits both.
    one+=("$(round 1 "$n")")
    two+=("$(round 2 "$n")")
done

python3 - "$pairs" "$secs" "${#one[@]}" "${one[@]}" "${two[@]}" <<'PY'
import statistics, sys
pairs, secs, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = sys.argv[4:]
one = [tuple(map(float, r.split())) for r in rows[:n]]
two = [tuple(map(float, r.split())) for r in rows[n:]]
print(f"QoS 1, persistent sessions, 3 nodes, 3 generators x {pairs} pairs, 64 B, {secs} s, max rate, {n} alternating rounds")
print()
print("| replication_factor | msg/s per round (lost) | median msg/s |")
print("|---|---|---|")
for name, rs in (("1", one), ("2", two)):
    shown = ", ".join(f"{m:,.0f} ({l:.0f})" for m, l in rs)
    print(f"| {name} | {shown} | {statistics.median(m for m, _ in rs):,.0f} |")
a = statistics.median(m for m, _ in one)
b = statistics.median(m for m, _ in two)
print()
print(f"factor 2 / factor 1: {b / a if a else 0:.2f}x")
PY
