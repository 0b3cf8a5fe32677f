//! `/api/v1/…` on the admin port: parameters checked, every node asked,
//! answers merged, JSON out. `openapi.json` next to this file describes it.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use ntex::http::{Method, Response, StatusCode, header};
use ringmq_api as api;
use serde::Deserialize;

use super::{ClientDetail, Groups, NodeInfo, Query, ask_all};
use crate::alarm::{AlarmRecord, AlarmState, Metric};
use crate::broker::Broker;
use crate::kafka::Kafka;
use crate::message::{MessageId, QoS, now_ms};
use crate::meter::{Counts, GroupSample, Report};
use crate::trace::{DeviceEvent, MessageEvent};

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;
/// Most events one trace answer carries.
const MAX_EVENTS: usize = 10_000;
/// Most Client IDs in one batch online query.
const MAX_BATCH: usize = 1_000;

/// A refusal with its status and message (and, for 405, the methods the
/// path allows).
struct Refusal(StatusCode, String);

/// The method a known path allows (every path allows exactly one).
fn allowed(segs: &[&str]) -> Option<&'static str> {
    match segs {
        ["instance"]
        | ["clients", _]
        | ["online", "topic" | "groups"]
        | ["trace", "device" | "message"]
        | ["report"]
        | ["topics", _]
        | ["alarms"] => Some("GET"),
        ["clients", _, "kick" | "unsubscribe"]
        | ["online", "clients"]
        | ["alarms", _, "ack"]
        | ["messages"] => Some("POST"),
        _ => None,
    }
}

/// An answer ready to be written: the API type's JSON.
type Answer = Result<String, Refusal>;

fn bad(msg: impl Into<String>) -> Refusal {
    Refusal(StatusCode::BAD_REQUEST, msg.into())
}

fn not_found(msg: impl Into<String>) -> Refusal {
    Refusal(StatusCode::NOT_FOUND, msg.into())
}

