//! `ringmq-bench`: one scenario against one broker, one JSON line out.

use std::time::Duration;

use anyhow::{Context, bail};
use ringmq_bench::{Scenario, Settings, run};

const USAGE: &str =
    "usage: ringmq-bench --port N [--host H] --scenario one-to-one|p2p|fan-in|fan-out|idle
       [--clients N] [--qos 0|1|2[,0|1|2...]] [--payload BYTES]
       [--rate MSGS_PER_SEC_PER_PUBLISHER] [--ramp CONNECTIONS_PER_SEC]
       [--duration SECS] [--drain SECS] [--broker-pid PID] [--tag PREFIX]
       [--user NAME --password PW] [--storm N --storm-user NAME] [--persistent]

--clients is the number of pairs (one-to-one, p2p), publishers (fan-in),
subscribers (fan-out) or connections (idle). p2p sends each message to one
receiver by its Client ID (<parent>/p2p/<clientId>) without subscriptions.
A --qos list mixes levels: publisher i uses the i-th, in turn. --ramp paces
the connections (default 0: back to back). With a --rate, packets are sent
at once (TCP_NODELAY); at full speed the kernel may coalesce them.
--user/--password log every client in. --storm runs N connections that
log in as --storm-user with a wrong password, again and again, while the
scenario runs (a login storm beside it: what it costs connected clients).
--persistent connects every client with cleanSession=false: the broker
keeps the subscribers' sessions and, durable, writes their QoS 1/2
messages to disk before acknowledging them.
Prints one JSON line.";

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
        qos: vec![rumqttc::QoS::AtMostOnce],
        payload: 64,
        rate: 0,
        ramp: 0,
        duration: Duration::from_secs(10),
        drain: Duration::from_secs(2),
        broker_pid: None,
        tag: format!("bench{}", std::process::id()),
        credentials: None,
        storm: 0,
        storm_user: String::new(),
        persistent: false,
    };
    let (mut user, mut password) = (None, None);
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
                s.qos = value()?
                    .split(',')
                    .map(|q| match q {
                        "0" => Ok(rumqttc::QoS::AtMostOnce),
                        "1" => Ok(rumqttc::QoS::AtLeastOnce),
                        "2" => Ok(rumqttc::QoS::ExactlyOnce),
                        q => bail!("bad QoS {q:?}"),
                    })
                    .collect::<anyhow::Result<_>>()?;
            }
            "--payload" => s.payload = value()?.parse()?,
            "--rate" => s.rate = value()?.parse()?,
            "--ramp" => s.ramp = value()?.parse()?,
            "--duration" => s.duration = Duration::from_secs_f64(value()?.parse()?),
            "--drain" => s.drain = Duration::from_secs_f64(value()?.parse()?),
            "--broker-pid" => s.broker_pid = Some(value()?.parse()?),
            "--tag" => s.tag = value()?,
            "--user" => user = Some(value()?),
            "--password" => password = Some(value()?),
            "--storm" => s.storm = value()?.parse()?,
            "--storm-user" => s.storm_user = value()?,
            "--persistent" => s.persistent = true,
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
    s.credentials = match (user, password) {
        (Some(u), Some(p)) => Some((u, p)),
        (None, None) => None,
        _ => bail!("--user and --password go together"),
    };
    if s.storm > 0 && s.storm_user.is_empty() {
        bail!("--storm needs --storm-user");
    }
    s.scenario = match scenario.as_str() {
        "one-to-one" => Scenario::OneToOne { pairs: clients },
        "p2p" => Scenario::P2p { pairs: clients },
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> impl Iterator<Item = String> {
        line.split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn a_qos_list_mixes_levels_and_p2p_ramp_parse() {
        let s = parse(args(
            "--port 1 --scenario p2p --clients 4 --qos 0,2,1 --ramp 50",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.scenario, Scenario::P2p { pairs: 4 });
        assert_eq!(
            s.qos,
            [
                rumqttc::QoS::AtMostOnce,
                rumqttc::QoS::ExactlyOnce,
                rumqttc::QoS::AtLeastOnce
            ]
        );
        assert_eq!(s.ramp, 50);
        assert!(parse(args("--port 1 --qos 0,3")).is_err());
        assert!(parse(args("--port 1 --qos 1,")).is_err());
    }

    #[test]
    fn credentials_and_a_storm_parse_together_or_not_at_all() {
        let s = parse(args(
            "--port 1 --user alice --password pw --storm 200 --storm-user alice",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.credentials, Some(("alice".into(), "pw".into())));
        assert_eq!((s.storm, s.storm_user.as_str()), (200, "alice"));
        assert!(parse(args("--port 1 --user alice")).is_err());
        assert!(parse(args("--port 1 --storm 5")).is_err());
    }
}
