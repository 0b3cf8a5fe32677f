#!/usr/bin/env bash
# Scenario 7: three ringmq nodes on this machine against one node, the same
# load either way. Three load generators run at once, each with its own
# clients; on the cluster each generator connects to a different node (the
# gate forwards clients whose sessions another node owns), on the single
# node all three connect to it. Prints a markdown table for
# docs/benchmarks.md with the ratios.
#
#   e2e/bench/cluster.sh [PAIRS_PER_GENERATOR] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
. e2e/bench/lib.sh
pairs="${1:-6}"
secs="${2:-10}"
work=$(mktemp -d)
nodes=()
trap 'kill $(jobs -p) "${nodes[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
build_release
broker="$bin/ringmq-broker"
bench="$bin/ringmq-bench"
ulimit -n 20000 2>/dev/null || true
echo "bench-cluster-secret" >"$work/secret"

# node <i> <mqtt port> <cluster port> <seed cluster port or empty>
node() {
    local peers=""
    [ -n "$4" ] && peers="  peers: [\"127.0.0.1:$4\"]"
    {
        printf 'node_id: n%s\nlisteners:\n  tcp: "127.0.0.1:%s"\n  ws: null\n  tls: null\n  wss: null\n  admin: null\n' "$1" "$2"
        printf 'limits:\n  max_subscriptions_per_client: 0\ntrace:\n  message_events: 500000\n'
        printf 'persistence:\n  dir: %s\n' "$work/n$1-data"
        if [ -n "$3" ]; then
            printf 'cluster:\n  listen: "127.0.0.1:%s"\n  secret_file: %s\n%s\n' "$3" "$work/secret" "$peers"
        fi
    } >"$work/n$1.yaml"
    RUST_LOG=error "$broker" --config "$work/n$1.yaml" >"$work/n$1.log" 2>&1 &
    echo $!
}

# run <label> <port> <port> <port>: three generators at once; sums msg/s,
# takes the worst p99 and adds losses.
run() {
    local label=$1
    shift
    local i=0 files=()
    for p in "$@"; do
        i=$((i + 1))
        "$bench" --port "$p" --scenario one-to-one --clients "$pairs" --qos 1 --payload 64 \
            --duration "$secs" --tag "c7$label$i" >"$work/$label$i.json" 2>/dev/null &
        files+=("$work/$label$i.json")
    done
    wait $(jobs -p | tail -n 3) 2>/dev/null || true
    python3 - "$label" "${files[@]}" <<'PY'
import json, sys
label, files = sys.argv[1], sys.argv[2:]
rs = [json.loads(open(f).read().strip().splitlines()[-1]) for f in files]
print(json.dumps({
    "label": label,
    "msgs_per_sec": sum(r["msgs_per_sec"] for r in rs),
    "p50_us": max(r["p50_us"] for r in rs),
    "p99_us": max(r["p99_us"] for r in rs),
    "lost": sum(r["lost"] for r in rs),
    "duplicates": sum(r["duplicates"] for r in rs),
    "reordered": sum(r["reordered"] for r in rs),
}))
PY
}

single=$(node 0 22001 "" "")
nodes+=("$single")
wait_port 22001
one=$(run single 22001 22001 22001)
kill "$single"; wait "$single" 2>/dev/null || true

pids=("$(node 0 22101 22201 "")")
wait_port 22201
pids+=("$(node 1 22102 22202 22201)" "$(node 2 22103 22203 22201)")
nodes+=("${pids[@]}")
wait_port 22102; wait_port 22103
sleep 5 # the ring forms and settles
three=$(run cluster 22101 22102 22103)
kill "${pids[@]}"; wait 2>/dev/null || true

python3 - "$one" "$three" "$pairs" "$secs" <<'PY'
import json, sys
one, three = json.loads(sys.argv[1]), json.loads(sys.argv[2])
pairs, secs = sys.argv[3], sys.argv[4]
print(f"QoS 1, 3 generators x {pairs} pairs, 64 B, {secs} s, max rate")
print()
print("| | single node | 3 nodes (one machine) | ratio |")
print("|---|---|---|---|")
for key, name, scale in (("msgs_per_sec", "messages/s", 1), ("p50_us", "p50 latency ms", 1000), ("p99_us", "p99 latency ms", 1000)):
    a, b = one[key] / scale, three[key] / scale
    print(f"| {name} | {a:,.0f} | {b:,.0f} | {b / a if a else 0:.2f}x |")
print(f"| lost / duplicated / reordered | {one['lost']} / {one['duplicates']} / {one['reordered']} | {three['lost']} / {three['duplicates']} / {three['reordered']} | |")
PY