fn json_response(status: StatusCode, body: String) -> Response {
    Response::builder(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
}

/// Serves one `/api/v1/…` request; `body` is the request body already read.
pub async fn handle(
    broker: &Arc<Broker>,
    kafka: Option<&Kafka>,
    method: &Method,
    path: &str,
    query: &str,
    body: &[u8],
) -> Response {
    let rest = path.trim_start_matches("/api/v1").trim_start_matches('/');
    if rest == "openapi.json" && method == Method::GET {
        return Response::Ok()
            .header(header::CONTENT_TYPE, "application/json")
            .body(OPENAPI);
    }
    let segments: Vec<String> = rest
        .split('/')
        .map(|s| crate::token_api::percent_decode(s.as_bytes(), false))
        .collect();
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let result = match params(query) {
        Ok(params) => route(broker, kafka, method, &segs, &params, body).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(Refusal(status, msg)) => {
            if status.is_client_error() {
                broker.metrics().reject("api_bad_request");
            }
            let body = serde_json::to_string(&api::ApiError { error: msg }).unwrap_or_default();
            let mut response = json_response(status, body);
            if status == StatusCode::METHOD_NOT_ALLOWED
                && let Some(allow) = allowed(&segs)
            {
                response
                    .headers_mut()
                    .insert(header::ALLOW, header::HeaderValue::from_static(allow));
            }
            response
        }
    }
}

/// The query parameters; a parameter given twice is refused rather than
/// guessed at.
fn params(query: &str) -> Result<HashMap<String, String>, Refusal> {
    let mut params = HashMap::new();
    for (k, v) in crate::token_api::parse_form(query.as_bytes()) {
        if params.contains_key(&k) {
            return Err(bad(format!("parameter {k} is given more than once")));
        }
        params.insert(k, v);
    }
    Ok(params)
}

async fn route(
    broker: &Arc<Broker>,
    kafka: Option<&Kafka>,
    method: &Method,
    segs: &[&str],
    params: &HashMap<String, String>,
    body: &[u8],
) -> Answer {
    let get = method == Method::GET;
    let post = method == Method::POST;
    match segs {
        ["instance"] if get => instance(broker).await,
        ["clients", id] if get => client(broker, id).await,
        ["clients", id, "kick"] if post => kick(broker, id).await,
        ["clients", id, "unsubscribe"] if post => unsubscribe(broker, id, body).await,
        ["online", "clients"] if post => online(broker, body).await,
        ["online", "topic"] if get => topic_online(broker, params).await,
        ["online", "groups"] if get => groups(broker, params).await,
        ["trace", "device"] if get => device_trace(broker, params).await,
        ["trace", "message"] if get => message_trace(broker, params).await,
        ["report"] if get => report(broker, params).await,
        ["alarms"] if get => alarms(broker).await,
        ["alarms", id, "ack"] if post => ack(broker, id).await,
        ["messages"] if post => send_message(broker, body),
        ["topics", parent] if get => topic_state(kafka, parent, params).await,
        _ => match allowed(segs) {
            Some(allow) => Err(Refusal(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {method} not allowed here: use {allow}"),
            )),
            None => Err(not_found("no such endpoint: see /api/v1/openapi.json")),
        },
    }
}

fn param_u64(params: &HashMap<String, String>, name: &str) -> Result<Option<u64>, Refusal> {
    let Some(v) = params.get(name) else {
        return Ok(None);
    };
    // JSON clients hold these in signed 64-bit integers.
    v.parse::<i64>()
        .ok()
        .and_then(|n| u64::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| {
            bad(format!(
                "{name} must be a whole number from 0 to 2^63-1 (milliseconds since the Unix epoch for times)"
            ))
        })
}

/// `from`/`to` (ms since the epoch), defaulting to the last `default` ms,
/// at most `max` ms apart.
fn range(params: &HashMap<String, String>, default: u64, max: u64) -> Result<(u64, u64), Refusal> {
    let to = param_u64(params, "to")?.unwrap_or_else(now_ms);
    let from = param_u64(params, "from")?.unwrap_or(to.saturating_sub(default));
    if from > to {
        return Err(bad("from must not be after to"));
    }
    if to - from > max {
        return Err(bad(format!(
            "the range may span at most {} hours",
            max / HOUR_MS
        )));
    }
    Ok((from, to))
}

fn limit(params: &HashMap<String, String>) -> Result<usize, Refusal> {
    match param_u64(params, "limit")? {
        None => Ok(1000),
        Some(n) if n == 0 || n > MAX_EVENTS as u64 => {
            Err(bad(format!("limit must be between 1 and {MAX_EVENTS}")))
        }
        Some(n) => Ok(usize::try_from(n).unwrap_or(MAX_EVENTS)),
    }
}

fn required<'a>(params: &'a HashMap<String, String>, name: &str) -> Result<&'a str, Refusal> {
    params
        .get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| bad(format!("parameter {name} is required")))
}

