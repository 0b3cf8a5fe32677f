#!/usr/bin/env bash
# The message path of this build against another build of ringmq and the
# peers, alternating in every round on this machine (a before/after of a
# change, and where it stands against Mosquitto and rumqttd):
#   scenario 1: QoS 0, one-to-one, 64 B, 10 pairs, max rate
#   scenario 4: QoS 1, one-to-one, 64 B, 16 pairs, max rate
# Each round runs every broker once per scenario, in turn; the table gives
# every round and the median, then the ratios of the medians.
#
#   RINGMQ_BASE_BIN=<other ringmq-broker> e2e/bench/hotpath.sh [ROUNDS] [SECS]   # defaults: 5 rounds of 10 s
#
# Without RINGMQ_BASE_BIN only this build and the installed peers run.
set -euo pipefail
cd "$(dirname "$0")/../.."
. e2e/bench/lib.sh
rounds="${1:-5}"
secs="${2:-10}"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
build_release
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

port=24900
start() { # variant -> sets pid
    rm -rf "$work/data"
    case "$1" in
    ringmq | base)
        broker="$bin/ringmq-broker"
        [ "$1" = base ] && broker="$RINGMQ_BASE_BIN"
        # The embedded defaults (a durable node), on this port.
        printf 'listeners:\n  tcp: "127.0.0.1:%s"\n  ws: null\n  admin: null\nlimits:\n  max_subscriptions_per_client: 0\npersistence:\n  dir: %s/data\n' \
            "$port" "$work" >"$work/ringmq.yaml"
        RUST_LOG=error "$broker" --config "$work/ringmq.yaml" >"$work/ringmq.log" 2>&1 &
        ;;
    mosquitto)
        printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000\n' "$port" >"$work/mosquitto.conf"
        mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
        ;;
    rumqttd)
        printf 'id = 0\n[router]\nid = 0\nmax_connections = 20010\nmax_outgoing_packet_count = 200\nmax_segment_size = 104857600\nmax_segment_count = 10\n[v4.1]\nname = "v4-1"\nlisten = "127.0.0.1:%s"\nnext_connection_delay_ms = 0\n    [v4.1.connections]\n    connection_timeout_ms = 60000\n    max_payload_size = 20480\n    max_inflight_count = 100\n    dynamic_filters = true\n' \
            "$port" >"$work/rumqttd.toml"
        rumqttd -c "$work/rumqttd.toml" >"$work/rumqttd.log" 2>&1 &
        ;;
    esac
    pid=$!
    wait_port "$port"
}

scenarios=(
    "1:QoS 0, one-to-one, 64 B, 10 pairs, max rate:--scenario one-to-one --clients 10 --qos 0 --payload 64"
    "4:QoS 1, one-to-one, 64 B, 16 pairs, max rate:--scenario one-to-one --clients 16 --qos 1 --payload 64"
)
variants=(ringmq)
[ -n "${RINGMQ_BASE_BIN:-}" ] && variants+=(base)
command -v mosquitto >/dev/null && variants+=(mosquitto) || echo "mosquitto not installed: skipped" >&2
command -v rumqttd >/dev/null && variants+=(rumqttd) || echo "rumqttd not installed: skipped" >&2

declare -A runs
field() { sed -n "s/.*\"$2\":\([^,}]*\).*/\1/p" <<<"$1"; }
for r in $(seq "$rounds"); do
    for sc in "${scenarios[@]}"; do
        id=${sc%%:*}
        args=${sc##*:}
        for v in "${variants[@]}"; do
            port=$((port + 1))
            start "$v"
            line=$("$bin/ringmq-bench" --port "$port" $args --duration "$secs" --broker-pid "$pid" --tag "h$id$v$r" || echo '{"error":true}')
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            echo "round $r $id $v $line" >&2
            runs["$id,$v"]+="$(field "$line" msgs_per_sec)/$(field "$line" lost) "
        done
    done
done

print_medians ringmq
