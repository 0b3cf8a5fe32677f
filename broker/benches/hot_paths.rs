//! Micro-benchmarks of the per-message internals: topic matching, routing
//! fan-out through the sharded trie, and a session's queue.
//!
//! `cargo +nightly bench -p ringmq-broker --bench hot_paths`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use ringmq_broker::message::{Message, MessageId, QoS};
use ringmq_broker::router::{Router, Scope, SubOptions};
use ringmq_broker::session::{Delivery, QueueLimits, SessionStore};
use ringmq_broker::topic;

fn opts() -> SubOptions {
    SubOptions {
        qos: QoS::AtLeastOnce,
        no_local: false,
        retain_as_published: false,
        id: None,
    }
}

fn subscribe(r: &Router, client: &str, filter: &str) {
    if let Ok(f) = topic::parse_filter(filter, 256, false) {
        r.subscribe(&Arc::from(client), &f, opts());
    }
}

fn matching(c: &mut Criterion) {
    c.bench_function("topic::matches wildcard filter", |b| {
        b.iter(|| {
            topic::matches(
                black_box("fleet/+/sensors/#"),
                black_box("fleet/d42/sensors/temp/1"),
            )
        })
    });
}

fn routing(c: &mut Criterion) {
    // 100 000 one-device subscriptions, as many devices would hold, plus a
    // few wildcard subscriptions a backend would hold.
    let r = Router::default();
    for i in 0..100_000 {
        subscribe(&r, &format!("dev{i}"), &format!("fleet/d{i}/cmd"));
    }
    subscribe(&r, "backend", "fleet/+/cmd");
    subscribe(&r, "audit", "#");
    let mut out = Vec::new();
    c.bench_function("router::route among 100k subscriptions (3 matches)", |b| {
        b.iter(|| {
            out.clear();
            r.route(black_box("fleet/d777/cmd"), &|_| true, Scope::All, &mut out);
            black_box(out.len())
        })
    });

    // Fan-out: one topic, 1 000 subscribers.
    let fan = Router::default();
    for i in 0..1_000 {
        subscribe(&fan, &format!("s{i}"), "news/all");
    }
    c.bench_function("router::route fan-out to 1000 subscribers", |b| {
        b.iter(|| {
            out.clear();
            fan.route(black_box("news/all"), &|_| true, Scope::All, &mut out);
            black_box(out.len())
        })
    });
}

fn queue(c: &mut Criterion) {
    let store = SessionStore::default();
    let attached = store.attach("bench", false, Duration::from_secs(60));
    let session = attached.session;
    let msg = Arc::new(Message::new(
        MessageId(1),
        "t/1".into(),
        vec![0u8; 64].into(),
        QoS::AtLeastOnce,
        false,
        Arc::from("p"),
    ));
    let limits = QueueLimits {
        online: 1_000_000,
        overflow: 0,
        offline: 10,
    };
    c.bench_function("session enqueue + dequeue (shared payload)", |b| {
        b.iter(|| {
            let d = Delivery::new(msg.clone(), QoS::AtLeastOnce);
            black_box(session.enqueue(d, limits, None));
            black_box(session.lock().queue.pop_front())
        })
    });
}

criterion_group!(benches, matching, routing, queue);
criterion_main!(benches);