/// The name a value of one of the broker's fixed sets (an action, a state)
/// has in JSON: its serde name, so that there is one spelling of it.
fn name<T: serde::Serialize>(t: &T) -> String {
    match serde_json::to_value(t) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// The JSON of an answer of the API (`ringmq_api`).
fn answer<T: serde::Serialize>(t: &T) -> Answer {
    serde_json::to_string(t).map_err(|e| Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

fn percent(value: f64, capacity: u64) -> Option<f64> {
    (capacity > 0).then(|| (value * 1000.0 / capacity as f64).round() / 10.0)
}

async fn instance(broker: &Arc<Broker>) -> Answer {
    let mut answers = ask_all(broker, &Query::Node).await;
    let mut nodes: Vec<NodeInfo> = answers.decode().into_iter().map(|(_, n)| n).collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut alarms = ask_all(broker, &Query::Alarms).await;
    let active = alarms
        .decode::<Vec<AlarmRecord>>()
        .into_iter()
        .flat_map(|(_, a)| a)
        .filter(|a| a.state != AlarmState::Resolved)
        .count();
    let connections: u64 = nodes.iter().map(|n| n.connections).sum();
    let subscriptions: u64 = nodes.iter().map(|n| n.subscriptions).sum();
    let topics = nodes.iter().map(|n| n.topics).max().unwrap_or(0);
    let pub_tps: f64 = nodes.iter().map(|n| n.pub_tps).sum();
    let sub_tps: f64 = nodes.iter().map(|n| n.sub_tps).sum();
    let cap = broker.usage().capacity().config();
    let mut endpoints = broker.config().instance.endpoints.clone();
    if let Some(k) = &broker.config().kafka {
        endpoints.insert("kafka".into(), k.bootstrap_servers.clone());
    }
    let alarm_thresholds = Metric::ALL
        .iter()
        .map(|m| (m.label().to_owned(), broker.usage().alarms().threshold(*m)))
        .collect();
    answer(&api::Instance {
        name: broker.config().instance.name.clone(),
        capacity: api::Capacity {
            connections: cap.connections,
            tps: cap.tps,
            subscriptions: cap.subscriptions,
            topics: cap.topics,
            mode: name(&cap.mode),
        },
        endpoints,
        totals: api::Totals {
            connections,
            subscriptions,
            topics,
            pub_tps,
            sub_tps,
            tps: pub_tps + sub_tps,
        },
        utilization: api::Utilization {
            connections: percent(connections as f64, cap.connections),
            subscriptions: percent(subscriptions as f64, cap.subscriptions),
            topics: percent(topics as f64, cap.topics),
            tps: percent(pub_tps + sub_tps, cap.tps),
        },
        alarm_thresholds,
        active_alarms: active,
        under_replicated_sessions: nodes.iter().map(|n| n.under_replicated_sessions).sum(),
        nodes,
        missing_nodes: answers.missing,
    })
}

/// The session of a client: the online one if any node has it online.
async fn find_client(
    broker: &Arc<Broker>,
    id: &str,
) -> Result<(ClientDetail, Vec<String>), Refusal> {
    let mut answers = ask_all(
        broker,
        &Query::Client {
            client_id: id.to_owned(),
        },
    )
    .await;
    let found: Vec<ClientDetail> = answers
        .decode::<Option<ClientDetail>>()
        .into_iter()
        .filter_map(|(_, c)| c)
        .collect();
    let best = found
        .iter()
        .find(|c| c.online)
        .or_else(|| found.iter().max_by_key(|c| c.connected_at))
        .cloned();
    match best {
        Some(c) => Ok((c, answers.missing)),
        None => Err(not_found(format!("no session for Client ID {id}"))),
    }
}

async fn client(broker: &Arc<Broker>, id: &str) -> Answer {
    let (detail, missing_nodes) = find_client(broker, id).await?;
    answer(&api::Client {
        detail,
        missing_nodes,
    })
}

async fn kick(broker: &Arc<Broker>, id: &str) -> Answer {
    let mut answers = ask_all(
        broker,
        &Query::Kick {
            client_id: id.to_owned(),
        },
    )
    .await;
    if answers.decode::<bool>().into_iter().any(|(_, k)| k) {
        answer(&api::Kicked {
            client_id: id.to_owned(),
            kicked: true,
        })
    } else {
        Err(not_found(format!("Client ID {id} is not online")))
    }
}

fn parse_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| bad(format!("malformed JSON body: {e}")))
}

async fn unsubscribe(broker: &Arc<Broker>, id: &str, body: &[u8]) -> Answer {
    let api::UnsubscribeRequest { filter } = parse_body(body)?;
    let mut answers = ask_all(
        broker,
        &Query::Unsubscribe {
            client_id: id.to_owned(),
            filter: filter.clone(),
        },
    )
    .await;
    let results: Vec<Option<bool>> = answers.decode().into_iter().map(|(_, r)| r).collect();
    if results.contains(&Some(true)) {
        answer(&api::Unsubscribed {
            client_id: id.to_owned(),
            filter,
            unsubscribed: true,
        })
    } else if results.iter().any(Option::is_some) {
        Err(not_found(format!(
            "Client ID {id} has no subscription {filter}"
        )))
    } else {
        Err(not_found(format!("no session for Client ID {id}")))
    }
}

async fn online(broker: &Arc<Broker>, body: &[u8]) -> Answer {
    let api::OnlineRequest { client_ids } = parse_body(body)?;
    if client_ids.len() > MAX_BATCH {
        return Err(bad(format!("at most {MAX_BATCH} Client IDs per query")));
    }
    let mut answers = ask_all(
        broker,
        &Query::Online {
            client_ids: client_ids.clone(),
        },
    )
    .await;
    let online: std::collections::HashSet<String> = answers
        .decode::<Vec<String>>()
        .into_iter()
        .flat_map(|(_, ids)| ids)
        .collect();
    let online = client_ids
        .into_iter()
        .map(|id| {
            let on = online.contains(&id);
            (id, on)
        })
        .collect();
    answer(&api::Online {
        online,
        missing_nodes: answers.missing,
    })
}

async fn topic_online(broker: &Arc<Broker>, params: &HashMap<String, String>) -> Answer {
    let topic = required(params, "topic")?;
    crate::topic::validate_name(topic, usize::from(u16::MAX), false)
        .map_err(|e| bad(format!("topic: {e}")))?;
    let mut answers = ask_all(
        broker,
        &Query::TopicOnline {
            topic: topic.to_owned(),
        },
    )
    .await;
    let online: u64 = answers.decode::<u64>().into_iter().map(|(_, n)| n).sum();
    answer(&api::TopicOnline {
        topic: topic.to_owned(),
        online,
        missing_nodes: answers.missing,
    })
}

async fn groups(broker: &Arc<Broker>, params: &HashMap<String, String>) -> Answer {
    let (from, to) = range(params, 2 * HOUR_MS, 2 * DAY_MS)?;
    let group = params.get("groupId").filter(|g| !g.is_empty());
    let mut answers = ask_all(broker, &Query::Groups { from, to }).await;
    let step = broker.config().trace.group_sample_secs * 1000;
    let mut now: HashMap<String, u64> = HashMap::new();
    let mut buckets: std::collections::BTreeMap<u64, HashMap<String, u64>> = Default::default();
    for (_, g) in answers.decode::<Groups>() {
        for (k, v) in g.now {
            *now.entry(k).or_default() += v;
        }
        for GroupSample { ts, groups } in g.history {
            let b = buckets.entry(ts - ts % step).or_default();
            for (k, v) in groups {
                *b.entry(k).or_default() += v;
            }
        }
    }
    let keep = |m: HashMap<String, u64>| -> HashMap<String, u64> {
        match group {
            Some(g) => m.into_iter().filter(|(k, _)| k == g).collect(),
            None => m,
        }
    };
    let history = buckets
        .into_iter()
        .map(|(ts, m)| api::GroupSample {
            ts,
            groups: keep(m),
        })
        .collect();
    answer(&api::Groups {
        now: keep(now),
        from,
        to,
        history,
        missing_nodes: answers.missing,
    })
}

/// Trace events of every node in time order, at most `limit`, each with
/// the node that recorded it.
fn merge_events<T: serde::de::DeserializeOwned, A>(
    answers: &mut super::Answers,
    limit: usize,
    ts: impl Fn(&T) -> u64,
    with_node: impl Fn(T, String) -> A,
) -> Vec<A> {
    let mut all: Vec<(String, T)> = Vec::new();
    for (node, events) in answers.decode::<Vec<T>>() {
        all.extend(events.into_iter().map(|e| (node.clone(), e)));
    }
    all.sort_by_key(|(_, e)| ts(e));
    all.truncate(limit);
    all.into_iter()
        .map(|(node, e)| with_node(e, node))
        .collect()
}

async fn device_trace(broker: &Arc<Broker>, params: &HashMap<String, String>) -> Answer {
    let client_id = required(params, "clientId")?.to_owned();
    let (from, to) = range(params, HOUR_MS, DAY_MS)?;
    let limit = limit(params)?;
    let mut answers = ask_all(
        broker,
        &Query::DeviceTrace {
            client_id: client_id.clone(),
            from,
            to,
            limit,
        },
    )
    .await;
    let events = merge_events(
        &mut answers,
        limit,
        |e: &DeviceEvent| e.ts,
        |e, node| api::DeviceEvent {
            ts: e.ts,
            client_id: e.client_id.to_string(),
            channel_id: e.channel_id.to_string(),
            action: name(&e.action),
            reason: name(&e.reason),
            detail: e.detail,
            node,
        },
    );
    answer(&api::DeviceTrace {
        client_id,
        from,
        to,
        events,
        missing_nodes: answers.missing,
    })
}

async fn message_trace(broker: &Arc<Broker>, params: &HashMap<String, String>) -> Answer {
    let client_id = params.get("clientId").filter(|c| !c.is_empty()).cloned();
    let message_id = match params.get("messageId") {
        None => None,
        Some(m) => {
            let refuse = || bad("messageId must be the 16 hex digits the broker reports");
            if m.is_empty() || m.len() > 16 || !m.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(refuse());
            }
            Some(m.parse::<MessageId>().map_err(|_| refuse())?.0)
        }
    };
    if client_id.is_none() && message_id.is_none() {
        return Err(bad("give clientId, messageId or both"));
    }
    let (from, to) = range(params, HOUR_MS, DAY_MS)?;
    let limit = limit(params)?;
    let mut answers = ask_all(
        broker,
        &Query::MessageTrace {
            client_id,
            message_id,
            from,
            to,
            limit,
        },
    )
    .await;
    let events = merge_events(
        &mut answers,
        limit,
        |e: &MessageEvent| e.ts,
        |e, node| api::MessageEvent {
            ts: e.ts,
            message_id: e.message_id,
            client_id: e.client_id.to_string(),
            action: name(&e.action),
            topic: e.topic,
            qos: e.qos,
            node,
        },
    );
    answer(&api::MessageTrace {
        from,
        to,
        events,
        missing_nodes: answers.missing,
    })
}

