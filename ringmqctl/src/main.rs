//! `ringmqctl`: the operations API at a terminal. Every answer covers the
//! whole instance, whichever node is asked.

mod http;
mod render;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringmq_api as api;

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
    let out = Out { json: cli.json };
    match &cli.command {
        Command::Instance => out.show(&api.get("instance")?, show_instance),
        Command::Client { client_id } => out.show(
            &api.get(&format!("clients/{}", encode(client_id)))?,
            show_client,
        ),
        Command::Kick { client_id } => out.show(
            &api.post::<_, api::Kicked>(&format!("clients/{}/kick", encode(client_id)), &Empty {})?,
            |v| format!("kicked {}\n", v.client_id),
        ),
        Command::Unsubscribe { client_id, filter } => out.show(
            &api.post::<_, api::Unsubscribed>(
                &format!("clients/{}/unsubscribe", encode(client_id)),
                &api::UnsubscribeRequest {
                    filter: filter.clone(),
                },
            )?,
            |v| format!("{} unsubscribed from {}\n", v.client_id, v.filter),
        ),
        Command::Online { client_ids } => out.show(
            &api.post(
                "online/clients",
                &api::OnlineRequest {
                    client_ids: client_ids.clone(),
                },
            )?,
            show_online,
        ),
        Command::TopicOnline { topic } => out.show(
            &api.get::<api::TopicOnline>(&format!("online/topic?topic={}", encode(topic)))?,
            |v| {
                format!(
                    "{}{} subscribers online for {}\n",
                    missing(&v.missing_nodes),
                    v.online,
                    v.topic
                )
            },
        ),
        Command::Groups { group, range } => {
            let g = group
                .as_ref()
                .map(|g| format!("&groupId={}", encode(g)))
                .unwrap_or_default();
            out.show(
                &api.get(&format!("online/groups?{}{g}", range.query()))?,
                show_groups,
            )
        }
        Command::DeviceTrace { client_id, range } => out.show(
            &api.get(&format!(
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
            out.show(&api.get(&format!("trace/message?{q}"))?, show_message_trace)
        }
        Command::Report { last, parent_topic } => {
            let p = parent_topic
                .as_ref()
                .map(|p| format!("&parentTopic={}", encode(p)))
                .unwrap_or_default();
            out.show(
                &api.get(&format!("report?range={}{p}", encode(last)))?,
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
            out.show(
                &api.get(&format!("topics/{}{g}", encode(parent_topic)))?,
                show_topic,
            )
        }
        Command::Alarms => out.show(&api.get("alarms")?, show_alarms),
        Command::Ack { id } => out.show(
            &api.post::<_, api::Acknowledged>(&format!("alarms/{}/ack", encode(id)), &Empty {})?,
            |v| format!("acknowledged {}\n", v.id),
        ),
        Command::Send {
            topic,
            payload,
            qos,
            retain,
        } => out.show(
            &api.post::<_, api::Sent>(
                "messages",
                &api::SendRequest {
                    topic: topic.clone(),
                    payload: payload.clone(),
                    payload_encoding: api::PayloadEncoding::Utf8,
                    qos: *qos,
                    retain: *retain,
                },
            )?,
            |v| {
                format!(
                    "sent {} to {} ({} sessions reached)\n",
                    v.message_id, v.topic, v.reached
                )
            },
        ),
    }
}

/// The empty JSON object the POSTs without parameters send.
#[derive(serde::Serialize)]
struct Empty {}

/// How an answer is printed: the API's JSON (`--json`) or text.
struct Out {
    json: bool,
}

impl Out {
    fn show<T: serde::Serialize>(
        &self,
        answer: &T,
        text: fn(&T) -> String,
    ) -> anyhow::Result<String> {
        if self.json {
            return Ok(serde_json::to_string_pretty(answer)? + "\n");
        }
        Ok(text(answer))
    }
}

fn show_instance(v: &api::Instance) -> String {
    let (cap, tot, util) = (&v.capacity, &v.totals, &v.utilization);
    let endpoints: Vec<String> = v
        .endpoints
        .iter()
        .map(|(k, e)| format!("{k}={e}"))
        .collect();
    let mut out = missing(&v.missing_nodes);
    out.push_str(&block(&[
        ("instance", v.name.clone()),
        ("mode", cap.mode.clone()),
        ("endpoints", endpoints.join(" ")),
        (
            "connections",
            used(cell(&tot.connections), cap.connections, util.connections),
        ),
        (
            "subscriptions",
            used(
                cell(&tot.subscriptions),
                cap.subscriptions,
                util.subscriptions,
            ),
        ),
        ("topics", used(cell(&tot.topics), cap.topics, util.topics)),
        ("tps", used(cell(&tot.tps), cap.tps, util.tps)),
        (
            "pub / sub tps",
            format!("{} / {}", cell(&tot.pub_tps), cell(&tot.sub_tps)),
        ),
        ("active alarms", cell(&v.active_alarms)),
        (
            "replication",
            match v.under_replicated_sessions {
                0 => "every persistent session has its copies".to_owned(),
                n => format!("{n} persistent sessions under-replicated"),
            },
        ),
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
    for n in &v.nodes {
        t.row(vec![
            cell(&n.name),
            cell(&n.state),
            cell(&n.connections),
            cell(&n.max_connections),
            cell(&n.subscriptions),
            cell(&n.subscribers),
            cell(&n.pub_tps),
            cell(&n.sub_tps),
        ]);
    }
    out.push('\n');
    out.push_str(&t.render());
    out
}

/// A total against its capacity.
fn used(total: String, capacity: u64, percent: Option<f64>) -> String {
    match percent {
        Some(p) => format!("{total} of {capacity} ({p:.1} %)"),
        None => format!("{total} (no limit)"),
    }
}

fn show_client(v: &api::Client) -> String {
    let d = &v.detail;
    let mut out = missing(&v.missing_nodes);
    out.push_str(&block(&[
        ("client id", cell(&d.client_id)),
        ("online", cell(&d.online)),
        ("node", cell(&d.node)),
        ("client ip", cell(&d.ip)),
        ("protocol", cell(&d.protocol)),
        ("connected", time(d.connected_at)),
        ("disconnected", time(d.disconnected_at)),
        ("clean session", cell(&d.clean_session)),
        ("user", cell(&d.user)),
        ("messages sent", cell(&d.messages_sent)),
        ("messages received", cell(&d.messages_received)),
        ("offline messages", cell(&d.offline_messages)),
        ("subscriptions", cell(&d.subscription_count)),
    ]));
    let mut t = Table::new(&["FILTER", "QOS"]);
    for s in &d.subscriptions {
        t.row(vec![cell(&s.filter), cell(&s.qos)]);
    }
    out.push('\n');
    out.push_str(&t.render());
    out
}

fn show_online(v: &api::Online) -> String {
    let mut t = Table::new(&["CLIENT ID", "ONLINE"]);
    for (id, on) in &v.online {
        t.row(vec![id.clone(), cell(on)]);
    }
    missing(&v.missing_nodes) + &t.render()
}

fn show_groups(v: &api::Groups) -> String {
    let mut now = Table::new(&["GROUP ID", "ONLINE NOW"]);
    let mut groups: Vec<(&String, &u64)> = v.now.iter().collect();
    groups.sort_by(|a, b| a.0.cmp(b.0));
    for (g, n) in groups {
        now.row(vec![g.clone(), cell(n)]);
    }
    let mut history = Table::new(&["TIME", "GROUP ID", "ONLINE"]);
    for s in &v.history {
        let mut gs: Vec<(&String, &u64)> = s.groups.iter().collect();
        gs.sort_by(|a, b| a.0.cmp(b.0));
        for (g, n) in gs {
            history.row(vec![time(s.ts), g.clone(), cell(n)]);
        }
    }
    missing(&v.missing_nodes) + &now.render() + "\n" + &history.render()
}

fn show_device_trace(v: &api::DeviceTrace) -> String {
    let mut t = Table::new(&["TIME", "NODE", "CONNECTION", "ACTION", "REASON", "DETAIL"]);
    for e in &v.events {
        t.row(vec![
            time(e.ts),
            cell(&e.node),
            cell(&e.channel_id),
            cell(&e.action),
            cell(&e.reason),
            cell(&e.detail),
        ]);
    }
    missing(&v.missing_nodes) + &t.render()
}

fn show_message_trace(v: &api::MessageTrace) -> String {
    let mut t = Table::new(&[
        "TIME",
        "NODE",
        "MESSAGE ID",
        "CLIENT ID",
        "ACTION",
        "TOPIC",
        "QOS",
    ]);
    for e in &v.events {
        t.row(vec![
            time(e.ts),
            cell(&e.node),
            cell(&e.message_id),
            cell(&e.client_id),
            cell(&e.action),
            cell(&e.topic),
            cell(&e.qos),
        ]);
    }
    missing(&v.missing_nodes) + &t.render()
}

fn show_report(v: &api::Report) -> String {
    let mut t = Table::new(&[
        "PARENT TOPIC",
        "SUBTOPIC",
        "QOS",
        "PRODUCED",
        "CONSUMED",
        "PRODUCED TPS",
        "CONSUMED TPS",
    ]);
    for r in &v.rows {
        t.row(vec![
            cell(&r.parent_topic),
            cell(&r.subtopic),
            cell(&r.qos),
            cell(&r.produced),
            cell(&r.consumed),
            cell(&r.produced_tps),
            cell(&r.consumed_tps),
        ]);
    }
    let tot = &v.totals;
    format!(
        "{}{} to {}\n{}\ntotal: {} produced, {} consumed; weighted TPS {} pub, {} sub\n",
        missing(&v.missing_nodes),
        time(v.from),
        time(v.to),
        t.render(),
        tot.produced,
        tot.consumed,
        cell(&tot.weighted_pub_tps),
        cell(&tot.weighted_sub_tps)
    )
}

fn show_alarms(v: &api::Alarms) -> String {
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
    for a in &v.alarms {
        t.row(vec![
            cell(&a.id),
            cell(&a.metric),
            cell(&a.value),
            cell(&a.peak),
            cell(&a.threshold),
            cell(&a.state),
            time(a.start),
            time(a.end),
            (a.duration_secs / 60).to_string(),
        ]);
    }
    missing(&v.missing_nodes) + &t.render()
}

fn show_topic(v: &api::TopicState) -> String {
    let brokers: Vec<String> = v
        .brokers
        .iter()
        .map(|b| format!("{}:{} (id {})", b.host, b.port, b.id))
        .collect();
    let mut out = block(&[
        ("topic", cell(&v.topic)),
        ("kafka brokers", brokers.join(", ")),
        ("messages", cell(&v.messages)),
        ("group", cell(&v.group)),
        ("backlog", cell(&v.backlog)),
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
    for p in &v.partitions {
        t.row(vec![
            cell(&p.partition),
            cell(&p.leader),
            cell(&p.low),
            cell(&p.high),
            cell(&p.messages),
            cell(&p.committed),
            cell(&p.backlog),
        ]);
    }
    out.push('\n');
    out.push_str(&t.render());
    out
}
