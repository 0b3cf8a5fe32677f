//! The operations API (O1–O8): what the product consoles show, answered for
//! the whole instance from any node.
//!
//! Every question is a `Query`. A node answers it from its own state
//! (`answer`); the HTTP layer (`http`) asks every ring member over the
//! cluster links (`Frame::Query`/`Frame::Reply`) and merges the answers, so
//! a client, trace or report is found wherever its session or traffic was.
//! The ticker (`tick`) meters, exchanges load reports, refills the TPS
//! bucket and evaluates alarms.

pub mod http;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::alarm::{AlarmRecord, Change, Metric};
use crate::broker::Broker;
use crate::capacity::{Load, REFILL};
use crate::message::now_ms;
use crate::meter::{GroupSample, Report};
use crate::peers::PeerMsg;
use crate::session::KickReason;

/// A question one node answers about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "q", rename_all = "snake_case")]
pub enum Query {
    Node,
    Client {
        client_id: String,
    },
    Online {
        client_ids: Vec<String>,
    },
    Kick {
        client_id: String,
    },
    Unsubscribe {
        client_id: String,
        filter: String,
    },
    TopicOnline {
        topic: String,
    },
    Groups {
        from: u64,
        to: u64,
    },
    DeviceTrace {
        client_id: String,
        from: u64,
        to: u64,
        limit: usize,
    },
    MessageTrace {
        client_id: Option<String>,
        message_id: Option<u64>,
        from: u64,
        to: u64,
        limit: usize,
    },
    Report {
        from: u64,
        to: u64,
    },
    Alarms,
    AckAlarm {
        id: String,
    },
}

// The answers a node gives about itself are the API's own shapes.
pub use ringmq_api::{ClientDetail, NodeInfo, Subscription};

/// Group ID online counts of one node (O3).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Groups {
    pub now: HashMap<String, u64>,
    pub history: Vec<GroupSample>,
}

/// The Group ID of a Client ID (`GroupID@@@DeviceID`).
fn group_of(client_id: &str) -> Option<&str> {
    client_id.split_once("@@@").map(|(g, _)| g)
}

/// Online connections of this node by Group ID.
fn groups_now(broker: &Broker) -> HashMap<String, u64> {
    let mut now = HashMap::new();
    for s in broker.sessions().all() {
        if let Some(g) = group_of(&s.client_id)
            && s.is_online()
        {
            *now.entry(g.to_owned()).or_insert(0) += 1;
        }
    }
    now
}

fn node_state(broker: &Broker) -> &'static str {
    if !broker.is_ready() {
        "stopping"
    } else if let Some(c) = broker.peers() {
        if c.is_leaving() {
            "leaving"
        } else if !c.is_settled() {
            "joining"
        } else {
            "running"
        }
    } else {
        "running"
    }
}

