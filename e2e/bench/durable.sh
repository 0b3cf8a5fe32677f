#!/usr/bin/env bash
# The durable node's cost: QoS 1 to persistent subscribers (cleanSession=false)
# against ringmq with its store (fsync per batch, the default), the same
# build with `persistence.dir: null` (memory only) and Mosquitto with
# `persistence true`, alternating brokers in every round, in one run.
# Prints a Markdown table (per broker: each round's delivered msg/s, the
# median) and the ratios of the medians.
#
#   e2e/bench/durable.sh [ROUNDS] [SECS]      # defaults: 3 rounds of 10 s
#
# RINGMQ_BASE_BIN=<path to another ringmq-broker> adds that build as
# base-durable and base-memory to every round (a before/after comparison of
# two commits on the same machine, alternating).
set -euo pipefail
cd "$(dirname "$0")/../.."
. e2e/bench/lib.sh
rounds="${1:-3}"
secs="${2:-10}"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
build_release
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

port=23900
start() { # variant -> sets pid
    rm -rf "$work/data" "$work/mosq"
    mkdir -p "$work/data" "$work/mosq"
    case "$1" in
    ringmq-durable | ringmq-memory | base-durable | base-memory)
        dir="$work/data/store"
        [ "${1#*-}" = memory ] && dir=null
        broker="$bin/ringmq-broker"
        [ "${1%-*}" = base ] && broker="$RINGMQ_BASE_BIN"
        printf 'listeners:\n  tcp: "127.0.0.1:%s"\n  ws: null\n  admin: null\nlimits:\n  max_subscriptions_per_client: 0\n  offline_queue_len: 1000\npersistence:\n  dir: %s\n' \
            "$port" "$dir" >"$work/ringmq.yaml"
        RUST_LOG=error "$broker" --config "$work/ringmq.yaml" >"$work/ringmq.log" 2>&1 &
        ;;
    mosquitto-persist)
        printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000\npersistence true\npersistence_location %s/\n' \
            "$port" "$work/mosq" >"$work/mosquitto.conf"
        mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
        ;;
    esac
    pid=$!
    wait_port "$port"
}

scenarios=(
    "d1:QoS 1 one-to-one, 16 pairs, persistent subscribers, max rate:--scenario one-to-one --clients 16 --qos 1 --payload 64"
    "d2:fan-in 1000 publishers x 10/s QoS 1 to one persistent subscriber:--scenario fan-in --clients 1000 --qos 1 --payload 64 --rate 10"
)
variants=(ringmq-durable ringmq-memory)
[ -n "${RINGMQ_BASE_BIN:-}" ] && variants+=(base-durable base-memory)
command -v mosquitto >/dev/null && variants+=(mosquitto-persist) || echo "mosquitto not installed: skipped" >&2

declare -A runs
field() { sed -n "s/.*\"$2\":\([^,}]*\).*/\1/p" <<<"$1"; }
for r in $(seq "$rounds"); do
    for sc in "${scenarios[@]}"; do
        id=${sc%%:*}
        args=${sc##*:}
        for v in "${variants[@]}"; do
            port=$((port + 1))
            start "$v"
            line=$("$bin/ringmq-bench" --port "$port" $args --persistent --duration "$secs" --broker-pid "$pid" --tag "$id$v$r" || echo '{"error":true}')
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            echo "round $r $id $v $line" >&2
            lost=$(field "$line" lost)
            runs["$id,$v"]+="$(field "$line" msgs_per_sec)/${lost:-?} "
        done
    done
done

print_medians ringmq-durable
