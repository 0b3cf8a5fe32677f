//! The per-pod capacity profile (C1): how many broker pods a declared
//! capacity needs and what each pod requests.
//!
//! One broker pod is sized for 50 000 connections, 20 000 weighted messages
//! per second and 250 000 subscriptions, the most demanding dimension
//! decides. These are conservative against the measurements in
//! `docs/benchmarks.md` (one 2-core node moves 170 000 QoS 1 messages a
//! second and idles at about 16 KiB per connection), leaving room for a pod
//! to take over a failed neighbour's clients.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::crd::{Edition, MqttInstanceSpec};

/// What one pod is sized for.
pub const CONNECTIONS_PER_POD: i64 = 50_000;
pub const TPS_PER_POD: i64 = 20_000;
pub const SUBSCRIPTIONS_PER_POD: i64 = 250_000;

/// Memory per connection the request reserves, bytes (idle measured at
/// 16 KiB, plus queues).
const BYTES_PER_CONNECTION: i64 = 24 * 1024;
const BASE_MEMORY_MIB: i64 = 256;
/// Weighted messages per second one CPU core carries comfortably.
const TPS_PER_CORE: i64 = 20_000;

/// The fewest pods an edition runs, for availability.
fn edition_minimum(edition: Edition) -> i32 {
    match edition {
        Edition::Basic => 1,
        Edition::Standard => 2,
        Edition::Professional => 3,
    }
}

/// Pods that keep each persistent session: the spec's, or the edition's
/// (3 for Professional, which runs at least three pods; 2 otherwise).
pub fn replication_factor(spec: &MqttInstanceSpec) -> u8 {
    spec.session
        .replication_factor
        .unwrap_or(match spec.edition {
            Edition::Professional => 3,
            Edition::Basic | Edition::Standard => 2,
        })
}

