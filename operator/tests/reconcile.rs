//! The reconciler against kube's mocked API (the tower-test pattern of
//! kube-rs/controller-rs): a task plays the API server over a
//! `tower_test::mock` service, keeping the objects it is sent, so each test
//! runs real reconcile passes and asserts what they applied, patched and
//! published. Broker pods and Kafka are stand-ins that record the calls;
//! `status_from_real_brokers` uses real broker processes instead.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures::future::BoxFuture;
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use ringmq_operator::brokers::{BrokerError, Brokers};
use ringmq_operator::crd::MqttInstance;
use ringmq_operator::names::Names;
use ringmq_operator::reconcile::{Context, reconcile};
use ringmq_operator::topics::{Outcome, Target, TopicError, Topics, Wanted};
use serde_json::{Value, json};

mod fakeapi;
use fakeapi::{Seen, Shared, fake_api, merge};

/// Broker pods that report `sessions[ordinal]` sessions and `instance`.
#[derive(Default)]
struct FakeBrokers {
    sessions: Mutex<BTreeMap<i32, i64>>,
    instance: Mutex<Option<Value>>,
    alarms: Mutex<Value>,
    drained: Mutex<Vec<i32>>,
}

impl Brokers for FakeBrokers {
    fn get(
        &self,
        names: &Names,
        ordinal: i32,
        path: &str,
        _token: &str,
    ) -> BoxFuture<'static, Result<Value, BrokerError>> {
        let unreachable = || BrokerError::Timeout {
            addr: names.pod_host(ordinal),
        };
        let answer = match path {
            "instance" => {
                let mut v = self.instance.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_else(|| {
                    json!({"totals": {"connections": 0, "subscriptions": 0, "topics": 0, "pubTps": 0.0, "subTps": 0.0}, "nodes": []})
                });
                let sessions = self
                    .sessions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&ordinal)
                    .copied();
                match sessions {
                    Some(n) => {
                        v["nodes"] = json!([{"name": names.pod(ordinal), "sessions": n, "state": "leaving"}]);
                        Ok(v)
                    }
                    None if self
                        .instance
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .is_some() =>
                    {
                        Ok(v)
                    }
                    None => Err(unreachable()),
                }
            }
            "alarms" => Ok(self
                .alarms
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()),
            _ => Err(unreachable()),
        };
        Box::pin(async move { answer })
    }

    fn drain(
        &self,
        _names: &Names,
        ordinal: i32,
        _token: &str,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.drained
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ordinal);
        Box::pin(async { Ok(()) })
    }
}

/// Kafka that records what it was asked and answers from a script.
#[derive(Default)]
struct FakeTopics {
    ensured: Mutex<Vec<Vec<Wanted>>>,
    deleted: Mutex<Vec<Vec<String>>>,
    shrink: Mutex<Option<String>>,
    grow: Mutex<Option<String>>,
    unreachable: Mutex<bool>,
}

impl Topics for FakeTopics {
    fn ensure(
        &self,
        _t: Target,
        wanted: Vec<Wanted>,
    ) -> BoxFuture<'static, Result<Vec<(String, Outcome)>, TopicError>> {
        let shrink = self
            .shrink
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let grow = self.grow.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let out = wanted
            .iter()
            .map(|w| {
                let o = if shrink.as_deref() == Some(w.name.as_str()) {
                    Outcome::CannotShrink {
                        have: w.partitions + 3,
                        want: w.partitions,
                    }
                } else if grow.as_deref() == Some(w.name.as_str()) {
                    Outcome::Grown {
                        from: 1,
                        to: w.partitions,
                    }
                } else {
                    Outcome::Created
                };
                (w.name.clone(), o)
            })
            .collect();
        self.ensured
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(wanted);
        Box::pin(async move { Ok(out) })
    }

    fn delete(&self, _t: Target, names: Vec<String>) -> BoxFuture<'static, Result<(), TopicError>> {
        if *self.unreachable.lock().unwrap_or_else(|e| e.into_inner()) {
            return Box::pin(async {
                Err(TopicError::Metadata(
                    "kafka:9092: all brokers down (stand-in)".into(),
                ))
            });
        }
        self.deleted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(names);
        Box::pin(async { Ok(()) })
    }
}

struct Harness {
    state: Shared,
    ctx: Arc<Context>,
    brokers: Arc<FakeBrokers>,
    topics: Arc<FakeTopics>,
}

const MI: &str = "/apis/ringmq.io/v1alpha1/namespaces/mqtt/mqttinstances";
const STS: &str = "/apis/apps/v1/namespaces/mqtt/statefulsets";
const SECRETS: &str = "/api/v1/namespaces/mqtt/secrets";
const CMS: &str = "/api/v1/namespaces/mqtt/configmaps";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/mqtt/events";
const PODS: &str = "/api/v1/namespaces/mqtt/pods";
const PVCS: &str = "/api/v1/namespaces/mqtt/persistentvolumeclaims";

fn harness() -> Harness {
    let brokers = Arc::new(FakeBrokers::default());
    harness_with(brokers.clone(), brokers)
}

