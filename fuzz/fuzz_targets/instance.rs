//! MqttInstance specs from arbitrary YAML through what the operator derives
//! from them (replicas, broker configuration, owned objects): whatever
//! deserializes renders, never a panic.
#![no_main]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use libfuzzer_sys::fuzz_target;
use ringmq_operator::brokerconfig::{self, Inputs};
use ringmq_operator::crd::MqttInstance;
use ringmq_operator::names::Names;
use ringmq_operator::{profile, resources};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(mi) = serde_yaml::from_str::<MqttInstance>(text) else {
        return;
    };
    let names = Names::new("fuzz", "ns");
    let inputs = Inputs {
        kafka_username: Some("u".into()),
        kafka_ca: true,
        credentials: ringmq_operator::credentials::needed(&mi.spec),
    };
    let broker_yaml = brokerconfig::render(&mi.spec, &names, &inputs);
    let ctx = resources::Context {
        names: &names,
        owner: OwnerReference::default(),
        replicas: profile::replicas(&mi.spec),
        image: resources::DEFAULT_IMAGE,
        config_hash: resources::hash(&[&broker_yaml]),
    };
    for o in resources::objects(&ctx, &mi.spec, broker_yaml, None, true) {
        let _ = o.to_value();
    }
});