async fn report(broker: &Arc<Broker>, params: &HashMap<String, String>) -> Answer {
    let (from, to) = match params.get("range").map(String::as_str) {
        None => range(params, HOUR_MS, DAY_MS)?,
        Some(_) if params.contains_key("from") || params.contains_key("to") => {
            return Err(bad("give range or from/to, not both"));
        }
        Some(r) => {
            let span = match r {
                "1h" => HOUR_MS,
                "3h" => 3 * HOUR_MS,
                "12h" => 12 * HOUR_MS,
                "1d" => DAY_MS,
                _ => return Err(bad("range must be 1h, 3h, 12h or 1d")),
            };
            let to = now_ms();
            (to - span, to)
        }
    };
    let parent = params.get("parentTopic").filter(|p| !p.is_empty());
    let mut answers = ask_all(broker, &Query::Report { from, to }).await;
    let total: Report = super::merge_reports(answers.decode().into_iter().map(|(_, r)| r));
    let secs = ((to - from) as f64 / 1000.0).max(1.0);
    let mut rows = Vec::new();
    let mut sums = Counts::default();
    let mut keys: Vec<&String> = total.topics.keys().collect();
    keys.sort();
    for key in keys {
        let c = &total.topics[key];
        let (p, sub) = key.split_once('/').unwrap_or((key, ""));
        if parent.is_some_and(|want| want != p) {
            continue;
        }
        for q in 0..3 {
            if c.produced[q] == 0 && c.consumed[q] == 0 {
                continue;
            }
            sums.produced[q] += c.produced[q];
            sums.consumed[q] += c.consumed[q];
            rows.push(api::ReportRow {
                parent_topic: p.to_owned(),
                subtopic: sub.to_owned(),
                qos: q as u8,
                produced: c.produced[q],
                consumed: c.consumed[q],
                produced_tps: c.produced[q] as f64 / secs,
                consumed_tps: c.consumed[q] as f64 / secs,
            });
        }
    }
    let produced: u64 = sums.produced.iter().sum();
    let consumed: u64 = sums.consumed.iter().sum();
    answer(&api::Report {
        from,
        to,
        rows,
        totals: api::ReportTotals {
            produced,
            consumed,
            produced_tps: produced as f64 / secs,
            consumed_tps: consumed as f64 / secs,
            weighted_pub_tps: total.pub_weighted as f64 / secs,
            weighted_sub_tps: total.sub_weighted as f64 / secs,
        },
        missing_nodes: answers.missing,
    })
}

