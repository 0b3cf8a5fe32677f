//! `ringmq-bench`: one scenario against one broker, one JSON line out.

use std::time::Duration;

use anyhow::{Context, bail};
use ringmq_bench::{Scenario, Settings, run};

const USAGE: &str =
    "usage: ringmq-bench --port N [--host H] --scenario one-to-one|fan-in|fan-out|idle
       [--clients N] [--qos 0|1|2] [--payload BYTES] [--rate MSGS_PER_SEC_PER_PUBLISHER]
       [--duration SECS] [--drain SECS] [--broker-pid PID] [--tag PREFIX]

--clients is the number of pairs (one-to-one), publishers (fan-in),
subscribers (fan-out) or connections (idle). Prints one JSON line.";

fn main() -> anyhow::Result<()> {
    let settings = parse(std::env::args().skip(1))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let mut outcome = rt.block_on(run::run(settings))?;
    println!("{}", outcome.to_json());
    Ok(())
}

fn parse(mut args: impl Iterator<Item = String>) -> anyhow::Result<Settings> {
    let mut s = Settings {
        host: "127.0.0.1".into(),
        port: 0,
        scenario: Scenario::OneToOne { pairs: 1 },
        qos: rumqttc::QoS::AtMostOnce,
        payload: 64,
        rate: 0,
        duration: Duration::from_secs(10),
        drain: Duration::from_secs(2),
        broker_pid: None,
        tag: format!("bench{}", std::process::id()),
    };
    let mut scenario = String::from("one-to-one");
    let mut clients = 1usize;
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--host" => s.host = value()?,
            "--port" => s.port = value()?.parse()?,
            "--scenario" => scenario = value()?,
            "--clients" => clients = value()?.parse()?,
            "--qos" => {
                s.qos = match value()?.as_str() {
                    "0" => rumqttc::QoS::AtMostOnce,
                    "1" => rumqttc::QoS::AtLeastOnce,
                    "2" => rumqttc::QoS::ExactlyOnce,
                    q => bail!("bad QoS {q}"),
                }
            }
            "--payload" => s.payload = value()?.parse()?,
            "--rate" => s.rate = value()?.parse()?,
            "--duration" => s.duration = Duration::from_secs_f64(value()?.parse()?),
            "--drain" => s.drain = Duration::from_secs_f64(value()?.parse()?),
            "--broker-pid" => s.broker_pid = Some(value()?.parse()?),
            "--tag" => s.tag = value()?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if s.port == 0 {
        bail!("--port is required\n{USAGE}");
    }
    s.scenario = match scenario.as_str() {
        "one-to-one" => Scenario::OneToOne { pairs: clients },
        "fan-in" => Scenario::FanIn {
            publishers: clients,
        },
        "fan-out" => Scenario::FanOut {
            subscribers: clients,
        },
        "idle" => Scenario::Idle {
            connections: clients,
        },
        other => bail!("unknown scenario {other:?}"),
    };
    Ok(s)
}