fn gauge(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Whether this node evaluates the instance's alarms: the ring member with
/// the smallest name.
pub fn is_evaluator(broker: &Broker) -> bool {
    broker
        .peers()
        .is_none_or(|c| c.members().iter().all(|m| **m > **broker.node()))
}

fn node_info(broker: &Broker) -> NodeInfo {
    let sessions = broker.sessions().all();
    let subscribers = sessions
        .iter()
        .filter(|s| !s.lock().subscriptions.is_empty())
        .count();
    let (pub_tps, sub_tps) = broker.usage().meter().tps();
    NodeInfo {
        name: broker.node().to_string(),
        state: node_state(broker).to_owned(),
        connections: gauge(broker.metrics().connections.get()),
        max_connections: broker.usage().meter().peak_connections(),
        subscriptions: gauge(broker.metrics().subscriptions.get()),
        subscribers: subscribers as u64,
        sessions: sessions.len() as u64,
        topics: broker.router().distinct_filters() as u64,
        pub_tps,
        sub_tps,
        under_replicated_sessions: gauge(broker.metrics().sessions_under_replicated.get()),
        replica_sessions: gauge(broker.metrics().replica_sessions.get()),
        alarm_evaluator: is_evaluator(broker),
    }
}

fn client_detail(broker: &Broker, client_id: &str) -> Option<ClientDetail> {
    let session = broker.sessions().get(client_id)?;
    let st = session.lock();
    let mut subscriptions: Vec<Subscription> = st
        .subscriptions
        .iter()
        .map(|(f, o)| Subscription {
            filter: f.clone(),
            qos: o.qos as u8,
        })
        .collect();
    subscriptions.sort_by(|a, b| a.filter.cmp(&b.filter));
    let info = &st.info;
    let known = info.connected_at > 0;
    Some(ClientDetail {
        client_id: client_id.to_owned(),
        node: broker.node().to_string(),
        online: st.attached.is_some(),
        ip: info.ip.map(|ip| ip.to_string()),
        protocol: known.then(|| info.protocol.to_owned()),
        channel_id: info.channel_id.as_deref().map(str::to_owned),
        connected_at: known.then_some(info.connected_at),
        disconnected_at: info.disconnected_at,
        clean_session: info.clean_session,
        user: info.user.as_deref().map(str::to_owned),
        subscription_count: subscriptions.len(),
        subscriptions,
        messages_sent: session.sent.load(std::sync::atomic::Ordering::Relaxed),
        messages_received: session.received.load(std::sync::atomic::Ordering::Relaxed),
        offline_messages: st.offline.len(),
    })
}

fn topic_online(broker: &Broker, topic: &str) -> u64 {
    let matches = |raw: &str| {
        let filter = match raw.strip_prefix("$share/") {
            Some(rest) => rest.split_once('/').map_or("", |(_, f)| f),
            None => raw,
        };
        crate::topic::matches(filter, topic)
    };
    broker
        .sessions()
        .all()
        .iter()
        .filter(|s| {
            let st = s.lock();
            st.attached.is_some() && st.subscriptions.keys().any(|f| matches(f))
        })
        .count() as u64
}

/// This node's answer to a query.
pub fn answer(broker: &Broker, q: &Query) -> serde_json::Value {
    use serde_json::to_value;
    let value = match q {
        Query::Node => to_value(node_info(broker)),
        Query::Client { client_id } => to_value(client_detail(broker, client_id)),
        Query::Online { client_ids } => to_value(
            client_ids
                .iter()
                .filter(|c| broker.sessions().get(c).is_some_and(|s| s.is_online()))
                .collect::<Vec<_>>(),
        ),
        Query::Kick { client_id } => {
            let session = broker.sessions().get(client_id).filter(|s| s.is_online());
            if let Some(s) = &session {
                tracing::info!(client_id, "client kicked through the operations API");
                s.kick(KickReason::Administrative);
            }
            to_value(session.is_some())
        }
        Query::Unsubscribe { client_id, filter } => to_value(
            broker
                .sessions()
                .get(client_id)
                .map(|s| broker.unsubscribe(&s, filter)),
        ),
        Query::TopicOnline { topic } => to_value(topic_online(broker, topic)),
        Query::Groups { from, to } => to_value(Groups {
            now: groups_now(broker),
            history: broker.usage().meter().groups(*from, *to),
        }),
        Query::DeviceTrace {
            client_id,
            from,
            to,
            limit,
        } => to_value(
            broker
                .usage()
                .traces()
                .device_events(client_id, *from, *to, *limit),
        ),
        Query::MessageTrace {
            client_id,
            message_id,
            from,
            to,
            limit,
        } => to_value(broker.usage().traces().message_events(
            client_id.as_deref(),
            *message_id,
            *from,
            *to,
            *limit,
        )),
        Query::Report { from, to } => to_value(broker.usage().meter().report(*from, *to)),
        Query::Alarms => to_value(broker.usage().alarms().records(now_ms())),
        Query::AckAlarm { id } => to_value(broker.usage().alarms().acknowledge(id)),
    };
    value.unwrap_or(serde_json::Value::Null)
}

/// A peer's question as it arrives on a cluster link, answered as JSON.
pub fn answer_json(broker: &Broker, body: &str) -> String {
    let value = match serde_json::from_str::<Query>(body) {
        Ok(q) => answer(broker, &q),
        Err(e) => {
            tracing::warn!(error = %e, "malformed operations query from a peer");
            serde_json::Value::Null
        }
    };
    value.to_string()
}

/// How long a node waits for each peer's answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// Every node's answers, this node's first, and the nodes that did not answer.
pub struct Answers {
    pub answers: Vec<(String, serde_json::Value)>,
    pub missing: Vec<String>,
}

impl Answers {
    /// The answers decoded as `T`; an answer that does not decode counts as
    /// missing (a node of another version).
    pub fn decode<T: serde::de::DeserializeOwned>(&mut self) -> Vec<(String, T)> {
        let mut out = Vec::new();
        for (node, v) in std::mem::take(&mut self.answers) {
            match serde_json::from_value(v) {
                Ok(t) => out.push((node, t)),
                Err(_) => self.missing.push(node),
            }
        }
        out
    }
}

/// Asks every ring member (this node included) and collects the answers.
pub async fn ask_all(broker: &Arc<Broker>, q: &Query) -> Answers {
    let mut answers = vec![(broker.node().to_string(), answer(broker, q))];
    let mut missing = Vec::new();
    if let Some(c) = broker.peers() {
        let body = serde_json::to_string(q).unwrap_or_default();
        let members = c.members();
        let asks = members.iter().map(|m| c.ask(m, body.clone(), ASK_TIMEOUT));
        for (m, reply) in members.iter().zip(ntex::util::join_all(asks).await) {
            match reply.and_then(|r| serde_json::from_str(&r).ok()) {
                Some(v) => answers.push((m.to_string(), v)),
                None => missing.push(m.to_string()),
            }
        }
    }
    Answers { answers, missing }
}

/// The instance's current values for the alarms, from this node's counts
/// and the load reports of the others.
fn instance_values(broker: &Broker) -> Vec<(Metric, u64)> {
    let peers = broker.usage().capacity().peer_loads();
    let sum = |f: fn(&Load) -> u64| peers.iter().map(|(_, l)| f(l)).sum::<u64>();
    let (pub_tps, sub_tps) = broker.usage().meter().tps();
    let tps = (pub_tps + sub_tps).round() as u64 + sum(|l| l.pub_tps + l.sub_tps);
    vec![
        (
            Metric::Connections,
            gauge(broker.metrics().connections.get()) + sum(|l| l.connections),
        ),
        (
            Metric::Subscriptions,
            gauge(broker.metrics().subscriptions.get()) + sum(|l| l.subscriptions),
        ),
        (Metric::Topics, broker.router().distinct_filters() as u64),
        (Metric::Tps, tps),
        (
            Metric::UnderReplicatedSessions,
            gauge(broker.metrics().sessions_under_replicated.get()) + sum(|l| l.under_replicated),
        ),
    ]
}

fn log_change(change: &Change) {
    match change {
        Change::Fired(r) => tracing::warn!(
            alarm = %r.id, metric = r.metric.label(), value = r.value, threshold = r.threshold,
            "alarm firing"
        ),
        Change::Resolved(r) => tracing::info!(
            alarm = %r.id, metric = r.metric.label(), value = r.value, threshold = r.threshold,
            duration_secs = r.duration_secs, "alarm resolved"
        ),
    }
}

/// Runs the node's periodic accounting until the node stops: the TPS
/// bucket ten times a second; rates, load reports and alarms every second;
/// Group ID samples every minute.
pub async fn tick(broker: Arc<Broker>, shutdown: crate::shutdown::Shutdown) {
    let _guard = shutdown.guard();
    let mut n: u64 = 0;
    let mut evaluating = false;
    let mut exported = Exported::default();
    while shutdown.sleep(REFILL).await {
        n += 1;
        let members = broker.peers().map(|c| c.members()).unwrap_or_default();
        broker.usage().capacity().refill(members.len() + 1);
        if !n.is_multiple_of(10) {
            continue;
        }
        let now = now_ms();
        let usage = &broker.usage();
        let by_parent = usage.meter().tick(now);
        usage.capacity().retain_peers(&members);
        let (pub_tps, sub_tps) = usage.meter().tps();
        export(&broker, &mut exported, by_parent);
        if let Some(c) = broker.peers() {
            c.broadcast(PeerMsg::Load {
                connections: gauge(broker.metrics().connections.get()),
                subscriptions: gauge(broker.metrics().subscriptions.get()),
                pub_tps: pub_tps.round() as u64,
                sub_tps: sub_tps.round() as u64,
                under_replicated: gauge(broker.metrics().sessions_under_replicated.get()),
            });
        }
        let values = instance_values(&broker);
        if let Some((_, tps)) = values.iter().find(|(m, _)| *m == Metric::Tps) {
            usage.capacity().note_tps(*tps);
        }
        let changes = if is_evaluator(&broker) {
            evaluating = true;
            usage.alarms().evaluate(now, &values)
        } else if evaluating {
            evaluating = false;
            usage.alarms().stand_down(now)
        } else {
            Vec::new()
        };
        changes.iter().for_each(log_change);
        if n.is_multiple_of(broker.config().trace.group_sample_secs * 10) {
            usage.meter().record_groups(now, groups_now(&broker));
        }
    }
}

/// What `export` carried over from the previous second.
#[derive(Default)]
struct Exported {
    weighted: (u64, u64),
    /// Parent topics with their own `topic_messages_total` label.
    parents: std::collections::HashSet<String>,
}

/// Parent topics labelled by name in `topic_messages_total`, at most; the
/// declared Kafka parent topics always are.
const LABELLED_PARENTS: usize = 100;

/// Once a second: the meter's numbers into the Prometheus metrics (O9).
fn export(broker: &Broker, last: &mut Exported, by_parent: HashMap<String, crate::meter::Counts>) {
    let m = &broker.metrics();
    let meter = &broker.usage().meter();
    let (pub_tps, sub_tps) = meter.tps();
    m.tps.with_label_values(&["pub"]).set(pub_tps);
    m.tps.with_label_values(&["sub"]).set(sub_tps);
    let (w_in, w_out) = meter.weighted_totals();
    m.messages_weighted
        .with_label_values(&["pub"])
        .inc_by(w_in - last.weighted.0);
    m.messages_weighted
        .with_label_values(&["sub"])
        .inc_by(w_out - last.weighted.1);
    last.weighted = (w_in, w_out);
    m.connections_peak
        .set(i64::try_from(meter.peak_connections()).unwrap_or(i64::MAX));
    m.topics
        .set(i64::try_from(broker.router().distinct_filters()).unwrap_or(i64::MAX));
    let declared = |p: &str| {
        broker
            .config()
            .kafka
            .as_ref()
            .is_some_and(|k| k.parent_topics.iter().any(|t| t.name == p))
    };
    for (parent, counts) in by_parent {
        let labelled = last.parents.contains(&parent)
            || declared(&parent)
            || (last.parents.len() < LABELLED_PARENTS && last.parents.insert(parent.clone()));
        let label = if labelled { parent.as_str() } else { "_other" };
        for (q, qos) in ["0", "1", "2"].iter().enumerate() {
            for (direction, n) in [
                ("produced", counts.produced[q]),
                ("consumed", counts.consumed[q]),
            ] {
                if n > 0 {
                    m.topic_messages
                        .with_label_values(&[label, direction, qos])
                        .inc_by(n);
                }
            }
        }
    }
}

/// Alarm records of every node, newest first.
pub fn merge_alarms(mut all: Vec<AlarmRecord>) -> Vec<AlarmRecord> {
    all.sort_by(|a, b| b.start.cmp(&a.start).then_with(|| a.id.cmp(&b.id)));
    all
}

/// Report answers summed.
pub fn merge_reports(reports: impl IntoIterator<Item = Report>) -> Report {
    let mut total = Report::default();
    for r in reports {
        total.pub_weighted += r.pub_weighted;
        total.sub_weighted += r.sub_weighted;
        for (k, c) in r.topics {
            let t = total.topics.entry(k).or_default();
            for q in 0..3 {
                t.produced[q] += c.produced[q];
                t.consumed[q] += c.consumed[q];
            }
        }
    }
    total
}