async fn alarms(broker: &Arc<Broker>) -> Answer {
    let mut answers = ask_all(broker, &Query::Alarms).await;
    let all: Vec<AlarmRecord> = answers
        .decode::<Vec<AlarmRecord>>()
        .into_iter()
        .flat_map(|(_, a)| a)
        .collect();
    let alarms = super::merge_alarms(all)
        .into_iter()
        .map(|a| api::Alarm {
            id: a.id,
            metric: a.metric.label().to_owned(),
            value: a.value,
            peak: a.peak,
            threshold: a.threshold,
            state: name(&a.state),
            acknowledged: a.acknowledged,
            start: a.start,
            end: a.end,
            duration_secs: a.duration_secs,
            node: a.node,
        })
        .collect();
    answer(&api::Alarms {
        alarms,
        missing_nodes: answers.missing,
    })
}

async fn ack(broker: &Arc<Broker>, id: &str) -> Answer {
    let mut answers = ask_all(broker, &Query::AckAlarm { id: id.to_owned() }).await;
    if answers.decode::<bool>().into_iter().any(|(_, a)| a) {
        answer(&api::Acknowledged {
            id: id.to_owned(),
            acknowledged: true,
        })
    } else {
        Err(not_found(format!("no alarm {id}")))
    }
}

/// How long the topic state may take; Kafka answers within it or the call
/// fails with 503.
const KAFKA_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// O7: a parent topic as Kafka holds it. Every node binds the same Kafka, so
/// the node asked answers alone.
async fn topic_state(
    kafka: Option<&Kafka>,
    parent: &str,
    params: &HashMap<String, String>,
) -> Answer {
    let Some(kafka) = kafka else {
        return Err(not_found("this instance has no Kafka cluster"));
    };
    if !crate::config::is_kafka_topic_name(parent) {
        return Err(bad("not a Kafka topic name"));
    }
    let group = match params.get("group") {
        Some(g) if g.is_empty() => return Err(bad("group must not be empty")),
        g => g.map(String::as_str),
    };
    match kafka.topic_state(parent, group, KAFKA_TIMEOUT).await {
        Ok(state) => answer(&state),
        Err(crate::kafka::inspect::InspectError::NoTopic(t)) => {
            Err(not_found(format!("no topic {t} in Kafka")))
        }
        Err(e) => Err(Refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("Kafka: {e}"),
        )),
    }
}

