#!/usr/bin/env bash
# End to end on a real Kubernetes cluster (kind): build both images, install
# the operator with its Helm chart, declare an instance, and check that it
# becomes Ready, carries MQTT traffic, reports it in its status, scales up
# and back down (drain), and is cleaned up on deletion.
#
# Needs docker (with a running daemon), kind, kubectl, helm and
# mosquitto_pub/mosquitto_sub. Where one is missing it says so and exits 77
# (skipped); it never reports success without having run.
set -euo pipefail
cd "$(dirname "$0")/../.."

missing=()
for tool in docker kind kubectl helm mosquitto_pub mosquitto_sub; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -eq 0 ] && ! docker info >/dev/null 2>&1; then
    missing+=("a running docker daemon")
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "SKIPPED: the kind e2e needs ${missing[*]}" >&2
    exit 77
fi

cluster="${KIND_CLUSTER:-ringmq-e2e}"
tag="e2e-$(git rev-parse --short HEAD 2>/dev/null || echo local)"
ns=mqtt
cleanup() {
    [ -n "${pf:-}" ] && kill "$pf" 2>/dev/null || true
    [ "${KEEP_CLUSTER:-}" = 1 ] || kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
}
trap cleanup EXIT

kind create cluster --name "$cluster" --wait 120s
docker build -q -f broker/Dockerfile -t "ghcr.io/ringmq/ringmq-broker:$tag" .
docker build -q -f operator/Dockerfile -t "ghcr.io/ringmq/ringmq-operator:$tag" .
kind load docker-image --name "$cluster" "ghcr.io/ringmq/ringmq-broker:$tag" "ghcr.io/ringmq/ringmq-operator:$tag"

helm install ringmq charts/ringmq-operator --namespace ringmq-system --create-namespace \
    --set image.tag="$tag" --set brokerImage.tag="$tag" --set image.pullPolicy=Never \
    --set replicas=2 --wait
# Two operator replicas: one holds the leader Lease.
leader=""
for _ in $(seq 30); do
    leader=$(kubectl -n ringmq-system get lease -o jsonpath='{.items[*].spec.holderIdentity}')
    [ -n "$leader" ] && break
    sleep 2
done
[ -n "$leader" ] || { echo "no operator replica holds the leader Lease" >&2; exit 1; }
kubectl create namespace "$ns"
kubectl apply -f manifests/examples/small.yaml
kubectl -n "$ns" wait mqttinstance/small --for=condition=Ready --timeout=300s

# Traffic through the device Service.
kubectl -n "$ns" port-forward svc/small 18830:1883 >/dev/null 2>&1 &
pf=$!
sleep 3
mosquitto_sub -h 127.0.0.1 -p 18830 -t 'e2e/#' -C 1 -W 30 -i e2e-sub > /tmp/ringmq-e2e.out &
sub=$!
sleep 2
mosquitto_pub -h 127.0.0.1 -p 18830 -t e2e/hello -m kind -q 1 -i e2e-pub
wait "$sub"
grep -qx kind /tmp/ringmq-e2e.out

# The status reports the instance (the subscriber is gone again: any count).
kubectl -n "$ns" get mqttinstance small -o jsonpath='{.status.nodes[0].name}' | grep -qx small-0

# Scale up, then down: the second pod is drained, then removed.
kubectl -n "$ns" scale mqttinstance small --replicas=2
kubectl -n "$ns" rollout status statefulset/small --timeout=300s
kubectl -n "$ns" wait mqttinstance/small --for=jsonpath='{.status.readyReplicas}'=2 --timeout=300s
kubectl -n "$ns" scale mqttinstance small --replicas=1
kubectl -n "$ns" wait statefulset/small --for=jsonpath='{.spec.replicas}'=1 --timeout=300s

# Deletion leaves nothing behind.
kubectl -n "$ns" delete mqttinstance small --wait --timeout=120s
kubectl -n "$ns" wait statefulset/small --for=delete --timeout=120s
echo "kind e2e passed"
