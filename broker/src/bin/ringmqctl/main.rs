//! `ringmqctl`: the operations API at a terminal. Every answer covers the
//! whole instance, whichever node is asked.

mod http;
mod render;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use http::{Api, encode};
use render::{Table, block, cell, missing, time};

/// ringmq operations: instance, clients, traces, report, alarms.
#[derive(Parser)]
#[command(name = "ringmqctl", version)]
struct Cli {
    /// Admin port of any broker node.
    #[arg(long, env = "RINGMQ_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// File holding the admin bearer token (when the instance has one).
    #[arg(long, env = "RINGMQ_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Capacity, endpoints, totals and the per-node table (O1).
    Instance,
    /// One client: connection, session and subscriptions (O2).
    Client { client_id: String },
    /// Disconnects a client (O2).
    Kick { client_id: String },
    /// Removes one subscription of a client (O2).
    Unsubscribe { client_id: String, filter: String },
    /// Whether each of the Client IDs is online (O2).
    Online { client_ids: Vec<String> },
    /// Subscribers online now for a topic (O3).
    TopicOnline { topic: String },
    /// Online connections by Group ID, now and sampled over a range (O3).
    Groups {
        #[arg(long)]
        group: Option<String>,
        #[command(flatten)]
        range: Range,
    },
    /// Device trace of a client (O4).
    DeviceTrace {
        client_id: String,
        #[command(flatten)]
        range: Range,
    },
    /// Message trace by Client ID, Message ID or both (O5).
    MessageTrace {
        #[arg(long)]
        client_id: Option<String>,
        #[arg(long)]
        message_id: Option<String>,
        #[command(flatten)]
        range: Range,
    },
    /// Messages per parent topic / subtopic / QoS (O6).
    Report {
        /// 1h, 3h, 12h or 1d, ending now.
        #[arg(long, default_value = "1h")]
        last: String,
        #[arg(long)]
        parent_topic: Option<String>,
    },
    /// A parent topic in Kafka: partitions, offsets, a group's backlog (O7).
    Topic {
        parent_topic: String,
        /// Consumer group whose backlog to show.
        #[arg(long)]
        group: Option<String>,
    },
    /// Alarm records, newest first (L4).
    Alarms,
    /// Acknowledges ("ignores") an alarm (L4).
    Ack { id: String },
    /// Sends a test message; prints its Message ID (O8).
    Send {
        topic: String,
        payload: String,
        #[arg(long, default_value_t = 0)]
        qos: u8,
        #[arg(long)]
        retain: bool,
    },
}

/// A time range in milliseconds since the Unix epoch (default: the last hour).
#[derive(clap::Args)]
struct Range {
    #[arg(long)]
    from: Option<u64>,
    #[arg(long)]
    to: Option<u64>,
}