fn send_message(broker: &Arc<Broker>, body: &[u8]) -> Answer {
    let b: api::SendRequest = parse_body(body)?;
    if !broker.is_restored() {
        // Its retained message or its persistent receivers are not read back yet.
        return Err(Refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "the node's store is not open yet; try again when /readyz answers".into(),
        ));
    }
    broker
        .check_topic(&b.topic)
        .map_err(|e| bad(format!("topic: {e}")))?;
    if crate::sys::is_sys_request(&b.topic) || b.topic.starts_with('$') {
        return Err(bad(
            "topic: system topics cannot be published to from the API",
        ));
    }
    let qos = match b.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => return Err(bad("qos must be 0, 1 or 2")),
    };
    let payload = match b.payload_encoding {
        api::PayloadEncoding::Utf8 => b.payload.into_bytes(),
        api::PayloadEncoding::Base64 => base64::engine::general_purpose::STANDARD
            .decode(b.payload)
            .map_err(|_| bad("payload is not valid base64"))?,
    };
    if payload.len() > broker.config().limits.max_packet_size as usize {
        return Err(bad("payload larger than limits.max_packet_size"));
    }
    let msg = Arc::new(broker.message(
        b.topic.into(),
        payload.into(),
        qos,
        b.retain,
        Arc::from("ringmq-api"),
    ));
    let reached = broker.publish_api(&msg);
    answer(&api::Sent {
        message_id: msg.id.to_string(),
        topic: msg.topic.to_string(),
        reached,
    })
}
