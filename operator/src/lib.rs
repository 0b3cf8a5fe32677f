//! ringmq operator: reconciles `MqttInstance` resources into broker
//! StatefulSets, their Services, configuration and Kafka topics, and reports
//! usage, per-node state and alarms back into the resource's status.
//!
//! See `ARCHITECTURE.md` ("Operator") for how the pieces fit.

pub mod brokerconfig;
pub mod brokers;
pub mod crd;
pub mod credentials;
pub mod lease;
pub mod metrics;
pub mod names;
pub mod profile;
pub mod reconcile;
pub mod resources;
pub mod topics;
