//! `ringmq-bench`: drives any MQTT broker with real MQTT connections
//! (rumqttc) in the scenarios of the benchmark issue and reports throughput,
//! end-to-end latency from timestamps in the payload, and loss, duplication
//! and reordering per publisher.

pub mod payload;
pub mod report;
pub mod run;
pub mod storm;

pub use run::{Scenario, Settings};
