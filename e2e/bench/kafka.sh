#!/usr/bin/env bash
# Scenario 6: ringmq's uplink into a Kafka-protocol broker against that
# broker's own producer ceiling, with the same records. nisshi (the Kafka
# tests' broker, SQLite storage) runs once for both halves:
#   1. ringmq with the parent topic `bench6` declared; ringmq-bench fan-in,
#      PUBLISHERS MQTT clients at QoS 1 as fast as they are acknowledged
#      (ringmq acknowledges a QoS 1 publish once Kafka has it, K3);
#   2. kafka_ceiling.py: copies of one record ringmq wrote, produced straight
#      into a topic of as many partitions with ringmq's producer settings.
# Prints a markdown table for docs/benchmarks.md.
#
#   e2e/bench/kafka.sh [PUBLISHERS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
. e2e/bench/lib.sh
publishers="${1:-16}"
secs="${2:-10}"
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
build_release
nisshi_bin="${NISSHI:-$(command -v nisshi || echo "$HOME/.cargo/bin/nisshi")}"
kport=21990
mport=21991
bootstrap="127.0.0.1:$kport"

(cd "$work" && exec env -u LISTENER_URL -u ADVERTISED_LISTENER_URL -u STORAGE_ENGINE \
    "$nisshi_bin" broker --storage-engine sqlite://./kafka.db \
    --listener-url "tcp://$bootstrap" --advertised-listener-url "tcp://$bootstrap" \
    >"$work/nisshi.log" 2>&1) &
pids+=($!)
wait_port "$kport"

cat >"$work/ringmq.yaml" <<EOF
listeners:
  tcp: "127.0.0.1:$mport"
  ws: null
  admin: null
persistence:
  dir: $work/ringmq-data
kafka:
  bootstrap_servers: "$bootstrap"
  parent_topics:
    - name: bench6
EOF
RUST_LOG=error "$bin/ringmq-broker" --config "$work/ringmq.yaml" >"$work/ringmq.log" 2>&1 &
broker=$!
pids+=("$broker")
wait_port "$mport"
uplink=$("$bin/ringmq-bench" --port "$mport" --scenario fan-in --clients "$publishers" \
    --qos 1 --duration "$secs" --tag bench6 --broker-pid "$broker")
kill "$broker"
wait "$broker" 2>/dev/null || true
stored=$(python3 e2e/bench/kafka_ceiling.py count --bootstrap "$bootstrap" --topic bench6)
ceiling=$(python3 e2e/bench/kafka_ceiling.py produce --bootstrap "$bootstrap" \
    --sample-topic bench6 --topic bench6-ceiling --seconds "$secs")

python3 - "$uplink" "$stored" "$ceiling" "$publishers" "$secs" <<'EOF'
import json, sys
u, stored, c = (json.loads(a) for a in sys.argv[1:4])
publishers, secs = sys.argv[4], float(sys.argv[5])
uplink = u["sent"] / secs
print(f"QoS 1 uplink, {publishers} MQTT publishers, 64 B payloads, {secs:g} s; "
      f"Kafka record value {c['value_bytes']} B\n")
print("| | records/s into Kafka | ratio |")
print("|---|---|---|")
print(f"| ringmq uplink (MQTT QoS 1, acknowledged after Kafka) | {uplink:,.0f} | {uplink / max(c['per_sec'], 1):.2f}x |")
print(f"| producer ceiling (confluent-kafka, same records and settings) | {c['per_sec']:,.0f} | 1.00x |")
print()
print(f"Published and acknowledged {u['sent']:,}; records in Kafka afterwards {stored['records']:,} "
      f"(the difference: one end-of-run marker per publisher); MQTT deliveries lost "
      f"{u['lost']} of {u['expected']:,}, p50 {u['p50_us'] / 1000:.0f} ms, p99 {u['p99_us'] / 1000:.0f} ms; "
      f"producer records failed {c['failed']}.")
EOF