fn harness_with(brokers: Arc<FakeBrokers>, real: Arc<dyn Brokers>) -> Harness {
    harness_full(brokers, real, false)
}

fn harness_full(brokers: Arc<FakeBrokers>, real: Arc<dyn Brokers>, monitoring: bool) -> Harness {
    let state: Shared = Arc::default();
    let client = fake_api(state.clone());
    let topics = Arc::new(FakeTopics::default());
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), "ringmq-operator".into()),
        client,
        brokers: real,
        topics: topics.clone(),
        image: "ringmq-broker:test".into(),
        monitoring,
        resync: Duration::from_secs(30),
    });
    Harness {
        state,
        ctx,
        brokers,
        topics,
    }
}

impl Harness {
    /// Stores the instance as the API server holds it (generation 1).
    fn put(&self, spec: Value) {
        self.put_with(spec, json!({}));
    }

    fn put_with(&self, spec: Value, metadata: Value) {
        let mut meta = json!({"name": "demo", "namespace": "mqtt", "uid": "uid-1", "generation": 1, "resourceVersion": "1"});
        merge(&mut meta, &metadata);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let status = st
            .objects
            .get(&format!("{MI}/demo"))
            .and_then(|o| o.get("status").cloned());
        let mut obj = json!({"apiVersion": "ringmq.io/v1alpha1", "kind": "MqttInstance", "metadata": meta, "spec": spec});
        if let Some(s) = status {
            obj["status"] = s;
        }
        st.objects.insert(format!("{MI}/demo"), obj);
    }

    fn object(&self, key: &str) -> Value {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .objects
            .get(key)
            .cloned()
            .unwrap_or(Value::Null)
    }

