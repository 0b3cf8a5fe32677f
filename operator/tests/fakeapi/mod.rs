//! A fake Kubernetes API server for the tests (the tower-test pattern of
//! kube-rs/controller-rs): a task answers a `tower_test::mock` service,
//! keeping the objects it is sent, for the calls the operator makes.
// Each test crate that includes this module uses a part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

/// One request the fake API server received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub body: Value,
}

/// The fake API server's state: objects by path, and every request.
#[derive(Default)]
pub struct ApiState {
    pub objects: BTreeMap<String, Value>,
    pub seen: Vec<Seen>,
    /// The last resourceVersion handed out.
    pub version: u64,
}

pub type Shared = Arc<Mutex<ApiState>>;

fn conflict(message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": message})
}

/// A new resourceVersion on a written object.
fn stamp(st: &mut ApiState, body: &mut Value) {
    st.version += 1;
    if body.get("metadata").is_some_and(Value::is_object) {
        body["metadata"]["resourceVersion"] = json!(st.version.to_string());
    }
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

/// Sets `pointer` (JSON pointer, `-` appends) in `doc`.
fn set_pointer(doc: &mut Value, pointer: &str, value: Value) {
    let mut parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    let last = parts.pop().unwrap_or_default();
    let mut cur = doc;
    for p in parts {
        if cur.get(p).is_none_or(Value::is_null) {
            cur[p] = json!({});
        }
        cur = &mut cur[p];
    }
    if last == "-" {
        if let Some(a) = cur.as_array_mut() {
            a.push(value);
        }
    } else {
        cur[last] = value;
    }
}

/// Removes what `pointer` names (an object key or an array index).
fn remove_pointer(doc: &mut Value, pointer: &str) {
    let mut parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    let last = parts.pop().unwrap_or_default();
    let mut cur = doc;
    for p in parts {
        cur = &mut cur[p];
    }
    if let Some(a) = cur.as_array_mut() {
        if let Ok(i) = last.parse::<usize>()
            && i < a.len()
        {
            a.remove(i);
        }
    } else if let Some(o) = cur.as_object_mut() {
        o.remove(last);
    }
}

pub fn merge(into: &mut Value, patch: &Value) {
    match (into.as_object_mut(), patch.as_object()) {
        (Some(a), Some(b)) => {
            for (k, v) in b {
                if v.is_object() && a.get(k).is_some_and(Value::is_object) {
                    if let Some(slot) = a.get_mut(k) {
                        merge(slot, v);
                    }
                } else {
                    a.insert(k.clone(), v.clone());
                }
            }
        }
        _ => *into = patch.clone(),
    }
}

/// Answers one request like the API server would, for the calls the
/// reconciler makes.
fn answer(
    state: &Shared,
    method: &str,
    path: &str,
    content_type: &str,
    body: Value,
) -> (StatusCode, Value) {
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    st.seen.push(Seen {
        method: method.to_owned(),
        path: path.to_owned(),
        body: body.clone(),
    });
    let (key, status_sub) = match path.strip_suffix("/status") {
        Some(k) => (k.to_owned(), true),
        None => (path.to_owned(), false),
    };
    match method {
        "GET" => match st.objects.get(&key) {
            Some(o) => (StatusCode::OK, o.clone()),
            None if key.ends_with("/pods") => {
                let prefix = format!("{key}/");
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix))
                    .map(|(_, v)| v.clone())
                    .collect();
                (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}),
                )
            }
            None => (StatusCode::NOT_FOUND, not_found()),
        },
        "DELETE" => match st.objects.remove(&key) {
            Some(o) => (StatusCode::OK, o),
            None => (StatusCode::NOT_FOUND, not_found()),
        },
        "POST" => {
            let seq = st.seen.len();
            let name = body["metadata"]["name"]
                .as_str()
                .map_or_else(|| format!("generated-{seq}"), str::to_owned);
            let key = format!("{path}/{name}");
            if st.objects.contains_key(&key) {
                return (StatusCode::CONFLICT, conflict("already exists"));
            }
            let mut body = body;
            stamp(&mut st, &mut body);
            st.objects.insert(key, body.clone());
            (StatusCode::CREATED, body)
        }
        // Replace: only over the version the writer read, as the API
        // server's optimistic concurrency does.
        "PUT" => {
            let Some(existing) = st.objects.get(&key) else {
                return (StatusCode::NOT_FOUND, not_found());
            };
            if existing["metadata"]["resourceVersion"] != body["metadata"]["resourceVersion"] {
                return (
                    StatusCode::CONFLICT,
                    conflict("the object has been modified"),
                );
            }
            let mut body = body;
            stamp(&mut st, &mut body);
            st.objects.insert(key, body.clone());
            (StatusCode::OK, body)
        }
        "PATCH" => {
            let existing = st.objects.get(&key).cloned();
            let updated = if content_type.contains("json-patch") {
                let mut doc = existing.unwrap_or_else(|| json!({}));
                for op in body.as_array().into_iter().flatten() {
                    let p = op["path"].as_str().unwrap_or_default();
                    match op["op"].as_str() {
                        Some("add" | "replace") => set_pointer(&mut doc, p, op["value"].clone()),
                        Some("remove") => remove_pointer(&mut doc, p),
                        _ => {}
                    }
                }
                doc
            } else if status_sub {
                let mut doc = existing.unwrap_or_else(|| json!({}));
                doc["status"] = body["status"].clone();
                doc
            } else if content_type.contains("apply-patch") {
                // A StatefulSet's claim templates cannot change once it
                // exists: the API server refuses the whole update.
                if key.contains("/statefulsets/")
                    && let Some(e) = &existing
                    && e["spec"]["volumeClaimTemplates"] != body["spec"]["volumeClaimTemplates"]
                {
                    return (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422,
                               "message": "StatefulSet.apps is invalid: spec: Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden"}),
                    );
                }
                // Server-side apply as the single manager: the applied
                // object replaces what it names, status kept.
                let mut doc = body.clone();
                if let Some(s) = existing.as_ref().and_then(|e| e.get("status")) {
                    doc["status"] = s.clone();
                }
                doc
            } else {
                let mut doc = existing.unwrap_or_else(|| json!({}));
                merge(&mut doc, &body);
                doc
            };
            st.objects.insert(key, updated.clone());
            (StatusCode::OK, updated)
        }
        _ => (StatusCode::METHOD_NOT_ALLOWED, not_found()),
    }
}

/// Starts the fake API server; returns the client wired to it.
pub fn fake_api(state: Shared) -> kube::Client {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let path = req.uri().path().to_owned();
            let ct = req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes)
                .or_else(|_| serde_yaml::from_slice(&bytes))
                .unwrap_or(Value::Null);
            let (status, answer) = answer(&state, &method, &path, &ct, body);
            let response = Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&answer).unwrap_or_default()))
                .unwrap_or_else(|e| panic!("{e}"));
            send.send_response(response);
        }
    });
    kube::Client::new(svc, "mqtt")
}
