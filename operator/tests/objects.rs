//! The objects the operator builds for the example instances in
//! `manifests/examples/`, compared with the golden files in
//! `tests/golden/` (`UPDATE_GOLDEN=1 cargo test -p ringmq-operator --test
//! objects` rewrites them after a deliberate change). The Python suite
//! validates the same files against the Kubernetes schemas.

use std::collections::BTreeMap;

use base64::Engine as _;
use std::path::{Path, PathBuf};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use ringmq_operator::brokerconfig::{self, Inputs};
use ringmq_operator::crd::MqttInstance;
use ringmq_operator::names::Names;
use ringmq_operator::resources::{self, Context, DEFAULT_IMAGE, Object};
use ringmq_operator::{credentials, profile};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn example(name: &str) -> MqttInstance {
    let text = std::fs::read_to_string(
        root()
            .join("manifests/examples")
            .join(format!("{name}.yaml")),
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// What the reconciler would apply for an example file, with fixed inputs.
fn objects(file: &str) -> Vec<Object> {
    let mi = example(file);
    let ns = mi.metadata.namespace.clone().unwrap_or_default();
    let name = mi.metadata.name.clone().unwrap_or_default();
    let name = name.as_str();
    let names = Names::new(name, &ns);
    let spec = &mi.spec;
    let passwords: BTreeMap<String, String> = spec
        .users
        .iter()
        .map(|u| (u.username.clone(), format!("{}-password", u.username)))
        .collect();
    let inputs = Inputs {
        kafka_username: spec
            .kafka
            .as_ref()
            .and_then(|k| k.credentials_secret.as_ref())
            .map(|_| "ringmq".to_owned()),
        kafka_ca: spec
            .kafka
            .as_ref()
            .is_some_and(|k| k.credentials_secret.is_some()),
        credentials: credentials::needed(spec),
    };
    let broker_yaml = brokerconfig::render(spec, &names, &inputs);
    // The real broker accepts what the operator renders.
    if let Err(e) = ringmq_broker::Config::from_yaml(&broker_yaml) {
        panic!("{name}: the broker refuses its configuration: {e}\n{broker_yaml}");
    }
    let credentials = inputs.credentials.then(|| credentials::Rendered {
        yaml: credentials::render(spec, "uid-1", &passwords).unwrap_or_else(|e| panic!("{e}")),
        fingerprint: credentials::fingerprint(spec, "uid-1", &passwords),
    });
    let ctx = Context {
        names: &names,
        owner: OwnerReference {
            api_version: "ringmq.io/v1alpha1".into(),
            kind: "MqttInstance".into(),
            name: name.into(),
            uid: "uid-1".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        },
        replicas: profile::replicas(spec),
        image: DEFAULT_IMAGE,
        config_hash: resources::hash(&[
            &broker_yaml,
            credentials.as_ref().map_or("", |c| c.yaml.as_str()),
        ]),
    };
    resources::objects(&ctx, spec, broker_yaml, credentials, true)
}

fn render(objects: &[Object]) -> String {
    objects
        .iter()
        .map(|o| serde_yaml::to_string(&o.to_value()).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("---\n")
}

#[test]
fn objects_match_the_golden_files() {
    for file in ["small", "tls-auth", "large-kafka"] {
        let got = render(&objects(file));
        let path = root()
            .join("operator/tests/golden")
            .join(format!("{file}.yaml"));
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &got).unwrap_or_else(|e| panic!("{e}"));
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            got == want,
            "{} differs from what the operator builds now; if the change is deliberate, run UPDATE_GOLDEN=1 cargo test -p ringmq-operator --test objects\n{got}",
            path.display()
        );
    }
}

#[test]
fn what_each_example_gets() {
    let find = |objects: &[Object], kind: &str, name: &str| -> serde_json::Value {
        objects
            .iter()
            .map(Object::to_value)
            .find(|v| v["kind"] == kind && v["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    let small = objects("small");
    let sts = find(&small, "StatefulSet", "small");
    assert_eq!(sts["spec"]["replicas"], 1);
    assert!(
        !small
            .iter()
            .any(|o| o.to_value()["metadata"]["name"] == "small-credentials")
    );
    let svc = find(&small, "Service", "small");
    let ports: Vec<i64> = svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert_eq!(ports, [1883, 80], "no TLS: MQTT and WebSocket only");

    let devices = objects("tls-auth");
    assert_eq!(
        find(&devices, "StatefulSet", "devices")["spec"]["replicas"],
        2,
        "Standard edition: two pods"
    );
    let svc = find(&devices, "Service", "devices");
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(svc["spec"]["ipFamilyPolicy"], "PreferDualStack");
    let targets: Vec<(i64, i64)> = svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["port"].as_i64().unwrap_or(0),
                p["targetPort"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        targets,
        [(1883, 1883), (8883, 8883), (80, 8083), (443, 8084)]
    );
    let creds = find(&devices, "Secret", "devices-credentials");
    let b64 = creds["data"]["credentials.yaml"]
        .as_str()
        .unwrap_or_default();
    let text = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    assert!(
        creds["metadata"]["annotations"]["ringmq.io/credentials-input"]
            .as_str()
            .is_some_and(|f| f.len() == 64),
        "the fingerprint of what the file was rendered from"
    );
    assert!(
        text.contains("$argon2id$") && !text.contains("sensor-password"),
        "{text}"
    );
    let rule = find(&devices, "PrometheusRule", "devices");
    let exprs: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["expr"].as_str())
        .collect();
    assert!(
        exprs
            .iter()
            .any(|e| e.contains("ringmq_connections") && e.ends_with(">= 16000")),
        "{exprs:?}"
    );
    assert!(
        exprs
            .iter()
            .any(|e| e.contains("ringmq_tps") && e.ends_with(">= 4000")),
        "{exprs:?}"
    );

    let fleet = objects("large-kafka");
    let sts = find(&fleet, "StatefulSet", "fleet");
    assert_eq!(
        sts["spec"]["replicas"], 10,
        "500 000 connections at 50 000 a pod"
    );
    let cm = find(&fleet, "ConfigMap", "fleet-config");
    let config: serde_yaml::Value =
        serde_yaml::from_str(cm["data"]["broker.yaml"].as_str().unwrap_or_default())
            .unwrap_or_default();
    assert_eq!(
        config["kafka"]["security"]["password_file"],
        "/etc/ringmq/kafka/password"
    );
    assert_eq!(config["capacity"]["mode"], "alarm_only");
    assert_eq!(
        config["cluster"]["peers"][0],
        "fleet-0.fleet-nodes.mqtt.svc:7946"
    );
    let tolerations = &sts["spec"]["template"]["spec"]["tolerations"];
    assert_eq!(tolerations[0]["key"], "dedicated");
}

#[test]
fn the_config_hash_changes_with_a_password_and_not_otherwise() {
    let mi = example("tls-auth");
    let p = |pw: &str| -> BTreeMap<String, String> {
        [
            ("sensor".to_owned(), pw.to_owned()),
            ("backend".to_owned(), "b".to_owned()),
        ]
        .into()
    };
    let a = credentials::render(&mi.spec, "uid", &p("one")).unwrap_or_default();
    let again = credentials::render(&mi.spec, "uid", &p("one")).unwrap_or_default();
    let b = credentials::render(&mi.spec, "uid", &p("two")).unwrap_or_default();
    assert_eq!(a, again, "the same passwords hash the same: no rollout");
    assert_ne!(a, b);
    assert!(credentials::render(&mi.spec, "uid", &BTreeMap::new()).is_err());
}