    fn insert(&self, key: &str, value: Value) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .objects
            .insert(key.to_owned(), value);
    }

    fn seen(&self) -> Vec<Seen> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut st.seen)
    }

    fn events(&self) -> Vec<(String, String)> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.objects
            .iter()
            .filter(|(k, _)| k.starts_with(EVENTS))
            .map(|(_, e)| {
                (
                    e["type"].as_str().unwrap_or_default().to_owned(),
                    e["reason"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// One reconcile pass of the stored instance.
    async fn pass(&self) -> Action {
        self.try_pass()
            .await
            .unwrap_or_else(|e| panic!("reconcile failed: {e}"))
    }

    fn condition(&self, type_: &str) -> (String, String) {
        let obj = self.object(&format!("{MI}/demo"));
        obj["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == type_)
            .map(|c| {
                (
                    c["status"].as_str().unwrap_or_default().to_owned(),
                    c["reason"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .unwrap_or_default()
    }

    /// Broker pods 0..n exist with their broker running.
    fn pods_running(&self, n: i32) {
        for i in 0..n {
            self.insert(
                &format!("{PODS}/demo-{i}"),
                json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": format!("demo-{i}"), "namespace": "mqtt",
                                 "labels": {"app.kubernetes.io/name": "ringmq", "app.kubernetes.io/instance": "demo", "controller-revision-hash": "r1"}},
                    "status": {"containerStatuses": [{"name": "broker", "image": "ringmq-broker:test", "imageID": "", "ready": true, "restartCount": 0, "state": {"running": {}}}]},
                }),
            );
        }
    }

    /// One reconcile pass that may fail.
    async fn try_pass(&self) -> Result<Action, String> {
        let obj: MqttInstance = serde_json::from_value(self.object(&format!("{MI}/demo")))
            .unwrap_or_else(|e| panic!("stored instance: {e}"));
        tokio::time::timeout(
            Duration::from_secs(10),
            reconcile(Arc::new(obj), self.ctx.clone()),
        )
        .await
        .unwrap_or_else(|_| panic!("reconcile timed out"))
        .map_err(|e| e.to_string())
    }

    fn count_events(&self, reason: &str) -> usize {
        self.events().iter().filter(|e| e.1 == reason).count()
    }

    /// The StatefulSet became ready at its replica count.
    fn sts_ready(&self) {
        let mut sts = self.object(&format!("{STS}/demo"));
        let replicas = sts["spec"]["replicas"].clone();
        sts["status"] = json!({"replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas, "currentRevision": "r1", "updateRevision": "r1"});
        self.insert(&format!("{STS}/demo"), sts);
    }
}

fn small() -> Value {
    json!({"capacity": {"connections": 100, "tps": 100, "subscriptions": 1000}})
}

#[tokio::test]
async fn create_applies_every_object_and_reports_progress() {
    let h = harness();
    h.put(small());
    let action = h.pass().await;
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(5)),
        "not settled yet"
    );
    let seen = h.seen();
    let applied: Vec<&str> = seen
        .iter()
        .filter(|s| s.method == "PATCH" && !s.path.ends_with("/status"))
        .map(|s| s.path.as_str())
        .collect();
    assert_eq!(
        applied,
        [
            "/api/v1/namespaces/mqtt/configmaps/demo-config",
            "/api/v1/namespaces/mqtt/services/demo-nodes",
            "/api/v1/namespaces/mqtt/services/demo",
            "/apis/apps/v1/namespaces/mqtt/statefulsets/demo",
            "/apis/policy/v1/namespaces/mqtt/poddisruptionbudgets/demo",
        ]
    );
    // Generated once: the admin token and the cluster secret.
    let created: Vec<&str> = seen
        .iter()
        .filter(|s| s.method == "POST" && s.path == SECRETS)
        .map(|s| s.body["metadata"]["name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(created, ["demo-admin", "demo-cluster"]);
    let sts = h.object(&format!("{STS}/demo"));
    assert_eq!(sts["spec"]["replicas"], 1);
    assert_eq!(sts["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    assert_eq!(
        sts["spec"]["template"]["spec"]["containers"][0]["image"],
        "ringmq-broker:test"
    );
    let obj = h.object(&format!("{MI}/demo"));
    assert_eq!(obj["status"]["observedGeneration"], 1);
    assert_eq!(obj["status"]["replicas"], 0, "no pod exists yet");
    assert_eq!(
        obj["status"]["selector"],
        "app.kubernetes.io/instance=demo,app.kubernetes.io/name=ringmq"
    );
    assert_eq!(
        h.condition("Ready"),
        ("False".into(), "PodsNotReady".into())
    );
    assert_eq!(
        h.condition("Progressing"),
        ("True".into(), "RollingOut".into())
    );
    assert!(
        obj["metadata"].get("finalizers").is_none(),
        "nothing outside Kubernetes to clean up"
    );

    // The pods come up and the brokers answer: Ready, settled, and a second
    // pass changes nothing (no status patch, no new secret).
    h.sts_ready();
    *h.brokers.instance.lock().unwrap_or_else(|e| e.into_inner()) = Some(json!({
        "totals": {"connections": 70, "subscriptions": 3, "topics": 2, "pubTps": 10.0, "subTps": 20.0},
        "utilization": {"connections": 70.0, "subscriptions": 0.3, "topics": null, "tps": 30.0},
        "nodes": [{"name": "demo-0", "state": "running", "connections": 70, "maxConnections": 71, "subscriptions": 3, "subscribers": 1, "underReplicatedSessions": 2}],
        "underReplicatedSessions": 2,
    }));
    *h.brokers.alarms.lock().unwrap_or_else(|e| e.into_inner()) = json!({"alarms": [{"id": "demo-0-0", "metric": "connections", "value": 70, "threshold": 70, "state": "firing", "start": 1_795_305_600_000_u64, "end": null}]});
    let action = h.pass().await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    assert_eq!(h.condition("Ready"), ("True".into(), "AllPodsReady".into()));
    assert_eq!(
        h.condition("CapacityWarning"),
        ("True".into(), "AlarmFiring".into())
    );
    let obj = h.object(&format!("{MI}/demo"));
    assert_eq!(obj["status"]["replicas"], 1);
    assert_eq!(obj["status"]["totals"]["connections"], 70);
    assert_eq!(obj["status"]["peakUtilization"], "70% connections");
    assert_eq!(obj["status"]["nodes"][0]["maxConnections"], 71);
    // A pod lost its replica partner: the sessions it owns have one copy.
    assert_eq!(obj["status"]["underReplicatedSessions"], 2);
    assert_eq!(obj["status"]["nodes"][0]["underReplicatedSessions"], 2);
    assert_eq!(
        h.condition("Replicated"),
        ("False".into(), "UnderReplicated".into())
    );
    assert_eq!(obj["status"]["alarms"][0]["start"], "2026-11-22T00:00:00Z");
    assert!(
        h.events()
            .contains(&("Warning".into(), "AlarmFiring".into()))
    );
    h.seen();
    h.pass().await;
    let again = h.seen();
    assert!(
        !again.iter().any(|s| s.path.ends_with("/status")),
        "unchanged status is not patched"
    );
    assert!(
        !again
            .iter()
            .any(|s| s.method == "POST" && s.path == SECRETS)
    );
    assert_eq!(
        h.events().iter().filter(|e| e.1 == "AlarmFiring").count(),
        1,
        "one event per alarm"
    );
}

#[tokio::test]
async fn a_config_change_rolls_the_pods_and_a_missing_secret_blocks_it() {
    let h = harness();
    h.put(small());
    h.pass().await;
    let hash = |h: &Harness| {
        h.object(&format!("{STS}/demo"))["spec"]["template"]["metadata"]["annotations"]["ringmq.io/config-hash"].clone()
    };
    let before = hash(&h);
    // A user whose password Secret does not exist: Degraded, nothing rolled.
    let mut spec = small();
    spec["users"] = json!([{"username": "u1", "passwordSecret": {"name": "pw", "key": "u1"}, "grants": [{"filter": "#", "action": "pubsub"}]}]);
    h.put(spec.clone());
    h.seen();
    assert_eq!(h.pass().await, Action::requeue(Duration::from_secs(30)));
    assert_eq!(
        h.condition("Degraded"),
        ("True".into(), "SecretMissing".into())
    );
    assert!(
        h.events()
            .contains(&("Warning".into(), "SecretMissing".into()))
    );
    assert!(
        !h.seen()
            .iter()
            .any(|s| s.path.starts_with(STS) && s.method == "PATCH")
    );
    assert_eq!(hash(&h), before);
    // The Secret appears: credentials applied, the pods roll.
    h.insert(&format!("{SECRETS}/pw"), json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pw", "namespace": "mqtt"}, "data": {"u1": "c2VjcmV0"}}));
    h.pass().await;
    let creds_path = format!("{SECRETS}/demo-credentials");
    let file = |h: &Harness| {
        let b64 = h.object(&creds_path)["data"]["credentials.yaml"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap_or_default();
        String::from_utf8(bytes).unwrap_or_default()
    };
    let text = file(&h);
    assert!(
        text.contains("username: u1") && text.contains("$argon2id$") && !text.contains("secret"),
        "{text}"
    );
    let rolled = hash(&h);
    assert_ne!(rolled, before, "the pods roll for the new credentials");
    // Same inputs: the file on the Secret is reused, not hashed again (a
    // marker written into it survives the pass) and nothing rolls.
    let mut stored = h.object(&creds_path);
    let marked = format!("{text}# reused\n");
    stored["data"]["credentials.yaml"] =
        json!(base64::engine::general_purpose::STANDARD.encode(&marked));
    h.insert(&creds_path, stored);
    h.pass().await;
    assert_eq!(file(&h), marked);
    // A new password: hashed again.
    h.insert(&format!("{SECRETS}/pw"), json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pw", "namespace": "mqtt"}, "data": {"u1": "b3RoZXI="}}));
    h.pass().await;
    let again = file(&h);
    assert!(
        !again.contains("# reused") && again.contains("$argon2id$"),
        "{again}"
    );
    assert_ne!(again, text);
    let cm = h.object(&format!("{CMS}/demo-config"));
    assert!(
        cm["data"]["broker.yaml"]
            .as_str()
            .unwrap_or_default()
            .contains("credentials_file")
    );
    assert_eq!(h.condition("Degraded").0, "False");
}

fn set_sessions(h: &Harness, ordinal: i32, n: i64) {
    h.brokers
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(ordinal, n);
}

fn drained(h: &Harness) -> Vec<i32> {
    h.brokers
        .drained
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// The topic deletions Kafka was asked for.
fn deleted_topics(h: &Harness) -> Vec<Vec<String>> {
    h.topics
        .deleted
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// Makes the stand-in Kafka (un)reachable for topic deletion.
fn kafka_reachable(h: &Harness, reachable: bool) {
    *h.topics
        .unreachable
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = !reachable;
}

fn sts_replicas(h: &Harness) -> Value {
    h.object(&format!("{STS}/demo"))["spec"]["replicas"].clone()
}

/// An instance of `replicas` pods, rolled out, every broker running; and
/// its spec.
async fn running(replicas: i32) -> (Harness, Value) {
    let h = harness();
    let mut spec = small();
    spec["replicas"] = json!(replicas);
    h.put(spec.clone());
    h.pass().await;
    h.sts_ready();
    h.pods_running(replicas);
    (h, spec)
}

#[tokio::test]
async fn scale_up_adds_pods_and_scale_down_drains_one_pod_at_a_time() {
    let (h, mut spec) = running(3).await;
    assert_eq!(sts_replicas(&h), 3);
    let requests = |h: &Harness| {
        h.object(&format!("{STS}/demo"))["spec"]["template"]["spec"]["containers"][0]["resources"]
            .clone()
    };
    let sized = requests(&h);
    // Down to 1: pod 2 is drained first, and stays while it holds sessions.
    spec["replicas"] = json!(1);
    h.put(spec);
    set_sessions(&h, 2, 5);
    assert_eq!(h.pass().await, Action::requeue(Duration::from_secs(5)));
    assert_eq!(drained(&h), [2]);
    assert_eq!(sts_replicas(&h), 3);
    let status = h.object(&format!("{MI}/demo"))["status"].clone();
    assert_eq!(status["draining"]["pod"], "demo-2");
    assert_eq!(status["draining"]["sessions"], 5);
    assert_eq!(
        h.condition("Progressing"),
        ("True".into(), "Draining".into())
    );
    // The drain is asked again each pass (a restarted pod would otherwise
    // keep serving), announced once.
    h.pass().await;
    assert_eq!(drained(&h), [2, 2]);
    assert_eq!(h.count_events("Draining"), 1);
    // Its sessions moved: replicas 3 -> 2; then pod 1 is drained.
    set_sessions(&h, 2, 0);
    h.pass().await;
    assert_eq!(sts_replicas(&h), 2);
    assert!(h.events().contains(&("Normal".into(), "ScaledDown".into())));
    assert_eq!(
        requests(&h),
        sized,
        "the pod template does not change with the replica count"
    );
    set_sessions(&h, 1, 0);
    h.sts_ready();
    h.pass().await;
    assert_eq!(drained(&h), [2, 2, 2, 1]);
    assert_eq!(sts_replicas(&h), 1);
    assert!(h.object(&format!("{MI}/demo"))["status"]["draining"].is_null());
    // A capacity that needs more pods scales up at once.
    h.put(json!({"capacity": {"connections": 120000, "tps": 100, "subscriptions": 1000}}));
    h.pass().await;
    assert_eq!(sts_replicas(&h), 3);
}

#[tokio::test]
async fn a_drain_waits_for_a_rollout_and_ends_when_the_pod_is_gone_or_time_is_up() {
    let (h, mut spec) = running(3).await;
    // A rollout in progress: no drain starts until it is done.
    let mut sts = h.object(&format!("{STS}/demo"));
    sts["status"]["updateRevision"] = json!("r2");
    h.insert(&format!("{STS}/demo"), sts);
    spec["replicas"] = json!(2);
    h.put(spec.clone());
    set_sessions(&h, 2, 4);
    h.pass().await;
    assert!(drained(&h).is_empty());
    assert_eq!(sts_replicas(&h), 3);
    let progressing = h.object(&format!("{MI}/demo"))["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Progressing")
        .map(|c| c["message"].clone())
        .unwrap_or_default();
    assert_eq!(
        progressing,
        "waiting for the rollout to finish before draining"
    );
    // Rolled out: the drain starts; a drain that outlasts its time limit
    // ends with a warning and the pod goes anyway.
    h.sts_ready();
    h.pass().await;
    assert_eq!(drained(&h), [2]);
    assert_eq!(sts_replicas(&h), 3);
    let mut obj = h.object(&format!("{MI}/demo"));
    obj["status"]["draining"]["since"] = json!("2026-01-01T00:00:00Z");
    h.insert(&format!("{MI}/demo"), obj);
    h.pass().await;
    assert_eq!(sts_replicas(&h), 2);
    assert!(
        h.events()
            .contains(&("Warning".into(), "DrainTimedOut".into()))
    );
    // A pod that is gone holds nothing: no wait for an answer it cannot give.
    h.sts_ready();
    spec["replicas"] = json!(1);
    h.put(spec);
    set_sessions(&h, 1, 9);
    h.state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .objects
        .remove(&format!("{PODS}/demo-1"));
    h.pass().await;
    assert_eq!(sts_replicas(&h), 1);
    assert_eq!(h.count_events("DrainTimedOut"), 1);
}

#[tokio::test]
async fn a_called_off_scale_down_restarts_the_drained_pod() {
    let (h, mut spec) = running(2).await;
    spec["replicas"] = json!(1);
    h.put(spec.clone());
    set_sessions(&h, 1, 3);
    h.pass().await;
    assert_eq!(drained(&h), [1]);
    // Back to 2 before the drain finished: the pod left the ring, so it is
    // restarted to join again.
    spec["replicas"] = json!(2);
    h.put(spec);
    h.seen();
    h.pass().await;
    let deleted: Vec<String> = h
        .seen()
        .into_iter()
        .filter(|s| s.method == "DELETE")
        .map(|s| s.path)
        .collect();
    assert_eq!(deleted, [format!("{PODS}/demo-1")]);
    assert!(
        h.events()
            .contains(&("Normal".into(), "DrainAbandoned".into()))
    );
    assert_eq!(sts_replicas(&h), 2);
    assert!(h.object(&format!("{MI}/demo"))["status"]["draining"].is_null());
}

#[tokio::test]
async fn kafka_topics_are_created_grown_and_a_decrease_is_reported() {
    let h = harness();
    let mut spec = small();
    spec["kafka"] = json!({"bootstrapServers": "kafka:9092", "partitions": 4, "parentTopics": [{"name": "telemetry"}, {"name": "orders", "ordered": true, "partitions": 8}]});
    h.put(spec);
    h.pass().await;
    let asked = h.topics.ensured.lock().unwrap_or_else(|e| e.into_inner())[0].clone();
    let names: Vec<(&str, i32)> = asked
        .iter()
        .map(|w| (w.name.as_str(), w.partitions))
        .collect();
    assert_eq!(
        names,
        [
            ("telemetry", 4),
            ("orders", 8),
            ("mq2mqtt", 4),
            ("mqtt-device-connect", 4),
            ("mqtt-device-disconnect", 4)
        ]
    );
    assert_eq!(
        h.condition("KafkaReady"),
        ("True".into(), "TopicsReady".into())
    );
    assert!(
        h.events()
            .contains(&("Normal".into(), "KafkaTopicCreated".into()))
    );
    let cm = h.object(&format!("{CMS}/demo-config"));
    assert!(
        cm["data"]["broker.yaml"]
            .as_str()
            .unwrap_or_default()
            .contains("create_topics: false")
    );
    *h.topics.shrink.lock().unwrap_or_else(|e| e.into_inner()) = Some("orders".into());
    h.pass().await;
    assert_eq!(
        h.condition("NotSupported"),
        ("True".into(), "PartitionDecrease".into())
    );
    // Back to a count Kafka can serve: the condition goes, growth is an Event.
    *h.topics.shrink.lock().unwrap_or_else(|e| e.into_inner()) = None;
    *h.topics.grow.lock().unwrap_or_else(|e| e.into_inner()) = Some("telemetry".into());
    h.pass().await;
    assert_eq!(h.condition("NotSupported"), (String::new(), String::new()));
    assert!(
        h.events()
            .contains(&("Normal".into(), "KafkaTopicGrown".into()))
    );
}

#[tokio::test]
async fn deletion_removes_topics_only_by_policy() {
    // Retain (the default): no finalizer, nothing deleted.
    let h = harness();
    let mut spec = small();
    spec["kafka"] =
        json!({"bootstrapServers": "kafka:9092", "parentTopics": [{"name": "telemetry"}]});
    h.put(spec.clone());
    h.pass().await;
    assert!(
        h.object(&format!("{MI}/demo"))["metadata"]
            .get("finalizers")
            .is_none()
    );
    // Delete: the first pass adds the finalizer; deleting the instance
    // deletes its parent topics, then lets it go.
    spec["kafka"]["deletePolicy"] = json!("Delete");
    h.put(spec.clone());
    assert_eq!(h.pass().await, Action::await_change());
    assert_eq!(
        h.object(&format!("{MI}/demo"))["metadata"]["finalizers"],
        json!(["ringmq.io/kafka-topics"])
    );
    // Deleted while a broker pod still runs: the StatefulSet goes first and
    // the topics wait until no pod is left to write to them.
    h.pods_running(1);
    let deleting = json!({"finalizers": ["ringmq.io/kafka-topics"], "deletionTimestamp": "2026-11-22T10:00:00Z"});
    h.put_with(spec.clone(), deleting.clone());
    h.seen();
    assert_eq!(h.pass().await, Action::requeue(Duration::from_secs(5)));
    assert_eq!(sts_replicas(&h), 0);
    assert!(deleted_topics(&h).is_empty());
    assert!(
        !h.seen()
            .iter()
            .any(|s| s.method == "PATCH"
                && (s.path.starts_with(CMS) || s.path.contains("/services/"))),
        "nothing applied to an instance being deleted"
    );
    // Kafka unreachable: the instance stays, a Warning says why and how out.
    h.state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .objects
        .remove(&format!("{PODS}/demo-0"));
    kafka_reachable(&h, false);
    let err = h.try_pass().await.err().unwrap_or_default();
    assert!(err.contains("all brokers down"), "{err}");
    assert!(
        h.events()
            .contains(&("Warning".into(), "KafkaCleanupFailed".into()))
    );
    assert_eq!(
        h.object(&format!("{MI}/demo"))["metadata"]["finalizers"],
        json!(["ringmq.io/kafka-topics"])
    );
    // Kafka back: the topics go, then the finalizer.
    kafka_reachable(&h, true);
    h.pass().await;
    assert_eq!(deleted_topics(&h), [vec!["telemetry".to_owned()]]);
    let finalizers = h.object(&format!("{MI}/demo"))["metadata"]["finalizers"].clone();
    assert!(
        finalizers.as_array().is_none_or(Vec::is_empty),
        "{finalizers}"
    );
    assert!(
        h.events()
            .contains(&("Normal".into(), "KafkaTopicsDeleted".into()))
    );
    // Without a finalizer, a pass over a deleted instance applies nothing.
    h.put_with(spec, json!({"deletionTimestamp": "2026-11-22T10:00:00Z"}));
    h.seen();
    assert_eq!(h.pass().await, Action::await_change());
    assert!(h.seen().iter().all(|s| s.method == "GET"));
}

#[tokio::test]
async fn a_kept_topics_annotation_lets_the_instance_go_without_kafka() {
    let h = harness();
    let mut spec = small();
    spec["kafka"] = json!({"bootstrapServers": "kafka:9092", "deletePolicy": "Delete", "parentTopics": [{"name": "telemetry"}]});
    h.put(spec.clone());
    h.pass().await;
    kafka_reachable(&h, false);
    h.put_with(
        spec,
        json!({"finalizers": ["ringmq.io/kafka-topics"], "deletionTimestamp": "2026-11-22T10:00:00Z",
               "annotations": {"ringmq.io/keep-kafka-topics": "true"}}),
    );
    h.pass().await;
    assert!(deleted_topics(&h).is_empty());
    assert!(
        h.events()
            .contains(&("Warning".into(), "KafkaTopicsKept".into()))
    );
    let finalizers = h.object(&format!("{MI}/demo"))["metadata"]["finalizers"].clone();
    assert!(
        finalizers.as_array().is_none_or(Vec::is_empty),
        "{finalizers}"
    );
}

/// Real broker processes on loopback, reached by ordinal.
struct Loopback(Vec<u16>);

impl ringmq_operator::brokers::Locate for Loopback {
    fn admin_addr(&self, _names: &Names, ordinal: i32) -> String {
        let port = usize::try_from(ordinal)
            .ok()
            .and_then(|i| self.0.get(i))
            .copied()
            .unwrap_or(1);
        format!("127.0.0.1:{port}")
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The broker binary `cargo test --workspace` builds alongside.
fn broker_binary() -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug/ringmq-broker");
    assert!(
        bin.exists(),
        "{} missing: cargo build -p ringmq-broker first",
        bin.display()
    );
    bin
}

/// A broker process killed when dropped.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An MQTT 3.1.1 CONNECT for `client_id`, keep-alive 60 s.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let id = client_id.as_bytes();
    let remaining = 10 + 2 + id.len();
    let mut p = vec![
        0x10,
        u8::try_from(remaining).unwrap_or(0),
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        0x02,
        0,
        60,
    ];
    p.extend_from_slice(&u16::try_from(id.len()).unwrap_or(0).to_be_bytes());
    p.extend_from_slice(id);
    p
}

#[tokio::test]
async fn status_and_alarms_come_from_real_brokers_under_load() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let token = "operator-test-token";
    std::fs::write(dir.path().join("token"), token).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("secret"), "cluster-secret").unwrap_or_else(|e| panic!("{e}"));
    let (mqtt, admin, cluster): (Vec<u16>, Vec<u16>, Vec<u16>) = (
        (0..2).map(|_| free_port()).collect(),
        (0..2).map(|_| free_port()).collect(),
        (0..2).map(|_| free_port()).collect(),
    );
    let mut procs = Vec::new();
    for i in 0..2 {
        let config = format!(
            "node_id: demo-{i}\nlisteners:\n  tcp: \"127.0.0.1:{}\"\n  ws: null\n  tls: null\n  wss: null\n  admin: \"127.0.0.1:{}\"\nworkers: 1\nauth:\n  admin_token_file: {}\ncluster:\n  listen: \"127.0.0.1:{}\"\n  peers: [\"127.0.0.1:{}\"]\n  secret_file: {}\ncapacity:\n  connections: 4\nalarms:\n  hold_secs: 0\n",
            mqtt[i],
            admin[i],
            dir.path().join("token").display(),
            cluster[i],
            cluster[0],
            dir.path().join("secret").display(),
        );
        let path = dir.path().join(format!("n{i}.yaml"));
        std::fs::write(&path, config).unwrap_or_else(|e| panic!("{e}"));
        let log = std::fs::File::create(dir.path().join(format!("n{i}.log")))
            .unwrap_or_else(|e| panic!("{e}"));
        // Each node in a directory of its own: the default store (`data`).
        let home = dir.path().join(format!("n{i}"));
        std::fs::create_dir_all(&home).unwrap_or_else(|e| panic!("{e}"));
        let child = std::process::Command::new(broker_binary())
            .arg("--config")
            .arg(&path)
            .current_dir(&home)
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        procs.push(Process(child));
    }
    let brokers = ringmq_operator::brokers::Http {
        locate: Loopback(admin.clone()),
    };
    let names = Names::new("demo", "mqtt");
    // Both nodes up and on one ring.
    let mut ring = 0;
    for _ in 0..300 {
        ring = match brokers.get(&names, 0, "instance", token).await {
            Ok(v) => v["nodes"].as_array().map_or(0, Vec::len),
            Err(_) => 0,
        };
        if ring == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ring, 2, "the two brokers did not form a ring");
    // Three devices, through both nodes: 3 of 4 connections is beyond 70 %.
    let mut devices = Vec::new();
    for (i, port) in [mqtt[0], mqtt[1], mqtt[0]].into_iter().enumerate() {
        let mut s =
            std::net::TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("{e}"));
        s.write_all(&connect_packet(&format!("device-{i}")))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ack, [0x20, 2, 0, 0], "CONNACK accepted");
        devices.push(s);
    }
    let h = harness_with(Arc::new(FakeBrokers::default()), Arc::new(brokers));
    h.insert(
        &format!("{SECRETS}/demo-admin"),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "demo-admin", "namespace": "mqtt"}, "data": {"token": "b3BlcmF0b3ItdGVzdC10b2tlbg=="}}),
    );
    let mut spec = small();
    spec["replicas"] = json!(2);
    h.put(spec);
    let mut status = Value::Null;
    for _ in 0..50 {
        h.pass().await;
        h.sts_ready();
        h.pass().await;
        status = h.object(&format!("{MI}/demo"))["status"].clone();
        let firing = status["alarms"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a["state"] == "firing"));
        if status["totals"]["connections"] == 3 && firing {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(status["totals"]["connections"], 3, "{status}");
    let nodes: Vec<&str> = status["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(nodes, ["demo-0", "demo-1"], "{status}");
    let per_node: i64 = status["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["connections"].as_i64())
        .sum();
    assert_eq!(per_node, 3);
    let alarm = status["alarms"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["metric"] == "connections"))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(alarm["state"], "firing", "{status}");
    assert_eq!(alarm["threshold"], 3);
    assert_eq!(
        h.condition("CapacityWarning"),
        ("True".into(), "AlarmFiring".into())
    );
    assert_eq!(h.condition("Ready"), ("True".into(), "AllPodsReady".into()));
    assert!(
        h.events()
            .contains(&("Warning".into(), "AlarmFiring".into()))
    );
    drop(devices);
    drop(procs);
}

#[tokio::test]
async fn prometheus_objects_only_where_the_prometheus_operator_api_exists() {
    let brokers = Arc::new(FakeBrokers::default());
    let h = harness_full(brokers.clone(), brokers, true);
    h.put(small());
    h.pass().await;
    let monitor = h.object("/apis/monitoring.coreos.com/v1/namespaces/mqtt/servicemonitors/demo");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "admin");
    let rule = h.object("/apis/monitoring.coreos.com/v1/namespaces/mqtt/prometheusrules/demo");
    let alerts: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert_eq!(
        alerts,
        [
            "RingmqInstanceConnectionsHigh",
            "RingmqInstanceSubscriptionsHigh",
            "RingmqInstanceTpsHigh"
        ]
    );
    // Without that API (the default harness), nothing is sent there.
    let plain = harness();
    plain.put(small());
    plain.pass().await;
    assert!(
        !plain
            .seen()
            .iter()
            .any(|s| s.path.contains("monitoring.coreos.com"))
    );
}

#[tokio::test]
async fn a_fixed_spec_gets_a_stuck_rollout_going_again() {
    let h = harness();
    h.put(small());
    h.pass().await;
    // Revision r2 (a broken image) never became ready; the spec is fixed
    // (revision r3): the stuck pods are recreated, one per pass; a pod that
    // has only just turned unready is left alone.
    let mut sts = h.object(&format!("{STS}/demo"));
    sts["status"] =
        json!({"replicas": 3, "readyReplicas": 0, "currentRevision": "r1", "updateRevision": "r3"});
    h.insert(&format!("{STS}/demo"), sts);
    let just_now = k8s_openapi::jiff::Timestamp::now().to_string();
    let pod = |name: &str, revision: &str, since: &str| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "mqtt", "creationTimestamp": "2026-11-22T00:00:00Z",
                         "labels": {"app.kubernetes.io/name": "ringmq", "app.kubernetes.io/instance": "demo", "controller-revision-hash": revision}},
            "status": {"conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": since}]},
        })
    };
    h.insert(&format!("{PODS}/demo-0"), pod("demo-0", "r1", &just_now));
    h.insert(
        &format!("{PODS}/demo-1"),
        pod("demo-1", "r2", "2026-11-22T00:00:00Z"),
    );
    h.insert(
        &format!("{PODS}/demo-2"),
        pod("demo-2", "r2", "2026-11-22T00:00:00Z"),
    );
    let deleted = |h: &Harness| -> Vec<String> {
        h.seen()
            .into_iter()
            .filter(|s| s.method == "DELETE")
            .map(|s| s.path)
            .collect()
    };
    h.seen();
    h.pass().await;
    assert_eq!(deleted(&h), [format!("{PODS}/demo-1")]);
    h.pass().await;
    assert_eq!(deleted(&h), [format!("{PODS}/demo-2")]);
    h.pass().await;
    assert!(deleted(&h).is_empty());
    assert!(
        h.events()
            .contains(&("Normal".into(), "RestartedStuckPod".into()))
    );
}

/// The size of the claim of pod 0, as the fake API server holds it.
fn claim_size(h: &Harness) -> Value {
    h.object(&format!("{PVCS}/data-demo-0"))["spec"]["resources"]["requests"]["storage"].clone()
}

#[tokio::test]
async fn a_new_data_size_grows_the_claims_and_leaves_the_statefulset_templates_alone() {
    let h = harness();
    h.put(small());
    h.pass().await;
    let templates = h.object(&format!("{STS}/demo"))["spec"]["volumeClaimTemplates"].clone();
    assert_eq!(
        templates[0]["spec"]["resources"]["requests"]["storage"],
        "3Gi"
    );
    // The StatefulSet controller made pod 0's claim from the template.
    h.insert(
        &format!("{PVCS}/data-demo-0"),
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": "data-demo-0", "namespace": "mqtt"},
               "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "standard",
                        "resources": {"requests": {"storage": "3Gi"}}}}),
    );

    // Larger: the claim is asked for it; the StatefulSet is still applied
    // (a template change would be refused by the API server and stop every
    // later change of the instance).
    let mut spec = small();
    spec["storage"] = json!({"size": "10Gi"});
    h.put(spec.clone());
    h.pass().await;
    assert_eq!(claim_size(&h), "10Gi");
    assert_eq!(
        h.object(&format!("{STS}/demo"))["spec"]["volumeClaimTemplates"],
        templates
    );
    assert_eq!(h.count_events("StorageResizing"), 1);
    // A config change still reaches the StatefulSet.
    spec["session"] = json!({"offlineQueueLen": 500});
    h.put(spec.clone());
    h.pass().await;
    assert_eq!(h.count_events("StorageResizing"), 1, "asked once");

    // Smaller, or another class: what a volume with data cannot do is
    // reported, and the claim stays as it is.
    spec["storage"] = json!({"size": "1Gi", "storageClassName": "fast"});
    h.put(spec);
    h.pass().await;
    assert_eq!(claim_size(&h), "10Gi");
    assert_eq!(h.count_events("StorageNotShrunk"), 1);
    assert_eq!(h.count_events("StorageClassKept"), 1);
}