/// `a / b` rounded up, for positive `b` (signed `div_ceil` is unstable).
pub fn ceil_div(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

fn pods_for(total: i64, per_pod: i64) -> i32 {
    i32::try_from(ceil_div(total, per_pod)).unwrap_or(i32::MAX)
}

/// Pods for the spec: the override, or the capacity's need (at least the
/// edition's minimum).
pub fn replicas(spec: &MqttInstanceSpec) -> i32 {
    if let Some(r) = spec.replicas {
        return r;
    }
    let c = &spec.capacity;
    [
        pods_for(c.connections, CONNECTIONS_PER_POD),
        pods_for(c.tps, TPS_PER_POD),
        pods_for(c.subscriptions, SUBSCRIPTIONS_PER_POD),
        edition_minimum(spec.edition),
    ]
    .into_iter()
    .max()
    .unwrap_or(1)
}

/// Requests and limits of one pod: memory for the connections and CPU for
/// the TPS one pod carries at most (the per-pod profile, or the whole
/// capacity when that is smaller). Independent of the replica count, so
/// that scaling never changes the pod template and rolls every pod.
pub fn resources(spec: &MqttInstanceSpec) -> ResourceRequirements {
    if let Some(r) = &spec.pod.resources {
        return r.clone();
    }
    let connections = spec.capacity.connections.min(CONNECTIONS_PER_POD);
    let tps = spec.capacity.tps.min(TPS_PER_POD);
    let memory_mib = BASE_MEMORY_MIB + ceil_div(connections * BYTES_PER_CONNECTION, 1 << 20);
    let millicores = (tps * 1000 / TPS_PER_CORE).max(250);
    let q = |s: String| Quantity(s);
    ResourceRequirements {
        requests: Some(
            [
                ("cpu".to_owned(), q(format!("{millicores}m"))),
                ("memory".to_owned(), q(format!("{memory_mib}Mi"))),
            ]
            .into(),
        ),
        limits: Some([("memory".to_owned(), q(format!("{}Mi", memory_mib * 2)))].into()),
        ..ResourceRequirements::default()
    }
}

/// Bytes a stored queued message takes on disk, with the engine's overhead
/// (a typical device payload of a few hundred bytes, its topic and key).
const BYTES_PER_QUEUED_MESSAGE: i64 = 2 * 1024;
/// Room for the store's journal (64 MiB at most), compaction and the
/// trace/metering journal (1 GiB at most).
const BASE_STORAGE_MIB: i64 = 2 * 1024;

/// Each pod's data volume: the override, or room for every connection a
/// pod is sized for holding a full offline queue, plus the journals;
/// rounded up to whole GiB. Independent of the replica count, like
/// `resources`.
pub fn storage_size(spec: &MqttInstanceSpec) -> Quantity {
    if let Some(size) = &spec.storage.size {
        return Quantity(size.clone());
    }
    let connections = spec.capacity.connections.min(CONNECTIONS_PER_POD);
    let queue = i64::from(spec.session.offline_queue_len);
    let mib = BASE_STORAGE_MIB + ceil_div(connections * queue * BYTES_PER_QUEUED_MESSAGE, 1 << 20);
    Quantity(format!("{}Gi", ceil_div(mib, 1024)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Capacity;

    fn spec(connections: i64, tps: i64, subscriptions: i64) -> MqttInstanceSpec {
        serde_json::from_value(serde_json::json!({
            "capacity": {"connections": connections, "tps": tps, "subscriptions": subscriptions}
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_most_demanding_dimension_decides() {
        assert_eq!(replicas(&spec(100, 100, 1000)), 1);
        assert_eq!(replicas(&spec(50_001, 100, 1000)), 2);
        assert_eq!(replicas(&spec(100, 100_000, 1000)), 5);
        assert_eq!(replicas(&spec(2_000_000, 500_000, 5_000_000)), 40);
        let mut s = spec(100, 100, 1000);
        s.edition = Edition::Professional;
        assert_eq!(replicas(&s), 3);
        s.replicas = Some(7);
        assert_eq!(replicas(&s), 7);
        assert_eq!(
            s.capacity,
            Capacity {
                connections: 100,
                tps: 100,
                subscriptions: 1000
            }
        );
    }

    #[test]
    fn requests_follow_what_one_pod_carries() {
        let s = spec(100_000, 40_000, 1000);
        let r = resources(&s);
        let req = r.requests.unwrap_or_default();
        // 50 000 connections x 24 KiB = 1 172 MiB, plus 256.
        assert_eq!(req["memory"].0, "1428Mi");
        assert_eq!(req["cpu"].0, "1000m");
        assert_eq!(r.limits.unwrap_or_default()["memory"].0, "2856Mi");
    }

    #[test]
    fn a_small_instance_requests_for_its_capacity_only() {
        let r = resources(&spec(1000, 500, 1000));
        let req = r.requests.unwrap_or_default();
        // 1 000 x 24 KiB = 24 MiB, plus 256; the CPU floor.
        assert_eq!(req["memory"].0, "280Mi");
        assert_eq!(req["cpu"].0, "250m");
    }
    fn yaml_spec(yaml: &str) -> MqttInstanceSpec {
        serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn storage_follows_the_capacity_unless_set() {
        let small = yaml_spec("capacity: { connections: 100, tps: 100, subscriptions: 100 }");
        assert_eq!(storage_size(&small).0, "3Gi");
        // 50 000 connections a pod, 1 000 offline messages each: ~95 GiB.
        let big = yaml_spec(
            "capacity: { connections: 2000000, tps: 100, subscriptions: 100 }\nsession: { offlineQueueLen: 1000 }",
        );
        assert_eq!(storage_size(&big).0, "98Gi");
        let set = yaml_spec(
            "capacity: { connections: 100, tps: 100, subscriptions: 100 }\nstorage: { size: 500Mi }",
        );
        assert_eq!(storage_size(&set).0, "500Mi");
    }

    #[test]
    fn the_replication_factor_follows_the_edition_unless_set() {
        let caps = "capacity: { connections: 100, tps: 100, subscriptions: 100 }";
        let of = |extra: &str| replication_factor(&yaml_spec(&format!("{caps}\n{extra}")));
        assert_eq!(of(""), 2);
        assert_eq!(of("edition: Standard"), 2);
        assert_eq!(of("edition: Professional"), 3);
        assert_eq!(
            of("edition: Professional\nsession: { replicationFactor: 1 }"),
            1
        );
    }
}
