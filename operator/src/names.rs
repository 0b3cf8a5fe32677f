//! Names and labels of the objects an instance owns, in one place.

use std::collections::BTreeMap;

use crate::crd::MqttInstanceSpec;

/// The names derived from an instance's name and namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub instance: String,
    pub namespace: String,
}

impl Names {
    pub fn new(instance: &str, namespace: &str) -> Self {
        Self {
            instance: instance.to_owned(),
            namespace: namespace.to_owned(),
        }
    }

    /// The StatefulSet, the device Service and the PodDisruptionBudget.
    pub fn main(&self) -> String {
        self.instance.clone()
    }

    /// The headless Service that gives each pod its DNS name.
    pub fn headless(&self) -> String {
        format!("{}-nodes", self.instance)
    }

    pub fn config_map(&self) -> String {
        format!("{}-config", self.instance)
    }

    /// Hashed user credentials and Group IDs for the brokers.
    pub fn credentials_secret(&self) -> String {
        format!("{}-credentials", self.instance)
    }

    /// The secret the nodes prove to each other (generated once).
    pub fn cluster_secret(&self) -> String {
        format!("{}-cluster", self.instance)
    }

    /// The bearer token of the brokers' admin API (generated once).
    pub fn admin_secret(&self) -> String {
        format!("{}-admin", self.instance)
    }

    pub fn pod(&self, ordinal: i32) -> String {
        format!("{}-{ordinal}", self.instance)
    }

    /// `<headless>.<namespace>.svc`: pod `i` is `<instance>-i.` under it.
    pub fn headless_domain(&self) -> String {
        format!("{}.{}.svc", self.headless(), self.namespace)
    }

    pub fn pod_host(&self, ordinal: i32) -> String {
        format!("{}.{}", self.pod(ordinal), self.headless_domain())
    }

    /// Labels every object of the instance carries.
    pub fn labels(&self) -> BTreeMap<String, String> {
        [
            ("app.kubernetes.io/name", "ringmq"),
            ("app.kubernetes.io/instance", self.instance.as_str()),
            ("app.kubernetes.io/managed-by", "ringmq-operator"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// The labels that select the broker pods.
    pub fn selector(&self) -> BTreeMap<String, String> {
        [
            ("app.kubernetes.io/name", "ringmq"),
            ("app.kubernetes.io/instance", self.instance.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// `selector` as a label selector string (the scale subresource's).
    pub fn selector_string(&self) -> String {
        self.selector()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Where clients connect, by kind (O1).
    pub fn endpoints(&self, spec: &MqttInstanceSpec) -> BTreeMap<String, String> {
        let host = format!("{}.{}.svc", self.main(), self.namespace);
        let mut e = BTreeMap::new();
        e.insert("tcp".to_owned(), format!("{host}:1883"));
        if spec.listeners.websocket {
            e.insert("ws".to_owned(), format!("ws://{host}:80/mqtt"));
        }
        if spec.listeners.tls_secret.is_some() {
            e.insert("tls".to_owned(), format!("{host}:8883"));
            if spec.listeners.websocket {
                e.insert("wss".to_owned(), format!("wss://{host}:443/mqtt"));
            }
        }
        if let Some(k) = &spec.kafka {
            e.insert("kafka".to_owned(), k.bootstrap_servers.clone());
        }
        e
    }
}