impl Range {
    fn query(&self) -> String {
        let mut q = String::new();
        if let Some(f) = self.from {
            q.push_str(&format!("&from={f}"));
        }
        if let Some(t) = self.to {
            q.push_str(&format!("&to={t}"));
        }
        q
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ringmqctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<String> {
    let token = match &cli.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let api = Api::new(&cli.server, token)?;
    let (answer, show): (Value, fn(&Value) -> String) = match &cli.command {
        Command::Instance => (api.get("instance")?, show_instance),
        Command::Client { client_id } => (
            api.get(&format!("clients/{}", encode(client_id)))?,
            show_client,
        ),
        Command::Kick { client_id } => (
            api.post(&format!("clients/{}/kick", encode(client_id)), &json!({}))?,
            |v| format!("kicked {}\n", cell(&v["clientId"])),
        ),
        Command::Unsubscribe { client_id, filter } => (
            api.post(
                &format!("clients/{}/unsubscribe", encode(client_id)),
                &json!({ "filter": filter }),
            )?,
            |v| {
                format!(
                    "{} unsubscribed from {}\n",
                    cell(&v["clientId"]),
                    cell(&v["filter"])
                )
            },
        ),
        Command::Online { client_ids } => (
            api.post("online/clients", &json!({ "clientIds": client_ids }))?,
            show_online,
        ),
        Command::TopicOnline { topic } => (
            api.get(&format!("online/topic?topic={}", encode(topic)))?,
            |v| {
                format!(
                    "{}{} subscribers online for {}\n",
                    missing(v),
                    cell(&v["online"]),
                    cell(&v["topic"])
                )
            },
        ),
        Command::Groups { group, range } => {
            let g = group
                .as_ref()
                .map(|g| format!("&groupId={}", encode(g)))
                .unwrap_or_default();
            (
                api.get(&format!("online/groups?{}{g}", range.query()))?,
                show_groups,
            )
        }
        Command::DeviceTrace { client_id, range } => (
            api.get(&format!(
                "trace/device?clientId={}{}",
                encode(client_id),
                range.query()
            ))?,
            show_device_trace,
        ),
        Command::MessageTrace {
            client_id,
            message_id,
            range,
        } => {
            let mut q = range.query();
            if let Some(c) = client_id {
                q.push_str(&format!("&clientId={}", encode(c)));
            }
            if let Some(m) = message_id {
                q.push_str(&format!("&messageId={}", encode(m)));
            }
            (api.get(&format!("trace/message?{q}"))?, show_message_trace)
        }
        Command::Report { last, parent_topic } => {
            let p = parent_topic
                .as_ref()
                .map(|p| format!("&parentTopic={}", encode(p)))
                .unwrap_or_default();
            (
                api.get(&format!("report?range={}{p}", encode(last)))?,
                show_report,
            )
        }
        Command::Topic {
            parent_topic,
            group,
        } => {
            let g = group
                .as_ref()
                .map(|g| format!("?group={}", encode(g)))
                .unwrap_or_default();
            (
                api.get(&format!("topics/{}{g}", encode(parent_topic)))?,
                show_topic,
            )
        }
        Command::Alarms => (api.get("alarms")?, show_alarms),
        Command::Ack { id } => (
            api.post(&format!("alarms/{}/ack", encode(id)), &json!({}))?,
            |v| format!("acknowledged {}\n", cell(&v["id"])),
        ),
        Command::Send {
            topic,
            payload,
            qos,
            retain,
        } => (
            api.post(
                "messages",
                &json!({ "topic": topic, "payload": payload, "qos": qos, "retain": retain }),
            )?,
            |v| {
                format!(
                    "sent {} to {} ({} sessions reached)\n",
                    cell(&v["messageId"]),
                    cell(&v["topic"]),
                    cell(&v["reached"])
                )
            },
        ),
    };
    if cli.json {
        return Ok(serde_json::to_string_pretty(&answer)? + "\n");
    }
    Ok(show(&answer))
}

fn show_instance(v: &Value) -> String {
    let cap = &v["capacity"];
    let tot = &v["totals"];
    let util = &v["utilization"];
    let used = |k: &str| match util[k].as_f64() {
        Some(p) => format!("{} of {} ({p:.1} %)", cell(&tot[k]), cell(&cap[k])),
        None => format!("{} (no limit)", cell(&tot[k])),
    };
    let endpoints: Vec<String> = v["endpoints"]
        .as_object()
        .map(|m| m.iter().map(|(k, e)| format!("{k}={}", cell(e))).collect())
        .unwrap_or_default();
    let mut out = missing(v);
    out.push_str(&block(&[
        ("instance", cell(&v["name"])),
        ("mode", cell(&cap["mode"])),
        ("endpoints", endpoints.join(" ")),
        ("connections", used("connections")),
        ("subscriptions", used("subscriptions")),
        ("topics", used("topics")),
        ("tps", used("tps")),
        (
            "pub / sub tps",
            format!("{} / {}", cell(&tot["pubTps"]), cell(&tot["subTps"])),
        ),
        ("active alarms", cell(&v["activeAlarms"])),
    ]));
    let mut t = Table::new(&[
        "NODE",
        "STATE",
        "CONNECTIONS",
        "MAX",
        "SUBSCRIPTIONS",
        "SUBSCRIBERS",
        "PUB TPS",
        "SUB TPS",
    ]);
    for n in v["nodes"].as_array().into_iter().flatten() {
        t.row(
            [
                "name",
                "state",
                "connections",
                "maxConnections",
                "subscriptions",
                "subscribers",
                "pubTps",
                "subTps",
            ]
            .iter()
            .map(|k| cell(&n[*k]))
            .collect(),
        );
    }
    out.push('\n');
    out.push_str(&t.render());
    out
}

fn show_client(v: &Value) -> String {
    let mut out = missing(v);
    out.push_str(&block(&[
        ("client id", cell(&v["clientId"])),
        ("online", cell(&v["online"])),
        ("node", cell(&v["node"])),
        ("client ip", cell(&v["ip"])),
        ("protocol", cell(&v["protocol"])),
        ("connected", time(&v["connectedAt"])),
        ("disconnected", time(&v["disconnectedAt"])),
        ("clean session", cell(&v["cleanSession"])),
        ("user", cell(&v["user"])),
        ("messages sent", cell(&v["messagesSent"])),
        ("messages received", cell(&v["messagesReceived"])),
        ("offline messages", cell(&v["offlineMessages"])),
        ("subscriptions", cell(&v["subscriptionCount"])),
    ]));
    let mut t = Table::new(&["FILTER", "QOS"]);
    for s in v["subscriptions"].as_array().into_iter().flatten() {
        t.row(vec![cell(&s["filter"]), cell(&s["qos"])]);
    }
    out.push('\n');
    out.push_str(&t.render());
    out
}

fn show_online(v: &Value) -> String {
    let mut t = Table::new(&["CLIENT ID", "ONLINE"]);
    for (id, on) in v["online"].as_object().into_iter().flatten() {
        t.row(vec![id.clone(), cell(on)]);
    }
    missing(v) + &t.render()
}

fn show_groups(v: &Value) -> String {
    let mut now = Table::new(&["GROUP ID", "ONLINE NOW"]);
    let mut groups: Vec<(&String, &Value)> = v["now"].as_object().into_iter().flatten().collect();
    groups.sort_by(|a, b| a.0.cmp(b.0));
    for (g, n) in groups {
        now.row(vec![g.clone(), cell(n)]);
    }
    let mut history = Table::new(&["TIME", "GROUP ID", "ONLINE"]);
    for s in v["history"].as_array().into_iter().flatten() {
        let mut gs: Vec<(&String, &Value)> =
            s["groups"].as_object().into_iter().flatten().collect();
        gs.sort_by(|a, b| a.0.cmp(b.0));
        for (g, n) in gs {
            history.row(vec![time(&s["ts"]), g.clone(), cell(n)]);
        }
    }
    missing(v) + &now.render() + "\n" + &history.render()
}

fn show_device_trace(v: &Value) -> String {
    let mut t = Table::new(&["TIME", "NODE", "CONNECTION", "ACTION", "REASON", "DETAIL"]);
    for e in v["events"].as_array().into_iter().flatten() {
        t.row(vec![
            time(&e["ts"]),
            cell(&e["node"]),
            cell(&e["channelId"]),
            cell(&e["action"]),
            cell(&e["reason"]),
            cell(&e["detail"]),
        ]);
    }
    missing(v) + &t.render()
}

fn show_message_trace(v: &Value) -> String {
    let mut t = Table::new(&[
        "TIME",
        "NODE",
        "MESSAGE ID",
        "CLIENT ID",
        "ACTION",
        "TOPIC",
        "QOS",
    ]);
    for e in v["events"].as_array().into_iter().flatten() {
        t.row(vec![
            time(&e["ts"]),
            cell(&e["node"]),
            cell(&e["messageId"]),
            cell(&e["clientId"]),
            cell(&e["action"]),
            cell(&e["topic"]),
            cell(&e["qos"]),
        ]);
    }
    missing(v) + &t.render()
}

fn show_report(v: &Value) -> String {
    let mut t = Table::new(&[
        "PARENT TOPIC",
        "SUBTOPIC",
        "QOS",
        "PRODUCED",
        "CONSUMED",
        "PRODUCED TPS",
        "CONSUMED TPS",
    ]);
    for r in v["rows"].as_array().into_iter().flatten() {
        t.row(
            [
                "parentTopic",
                "subtopic",
                "qos",
                "produced",
                "consumed",
                "producedTps",
                "consumedTps",
            ]
            .iter()
            .map(|k| cell(&r[*k]))
            .collect(),
        );
    }
    let tot = &v["totals"];
    format!(
        "{}{} to {}\n{}\ntotal: {} produced, {} consumed; weighted TPS {} pub, {} sub\n",
        missing(v),
        time(&v["from"]),
        time(&v["to"]),
        t.render(),
        cell(&tot["produced"]),
        cell(&tot["consumed"]),
        cell(&tot["weightedPubTps"]),
        cell(&tot["weightedSubTps"])
    )
}

fn show_alarms(v: &Value) -> String {
    let mut t = Table::new(&[
        "ID",
        "METRIC",
        "VALUE",
        "PEAK",
        "THRESHOLD",
        "STATE",
        "START",
        "END",
        "MINUTES",
    ]);
    for a in v["alarms"].as_array().into_iter().flatten() {
        t.row(vec![
            cell(&a["id"]),
            cell(&a["metric"]),
            cell(&a["value"]),
            cell(&a["peak"]),
            cell(&a["threshold"]),
            cell(&a["state"]),
            time(&a["start"]),
            time(&a["end"]),
            (a["durationSecs"].as_u64().unwrap_or(0) / 60).to_string(),
        ]);
    }
    missing(v) + &t.render()
}

fn show_topic(v: &Value) -> String {
    let brokers: Vec<String> = v["brokers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            format!(
                "{}:{} (id {})",
                cell(&b["host"]),
                cell(&b["port"]),
                cell(&b["id"])
            )
        })
        .collect();
    let mut out = block(&[
        ("topic", cell(&v["topic"])),
        ("kafka brokers", brokers.join(", ")),
        ("messages", cell(&v["messages"])),
        ("group", cell(&v["group"])),
        ("backlog", cell(&v["backlog"])),
    ]);
    let mut t = Table::new(&[
        "PARTITION",
        "LEADER",
        "LOW",
        "HIGH",
        "MESSAGES",
        "COMMITTED",
        "BACKLOG",
    ]);
    for p in v["partitions"].as_array().into_iter().flatten() {
        t.row(
            [
                "partition",
                "leader",
                "low",
                "high",
                "messages",
                "committed",
                "backlog",
            ]
            .iter()
            .map(|k| cell(&p[*k]))
            .collect(),
        );
    }
    out.push('\n');
    out.push_str(&t.render());
    out
}
