//! Replicated sessions (SPEC D2): a node lost without warning loses no
//! session and no acknowledged message. Real broker processes on loopback,
//! killed with SIGKILL and started again on their data directories.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::v4::persistent;
use common::{Cluster, owned_by, raw, recv, v4 as v3, v5};
use ringmq_broker::ring::Ring;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// D2: the owner of persistent sessions (MQTT 3.1.1 and 5) with queued QoS
/// 1 and QoS 2 messages is killed without warning; the clients come back
/// through another node and find their sessions (subscriptions included)
/// and every message the owner acknowledged, each QoS 2 message once.
#[tokio::test]
async fn a_killed_owners_sessions_are_served_from_their_replicas() {
    let mut c = Cluster::start(3, "");
    let id3 = owned_by("n2", &c.names, "GID_test@@@rep3");
    let id5 = owned_by("n2", &c.names, "GID_test@@@rep5");
    let mut s = persistent(&id3, c.nodes[0].tcp).await;
    s.subscribe("rep/#", v3::QoS::ExactlyOnce).await;
    s.disconnect().await;
    let mut s = v5::connect(v5_persistent(&id5, c.nodes[1].tcp)).await;
    s.subscribe("rep/#", v5::QoS::ExactlyOnce).await;
    s.disconnect().await;
    // Published through another node (as many as an offline queue keeps):
    // each PUBACK comes once the owner and the replica have it.
    let mut p = v3::connect(v3::options("rep-publisher", c.nodes[0].tcp)).await;
    for i in 0..10 {
        let qos = if i % 2 == 0 {
            v3::QoS::AtLeastOnce
        } else {
            v3::QoS::ExactlyOnce
        };
        p.publish("rep/x", qos, false, format!("m{i}")).await;
    }
    p.acked(10).await;
    drop(c.take(2)); // SIGKILL, at once
    c.wait_ring(2);

    let want: BTreeSet<String> = (0..10).map(|i| format!("m{i}")).collect();
    let mut s3 = persistent(&id3, c.nodes[0].tcp).await;
    assert!(s3.connack.session_present, "the 3.1.1 session is lost");
    let mut got = HashMap::<String, usize>::new();
    while got.len() < want.len() {
        let m = s3.next_publish().await;
        *got.entry(String::from_utf8_lossy(&m.payload).into_owned())
            .or_default() += 1;
    }
    s3.no_publish().await;
    assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), want);
    for i in (1..10).step_by(2) {
        assert_eq!(got[&format!("m{i}")], 1, "QoS 2 message m{i} twice");
    }
    let mut s5 = v5::connect(v5_persistent(&id5, c.nodes[1].tcp)).await;
    assert!(s5.connack.session_present, "the MQTT 5 session is lost");
    let mut got = HashMap::<String, usize>::new();
    while got.len() < want.len() {
        let m = s5.next_publish().await;
        *got.entry(String::from_utf8_lossy(&m.payload).into_owned())
            .or_default() += 1;
    }
    s5.no_publish().await;
    assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), want);
    for i in (1..10).step_by(2) {
        assert_eq!(got[&format!("m{i}")], 1, "QoS 2 message m{i} twice");
    }
    // Their subscriptions came with them.
    let p = v3::connect(v3::options("rep-publisher", c.nodes[1].tcp)).await;
    p.publish("rep/after", v3::QoS::AtLeastOnce, false, "after")
        .await;
    assert_eq!(&s3.next_publish().await.payload[..], b"after");
    assert_eq!(&s5.next_publish().await.payload[..], b"after");
    let failed_over: f64 = c
        .nodes
        .iter()
        .map(|n| n.metric("ringmq_sessions_failed_over_total"))
        .sum();
    assert!(failed_over >= 2.0, "{failed_over} sessions failed over");
    // The failover time was measured where they were served (once per
    // node that serves some of the lost owner's sessions); the survivors'
    // replicas confirm every change.
    let measured: Vec<f64> = c
        .nodes
        .iter()
        .map(|n| n.metric("ringmq_failover_seconds_count"))
        .collect();
    let serving = c
        .nodes
        .iter()
        .filter(|n| n.metric("ringmq_sessions_failed_over_total") > 0.0)
        .count();
    assert_eq!(
        measured.iter().filter(|&&m| m == 1.0).count(),
        serving,
        "failover times observed: {measured:?}"
    );
    until("replicas caught up", || {
        c.nodes
            .iter()
            .all(|n| n.metric("ringmq_replication_lag_changes") == 0.0)
    })
    .await;
}

/// A client connected (through another node) to the owner of its
/// persistent session when the owner is SIGKILLed: the replica that serves
/// the session publishes its will, once — also when the owner comes back
/// with its volume, whose copy still says "connected".
#[tokio::test]
async fn the_will_of_a_client_of_a_lost_owner_is_published_once() {
    let mut c = Cluster::start(3, "");
    let id = owned_by("n2", &c.names, "GID_test@@@willed");
    let watcher = owned_by("n0", &c.names, "GID_test@@@watcher");
    let mut w = persistent(&watcher, c.nodes[0].tcp).await;
    w.subscribe("will/#", v3::QoS::AtLeastOnce).await;
    let mut o = v3::options(&id, c.nodes[0].tcp);
    o.set_clean_session(false);
    o.set_last_will(v3::LastWill::new(
        "will/willed",
        "gone",
        v3::QoS::AtLeastOnce,
        false,
    ));
    let client = v3::connect(o).await;
    // The record naming the will reaches the replica without anyone
    // waiting: let it land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.crash_restart(2);
    drop(client);
    c.wait_ring(3);
    assert_eq!(&w.next_publish().await.payload[..], b"gone");
    // The returning owner's copy would publish it after twice the failure
    // timeout (2 s here); the session handed back to it replaced that copy.
    tokio::time::sleep(Duration::from_secs(4)).await;
    w.no_publish().await;
}

/// Clients with clean sessions and wills (MQTT 3.1.1, and MQTT 5 with a
/// will delay, which the clean session's end cuts short) connected to a
/// node SIGKILLed: each will is published once, by the Client ID's new
/// owner from the copy it keeps; with replication factor 3 the other
/// replica keeps a copy too and publishes nothing. A client that left
/// with DISCONNECT has no will published; one whose connection broke
/// before the kill had its will published then, and not again.
#[tokio::test]
async fn the_wills_of_a_lost_nodes_clean_session_clients_are_published_once() {
    let mut c = Cluster::start(3, "  replication_factor: 3\n");
    let id = |name: &str| owned_by("n2", &c.names, &format!("GID_test@@@{name}"));
    let watcher = owned_by("n0", &c.names, "GID_test@@@watcher");
    let mut w = persistent(&watcher, c.nodes[0].tcp).await;
    w.subscribe("will/#", v3::QoS::AtLeastOnce).await;
    let mut v3_clients = Vec::new();
    for name in ["v3", "polite", "broken"] {
        let mut o = v3::options(&id(name), c.nodes[0].tcp);
        o.set_last_will(v3::LastWill::new(
            format!("will/{name}"),
            name,
            v3::QoS::AtLeastOnce,
            false,
        ));
        v3_clients.push(v3::connect(o).await);
    }
    let mut o = v5::options(&id("v5"), c.nodes[1].tcp);
    o.set_last_will(v5::delayed_will("will/v5", "v5", 3600));
    let v5_client = v5::connect(o).await;
    let replicas_keep = |n: f64| {
        let nodes = &c.nodes;
        move || (0..2).all(|i| nodes[i].metric("ringmq_replica_wills") == n)
    };
    until("both replicas keep the four wills", replicas_keep(4.0)).await;
    let (Some(broken), Some(polite)) = (v3_clients.pop(), v3_clients.pop()) else {
        panic!("three clients");
    };
    polite.disconnect().await;
    broken.kill();
    assert_eq!(&w.next_publish().await.payload[..], b"broken");
    until(
        "the replicas forget the wills of the connections that ended",
        replicas_keep(2.0),
    )
    .await;
    drop(c.take(2));
    c.wait_ring(2);
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(String::from_utf8_lossy(&w.next_publish().await.payload).into_owned());
    }
    got.sort();
    assert_eq!(got, ["v3", "v5"]);
    // The other replica has found the owner lost too by now (both watch
    // the same heartbeats); what it would publish would have arrived.
    tokio::time::sleep(Duration::from_secs(2)).await;
    w.no_publish().await;
    let published: f64 = c
        .nodes
        .iter()
        .map(|n| n.metric("ringmq_wills_failed_over_total"))
        .sum();
    assert_eq!(published, 2.0, "each will published by one node");
    drop((v3_clients, v5_client));
}

/// A clean-session client with a will, whose connection a join moves to
/// the new node (told to reconnect: no will), leaves no copy of its will
/// on any node, also none on a replica the new ring no longer uses: its
/// former node SIGKILLed later, no will is published.
#[tokio::test]
async fn a_clean_client_moved_by_a_join_leaves_no_will_behind() {
    let mut c = Cluster::start(3, "  replication_factor: 3\n");
    let three = c.names.clone();
    let four: Vec<String> = three.iter().cloned().chain(["n3".to_owned()]).collect();
    let (r3, r4) = (Ring::new(&three), Ring::new(&four));
    let owned = |prefix: &str, before: &str, after: &str| {
        (0..)
            .map(|i| format!("GID_test@@@{prefix}-{i}"))
            .find(|id| {
                r3.owner(id).is_some_and(|o| &**o == before)
                    && r4.owner(id).is_some_and(|o| &**o == after)
            })
            .unwrap_or_default()
    };
    let (id, watcher) = (owned("moved", "n0", "n3"), owned("watcher", "n1", "n1"));
    let mut w = persistent(&watcher, c.nodes[1].tcp).await;
    w.subscribe("will/#", v3::QoS::AtLeastOnce).await;
    let mut o = v3::options(&id, c.nodes[1].tcp);
    o.set_last_will(v3::LastWill::new(
        "will/moved",
        "gone",
        v3::QoS::AtLeastOnce,
        false,
    ));
    let mut client = v3::connect(o).await;
    let wills = |c: &Cluster| -> Vec<f64> {
        c.nodes
            .iter()
            .map(|n| n.metric("ringmq_replica_wills"))
            .collect()
    };
    until("both replicas keep the will", || {
        wills(&c) == [0.0, 1.0, 1.0]
    })
    .await;
    c.add();
    c.wait_ring(4);
    client.closed().await;
    until("no node keeps the will", || {
        wills(&c).iter().all(|n| *n == 0.0)
    })
    .await;
    // Nor at the move itself.
    w.no_publish().await;
    drop(c.take(0));
    c.wait_ring(3);
    // Long enough for the ring pass of every node to have run.
    tokio::time::sleep(Duration::from_secs(2)).await;
    w.no_publish().await;
}

/// A returning owner's old volume brings back neither a session that
/// ended while it was away nor the state of one that another node served
/// meanwhile. The owner of two persistent sessions, each with a queued
/// message, is SIGKILLed. One client comes back through another node with
/// a clean start (its session and message are gone) and leaves; the other
/// resumes its session there, gets the message, and leaves, and a second
/// message is queued for it. The owner starts again on its store, which
/// still has both sessions as they were: the first client, back without a
/// clean start, finds no session; the second finds its session with the
/// second message only.
#[tokio::test]
async fn a_returning_owner_does_not_bring_back_what_ended_or_moved_on_while_it_was_away() {
    let mut c = Cluster::start(3, "");
    let ended = owned_by("n2", &c.names, "GID_test@@@ended");
    let served = owned_by("n2", &c.names, "GID_test@@@served");
    for id in [&ended, &served] {
        let mut s = persistent(id, c.nodes[0].tcp).await;
        s.subscribe("twice/#", v3::QoS::AtLeastOnce).await;
        s.disconnect().await;
    }
    publish_acked(c.nodes[0].tcp, &["old"]).await;
    c.nodes[2].kill();
    until("the others see the owner gone", || {
        c.nodes[..2]
            .iter()
            .all(|n| n.metric("ringmq_cluster_nodes") == 2.0)
    })
    .await;
    let fresh = v3::connect(v3::options(&ended, c.nodes[0].tcp)).await;
    assert!(!fresh.connack.session_present);
    fresh.disconnect().await;
    let mut s = persistent(&served, c.nodes[0].tcp).await;
    assert!(s.connack.session_present);
    assert_eq!(&s.next_publish().await.payload[..], b"old");
    // The acknowledgement reaches the session before the client leaves.
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.disconnect().await;
    publish_acked(c.nodes[0].tcp, &["new"]).await;
    c.crash_restart(2); // already dead: started again on its store
    c.wait_ring(3);
    c.nodes[2].wait_ready();
    let mut back = persistent(&ended, c.nodes[0].tcp).await;
    assert!(
        !back.connack.session_present,
        "a session that ended came back"
    );
    back.no_publish().await;
    let mut s = persistent(&served, c.nodes[0].tcp).await;
    assert!(s.connack.session_present);
    assert_eq!(&s.next_publish().await.payload[..], b"new");
    s.no_publish().await;
}

/// Waits (30 s at most) until `done` holds.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A session left with fewer copies than the factor asks (its replica
/// SIGKILLed) is counted by the operations API and the metric, and
/// alarms once that held past `hold_secs`; a node that joins gets a copy,
/// and the alarm resolves.
#[tokio::test]
async fn a_session_left_without_its_replica_is_reported_and_alarms_until_copied_again() {
    let mut c = Cluster::start(2, "alarms:\n  hold_secs: 1\n");
    let id = owned_by("n0", &c.names, "GID_test@@@under");
    let mut s = persistent(&id, c.nodes[0].tcp).await;
    s.subscribe("under/#", v3::QoS::AtLeastOnce).await;
    s.disconnect().await;
    let under =
        |c: &Cluster| c.nodes[0].api("/api/v1/instance")["underReplicatedSessions"].as_u64();
    let alarm = |c: &Cluster, state: &str| {
        c.nodes[0].api("/api/v1/alarms")["alarms"]
            .as_array()
            .is_some_and(|a| {
                a.iter()
                    .any(|a| a["metric"] == "under_replicated_sessions" && a["state"] == state)
            })
    };
    until("both copies", || under(&c) == Some(0)).await;
    drop(c.take(1)); // the replica, SIGKILLed
    c.wait_ring(1);
    until("one session counted", || under(&c) == Some(1)).await;
    assert_eq!(c.nodes[0].metric("ringmq_sessions_under_replicated"), 1.0);
    let node = &c.nodes[0].api("/api/v1/instance")["nodes"][0];
    assert_eq!(node["underReplicatedSessions"], 1, "{node}");
    until("the alarm fires", || alarm(&c, "firing")).await;
    c.add();
    c.wait_ring(2);
    until("copied again", || under(&c) == Some(0)).await;
    until("the alarm resolves", || alarm(&c, "resolved")).await;
    assert!(!alarm(&c, "firing"));
}

/// A QoS 2 message to a persistent subscriber leaves for it only once the
/// session's replica has it. The client holds a QoS 2 packet id from the
/// PUBLISH on: sent earlier, and its owner killed before the replica got
/// it, the copy served next would give that id to a later message, which
/// the client would drop as a duplicate (the chaos test lost one so). The
/// replica is frozen for less than the failure timeout: the message waits
/// (so does its publisher's PUBREC) and leaves when the replica thaws.
#[tokio::test]
async fn a_qos2_message_leaves_for_its_subscriber_once_the_replica_has_it() {
    let c = Cluster::start_with_failure_timeout(2, "", 4_000);
    let id = owned_by("n0", &c.names, "GID_test@@@gated");
    let (_, replica) = keepers(&c, &id);
    let mut s = persistent(&id, c.nodes[0].tcp).await;
    s.subscribe("gated/#", v3::QoS::ExactlyOnce).await;
    // Its connection ends on the owner too, not behind the frozen node.
    let publisher = owned_by("n0", &c.names, "GID_test@@@gated-pub");
    let mut p = v3::connect(v3::options(&publisher, c.nodes[0].tcp)).await;
    p.publish("gated/x", v3::QoS::ExactlyOnce, false, "before")
        .await;
    assert_eq!(&s.next_publish().await.payload[..], b"before");
    p.acked(1).await;
    let frozen = c.nodes[index_of(&c, &replica)].freeze();
    p.publish("gated/x", v3::QoS::ExactlyOnce, false, "held")
        .await;
    s.no_publish().await;
    drop(frozen);
    assert_eq!(&s.next_publish().await.payload[..], b"held");
    p.acked(1).await;
}

/// A QoS 1 publish that reaches the subscriptions of an owner just lost is
/// refused until a node serves those sessions, rather than acknowledged
/// with nobody to take it. The owner's replica is frozen (for less than the
/// failure timeout) when the owner is SIGKILLed, so it cannot take the
/// session over yet: a publish through the third node is refused (MQTT 5
/// PUBACK 0x80 or above). Once the replica thaws and serves the session,
/// the same message is acknowledged, and the subscriber finds it.
#[tokio::test]
async fn a_publish_to_a_lost_owners_sessions_is_refused_until_they_are_served_again() {
    let mut c = Cluster::start_with_failure_timeout(3, "", 4_000);
    let id = owned_by("n2", &c.names, "GID_test@@@parting");
    let (_, replica) = keepers(&c, &id);
    let entry = third(&c, &replica);
    let port = c.nodes[index_of(&c, &entry)].tcp;
    let mut s = persistent(&id, port).await;
    s.subscribe("parting/#", v3::QoS::AtLeastOnce).await;
    s.disconnect().await;
    // Its connection ends on the entry node, not behind a node the test stops.
    let publisher = owned_by(&entry, &c.names, "GID_test@@@parting-pub");
    let mut p = v5::connect(v5::options(&publisher, port)).await;
    let frozen = c.nodes[index_of(&c, &replica)].freeze();
    drop(c.take(index_of(&c, "n2"))); // SIGKILL the owner
    let e = index_of(&c, &entry);
    until("the entry node sees the owner gone", || {
        c.nodes[e].metric("ringmq_cluster_nodes") == 2.0
    })
    .await;
    let accepted = |r: &v5::PubAckReason| {
        matches!(
            r,
            v5::PubAckReason::Success | v5::PubAckReason::NoMatchingSubscribers
        )
    };
    let mut publish = async || {
        p.publish("parting/x", v5::QoS::AtLeastOnce, false, "m")
            .await;
        loop {
            if let v5::Packet::PubAck(a) = recv(&mut p.rx, "PUBACK").await {
                return a.reason;
            }
        }
    };
    let reason = publish().await;
    assert!(
        !accepted(&reason),
        "acknowledged while no node serves the session: {reason:?}"
    );
    drop(frozen);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !accepted(&publish().await) {
        assert!(Instant::now() < deadline, "still refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut s = persistent(&id, port).await;
    assert!(s.connack.session_present, "the session is lost");
    assert_eq!(&s.next_publish().await.payload[..], b"m");
}

/// A session handed to its new owner stays with its sender until that
/// owner keeps it. The owner leaves (SIGTERM) while the node its session
/// goes to is frozen; that node is SIGKILLed before it could read the
/// session. The leaving node, whose hand-over was never acknowledged,
/// serves the session again and hands it to the node left: the client
/// finds it there with its queued messages (the chaos test lost a session
/// so when the sender forgot it once it was queued).
#[tokio::test]
async fn a_session_handed_to_a_node_lost_before_it_kept_it_stays_with_its_sender() {
    let mut c = Cluster::start_with_failure_timeout(3, "", 4_000);
    let id = owned_by("n2", &c.names, "GID_test@@@handed");
    let (_, next) = keepers(&c, &id);
    let left = third(&c, &next);
    let last = index_of(&c, &left);
    let mut s = persistent(&id, c.nodes[last].tcp).await;
    s.subscribe("twice/#", v3::QoS::AtLeastOnce).await;
    s.disconnect().await;
    publish_acked(c.nodes[last].tcp, &["h1", "h2"]).await;
    let owner = index_of(&c, "n2");
    let frozen = c.nodes[index_of(&c, &next)].freeze();
    let pid = c.nodes[owner].pid().to_string();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    assert!(term.is_ok_and(|s| s.success()), "SIGTERM {pid}");
    until("the leaving owner sends the session on", || {
        c.nodes[owner].metric("ringmq_sessions") == 0.0
    })
    .await;
    drop(c.take(index_of(&c, &next))); // SIGKILL, still frozen
    drop(frozen);
    let last = index_of(&c, &left);
    until("the node left serves the session", || {
        c.nodes[last].metric("ringmq_sessions") == 1.0
    })
    .await;
    let mut s = persistent(&id, c.nodes[last].tcp).await;
    assert!(s.connack.session_present, "the session is lost");
    let mut got = BTreeSet::new();
    while got.len() < 2 {
        got.insert(String::from_utf8_lossy(&s.next_publish().await.payload).into_owned());
    }
    assert_eq!(got, ["h1", "h2"].map(String::from).into());
}

/// A planned leave hands each session to its first replica, which holds
/// a copy already: the session goes without its queued messages, which
/// the copy has (`ringmq_sessions_moved_in_from_copy_total`), and the
/// client finds every one of them there.
#[tokio::test]
async fn a_leaving_owner_hands_a_session_to_its_replica_without_its_messages() {
    let mut c = Cluster::start(
        3,
        "limits:\n  offline_queue_len: 1000\n  offline_batch: 1000\n",
    );
    let id = owned_by("n2", &c.names, "GID_test@@@leaving");
    let (_, next) = keepers(&c, &id);
    let mut s = persistent(&id, c.nodes[index_of(&c, &next)].tcp).await;
    s.subscribe("twice/#", v3::QoS::AtLeastOnce).await;
    s.disconnect().await;
    let sent: Vec<String> = (0..100).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = sent.iter().map(String::as_str).collect();
    publish_acked(c.nodes[index_of(&c, &third(&c, &next))].tcp, &refs).await;
    let owner = index_of(&c, "n2");
    assert_eq!(c.nodes[owner].terminate(), Some(0), "a clean leave");
    drop(c.take(owner));
    let r = index_of(&c, &next);
    let mut s = persistent(&id, c.nodes[r].tcp).await;
    assert!(s.connack.session_present, "the session is lost");
    let mut got = BTreeSet::new();
    while got.len() < sent.len() {
        got.insert(String::from_utf8_lossy(&s.next_publish().await.payload).into_owned());
    }
    assert_eq!(got, sent.into_iter().collect());
    assert_eq!(
        c.nodes[r].metric("ringmq_sessions_moved_in_from_copy_total"),
        1.0,
        "the session came without its messages"
    );
}

/// A hand-over sent and never confirmed (its receiver lost after it served
/// the session) brings the session back to its sender as a copy, which
/// gives way to the state the receiver served. The owner leaves while the
/// third node, the receiver's replica, is frozen: the receiver serves the
/// session (the client takes its messages) but cannot confirm it. The
/// leaving owner is frozen too, the receiver SIGKILLed, the third node
/// thawed: it serves the receiver's state from its replica. When the
/// leaving owner thaws, its hand-over fails, and the session it takes back
/// and passes on is dropped there as older: the messages the client took
/// do not come again.
#[tokio::test]
async fn a_session_taken_back_unconfirmed_gives_way_to_what_its_lost_receiver_served() {
    let mut c = Cluster::start_with_failure_timeout(3, "", 6_000);
    let id = owned_by("n2", &c.names, "GID_test@@@unconfirmed");
    let (_, next) = keepers(&c, &id);
    let left = third(&c, &next);
    let mut s = persistent(&id, c.nodes[index_of(&c, &next)].tcp).await;
    s.subscribe("twice/#", v3::QoS::AtLeastOnce).await;
    s.disconnect().await;
    publish_acked(c.nodes[index_of(&c, &next)].tcp, &["a1", "a2", "a3"]).await;
    let owner = index_of(&c, "n2");
    let third_frozen = c.nodes[index_of(&c, &left)].freeze();
    let pid = c.nodes[owner].pid().to_string();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    assert!(term.is_ok_and(|s| s.success()), "SIGTERM {pid}");
    until("the leaving owner sends the session on", || {
        c.nodes[owner].metric("ringmq_sessions") == 0.0
    })
    .await;
    let owner_frozen = c.nodes[owner].freeze();
    let mut s = persistent(&id, c.nodes[index_of(&c, &next)].tcp).await;
    assert!(s.connack.session_present, "the receiver serves the session");
    for _ in 0..3 {
        s.next_publish().await;
    }
    // The acknowledgements reach the session before the client leaves.
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.disconnect().await;
    drop(c.take(index_of(&c, &next))); // SIGKILL the receiver
    drop(third_frozen);
    let y = index_of(&c, &left);
    until("the third node serves the receiver's state", || {
        c.nodes[y].metric("ringmq_sessions_failed_over_total") == 1.0
    })
    .await;
    drop(owner_frozen);
    until("the copy the leaving owner took back gives way", || {
        c.nodes[y].metric("ringmq_session_copies_dropped_total") >= 1.0
    })
    .await;
    let mut s = persistent(&id, c.nodes[y].tcp).await;
    assert!(s.connack.session_present, "the session is lost");
    s.no_publish().await;
}

/// The nodes of `c` that keep `id`'s session with replication factor 2:
/// its owner and its replica (the next owner).
fn keepers(c: &Cluster, id: &str) -> (String, String) {
    let ring = ringmq_broker::ring::Ring::new(&c.names);
    let s = ring.successors(id, 2);
    (s[0].to_string(), s[1].to_string())
}

/// The node of a three-node `c` that is neither `n2` (the owner in these
/// tests) nor `replica`.
fn third(c: &Cluster, replica: &str) -> String {
    c.names
        .iter()
        .find(|n| **n != "n2" && **n != replica)
        .cloned()
        .unwrap_or_default()
}

fn index_of(c: &Cluster, name: &str) -> usize {
    c.names
        .iter()
        .position(|n| n == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

/// Publishes `payloads` at QoS 1 through the node at `port` and waits for
/// every PUBACK.
async fn publish_acked(port: u16, payloads: &[&str]) {
    let mut p = v3::connect(v3::options("twice-publisher", port)).await;
    for m in payloads {
        p.publish("twice/x", v3::QoS::AtLeastOnce, false, *m).await;
    }
    p.acked(payloads.len()).await;
    p.disconnect().await;
}

/// Replication factor 2, two nodes lost one after the other, the second
/// once the first's sessions have their replica again: nothing is lost.
#[tokio::test]
async fn two_owners_killed_in_a_row_lose_nothing() {
    let mut c = Cluster::start(3, "");
    let id = owned_by("n2", &c.names, "GID_test@@@twice");
    let (_, next) = keepers(&c, &id);
    let last = third(&c, &next);
    let mut s = persistent(&id, c.nodes[0].tcp).await;
    s.subscribe("twice/#", v3::QoS::AtLeastOnce).await;
    s.disconnect().await;
    let port = c.nodes[index_of(&c, &last)].tcp;
    publish_acked(port, &["a1", "a2", "a3"]).await;
    drop(c.take(index_of(&c, "n2"))); // SIGKILL the owner
    c.wait_ring(2);
    // The new owner sends the session whole to the node left, its new replica.
    let survivor = index_of(&c, &last);
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.nodes[survivor].metric("ringmq_replica_sessions") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the session was not replicated again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publish_acked(c.nodes[survivor].tcp, &["b1", "b2"]).await;
    drop(c.take(index_of(&c, &next))); // SIGKILL the second owner
    c.wait_ring(1);
    let mut s = persistent(&id, c.nodes[0].tcp).await;
    assert!(s.connack.session_present, "the session is lost");
    let mut got = BTreeSet::new();
    while got.len() < 5 {
        got.insert(String::from_utf8_lossy(&s.next_publish().await.payload).into_owned());
    }
    assert_eq!(got, ["a1", "a2", "a3", "b1", "b2"].map(String::from).into());
}

/// Replication factor 2, a session's owner and its replica lost at the
/// same moment: both copies were there, and the session is lost, as
/// README "Cluster" says (the node left has none).
#[tokio::test]
async fn owner_and_replica_killed_at_once_lose_the_session() {
    let mut c = Cluster::start(3, "");
    let id = owned_by("n2", &c.names, "GID_test@@@atonce");
    let (_, next) = keepers(&c, &id);
    let mut s = persistent(&id, c.nodes[0].tcp).await;
    s.subscribe("twice/#", v3::QoS::AtLeastOnce).await;
    s.disconnect().await;
    let mut killed = vec![c.take(index_of(&c, "n2"))];
    killed.push(c.take(index_of(&c, &next)));
    drop(killed); // SIGKILL both
    c.wait_ring(1);
    let s = persistent(&id, c.nodes[0].tcp).await;
    assert!(
        !s.connack.session_present,
        "a copy was kept on a third node"
    );
}

fn v5_persistent(id: &str, port: u16) -> rumqttc::v5::MqttOptions {
    let mut o = v5::options(id, port);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(600));
    o
}

/// A flag the chaos test's clients watch.
type Stop = Arc<Mutex<bool>>;

/// Raises its flags when dropped: a failing test stops its client threads
/// rather than wait for them forever.
struct StopOnDrop(Vec<Stop>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        for s in &self.0 {
            *s.lock().unwrap_or_else(|e| e.into_inner()) = true;
        }
    }
}

fn stopped(stop: &Stop) -> bool {
    *stop.lock().unwrap_or_else(|e| e.into_inner())
}

fn port_of(ports: &Mutex<Vec<u16>>, attempt: usize) -> u16 {
    let p = ports.lock().unwrap_or_else(|e| e.into_inner());
    p[attempt % p.len()]
}

/// What a publisher got acknowledged: the numbers, and those it had to send
/// on more than one connection (a refusal or a lost connection before the
/// acknowledgement: the broker may have routed an earlier attempt).
#[derive(Debug, Default)]
struct Published {
    acked: BTreeSet<usize>,
    resent: BTreeSet<usize>,
}

/// Publishes `q<qos>-<n>` one after another through whichever node is up,
/// each until it is acknowledged (PUBACK, or PUBREC for QoS 2), until told
/// to stop.
async fn publisher(ports: Arc<Mutex<Vec<u16>>>, id: String, qos: QoS, stop: Stop) -> Published {
    let mut out = Published::default();
    let mut n = 0;
    let mut attempt = 0usize;
    let mut tried = false;
    while !stopped(&stop) {
        attempt += 1;
        let mut opts = MqttOptions::new(&id, "127.0.0.1", port_of(&ports, attempt));
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = AsyncClient::new(opts, 10);
        'conn: while !stopped(&stop) {
            if tried {
                out.resent.insert(n);
            }
            tried = true;
            let payload = format!("q{}-{n}", qos as u8);
            if client
                .publish("chaos/x", qos, false, payload)
                .await
                .is_err()
            {
                break 'conn;
            }
            loop {
                match tokio::time::timeout(Duration::from_secs(3), el.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubRec(_)))) => {
                        out.acked.insert(n);
                        n += 1;
                        tried = false;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue 'conn;
                    }
                    Ok(Ok(_)) => {}
                    // Refused, disconnected or stuck: again, through another node.
                    Ok(Err(_)) | Err(_) => break 'conn,
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    out
}

/// Receives on persistent session `id` (subscribed to `chaos/#` at QoS 2)
/// through whichever node is up; counts each payload delivered. A raw MQTT
/// 3.1.1 receiver, since rumqttc forgets the QoS 2 packet ids it received
/// when it reconnects and drops the connection at the PUBREL a server must
/// send again then. This one keeps them as MQTT 4.3.3 (method B) says: an
/// id is held from PUBLISH to PUBREL, across connections, and a PUBLISH
/// with a held id is not delivered again.
fn subscriber(ports: Arc<Mutex<Vec<u16>>>, id: String, stop: Stop, out: Arc<Mutex<Received>>) {
    let got = |payload: String| {
        *out.lock()
            .unwrap_or_else(|e| e.into_inner())
            .got
            .entry(payload)
            .or_default() += 1;
    };
    let mut held: HashSet<u16> = HashSet::new();
    let mut attempt = 0usize;
    while !stopped(&stop) {
        attempt += 1;
        let Ok(s) = TcpStream::connect(("127.0.0.1", port_of(&ports, attempt))) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut r = raw::Raw(s);
        r.send(&raw::connect_keep(4, &id));
        let present = match r.read() {
            Some((0x20, b)) if b.get(1) == Some(&0) => b.first() == Some(&1),
            _ => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if !present {
            // The broker lost the session: subscribe again, as a client
            // would, and count it.
            out.lock().unwrap_or_else(|e| e.into_inner()).sessions_lost += 1;
            r.send(&raw::subscribe_qos(4, b"chaos/#", 2));
        }
        while !stopped(&stop) {
            let Some((first, body)) = r.read() else {
                // A quiet half second reads as a close too: connect again.
                break;
            };
            let kind = first >> 4;
            if kind == 3 {
                let qos = (first >> 1) & 3;
                let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                let at = 2 + topic_len;
                let (pkid, payload) = if qos > 0 {
                    (
                        u16::from_be_bytes([body[at], body[at + 1]]),
                        &body[at + 2..],
                    )
                } else {
                    (0, &body[at..])
                };
                let payload = String::from_utf8_lossy(payload).into_owned();
                let [hi, lo] = pkid.to_be_bytes();
                match qos {
                    1 => {
                        got(payload);
                        r.send(&[0x40, 2, hi, lo]);
                    }
                    2 => {
                        if held.insert(pkid) {
                            got(payload);
                        }
                        r.send(&[0x50, 2, hi, lo]);
                    }
                    _ => got(payload),
                }
            } else if kind == 6 {
                // PUBREL: the id may be used again.
                held.remove(&u16::from_be_bytes([body[0], body[1]]));
                r.send(&[0x70, 2, body[0], body[1]]);
            }
        }
    }
}

/// What a subscriber received: each payload with how many times, and how
/// many times it found its session gone.
#[derive(Debug, Default)]
struct Received {
    got: HashMap<String, usize>,
    sessions_lost: usize,
}

/// A small generator for the victims; the seed is printed so that a
/// failing run can be repeated.
fn next_victim(state: &mut u64, n: usize) -> usize {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state % n as u64) as usize
}

/// D2 under fire: three nodes, a persistent subscriber owned by each, a QoS
/// 1 and a QoS 2 publisher at a steady rate, and for a minute a node chosen
/// at random is SIGKILLed and started again on its data directory every
/// few seconds. At the end every acknowledged message reached every
/// subscriber, and a QoS 2 message sent once reached each once; QoS 1
/// duplicates are counted and printed.
#[tokio::test]
async fn a_node_killed_at_random_every_few_seconds_loses_no_acknowledged_message() {
    // Offline messages all at once on reconnect (not in batches every few
    // seconds), and as many as the test publishes.
    let limits = "limits:\n  offline_queue_len: 1000000\n  offline_batch: 1000000\n";
    let mut c = Cluster::start(3, limits);
    let ports = Arc::new(Mutex::new(c.ports()));
    let stop: Stop = Arc::default();
    let ids: Vec<String> = ["n0", "n1", "n2"]
        .iter()
        .map(|n| owned_by(n, &c.names, "GID_test@@@chaos"))
        .collect();
    for id in &ids {
        let mut s = persistent(id, c.nodes[0].tcp).await;
        s.subscribe("chaos/#", v3::QoS::ExactlyOnce).await;
        s.disconnect().await;
    }
    let received: Vec<Arc<Mutex<Received>>> = ids.iter().map(|_| Arc::default()).collect();
    let subscribers: Vec<_> = ids
        .iter()
        .zip(&received)
        .map(|(id, out)| {
            let (ports, id, stop, out) = (ports.clone(), id.clone(), stop.clone(), out.clone());
            tokio::task::spawn_blocking(move || subscriber(ports, id, stop, out))
        })
        .collect();
    let pub_stop: Stop = Arc::default();
    let _stop_on_panic = StopOnDrop(vec![stop.clone(), pub_stop.clone()]);
    let publishers: Vec<_> = [QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .map(|q| {
            let id = format!("GID_test@@@chaos-pub{}", q as u8);
            tokio::spawn(publisher(ports.clone(), id, q, pub_stop.clone()))
        })
        .collect();
    let mut seed = u64::from(std::process::id()) * 0x9e37_79b9 + 1;
    eprintln!("chaos seed {seed}");
    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let i = next_victim(&mut seed, c.nodes.len());
        c.crash_restart(i);
        kills += 1;
        *ports.lock().unwrap_or_else(|e| e.into_inner()) = c.ports();
        c.wait_ring(3);
        for n in &c.nodes {
            n.wait_ready();
        }
    }
    *pub_stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
    let mut published = Vec::new();
    for p in publishers {
        published.push(p.await.unwrap_or_else(|e| panic!("{e}")));
    }
    let (q1, q2) = (&published[0], &published[1]);
    let wanted: Vec<String> = [(1, q1), (2, q2)]
        .iter()
        .flat_map(|(q, p)| p.acked.iter().map(move |n| format!("q{q}-{n}")))
        .collect();
    // What is queued drains to the subscribers (a minute at most).
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let done = received.iter().all(|r| {
            let r = r.lock().unwrap_or_else(|e| e.into_inner());
            wanted.iter().all(|m| r.got.contains_key(m))
        });
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    *stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
    for s in subscribers {
        s.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let received: Vec<Received> = received
        .iter()
        .map(|r| std::mem::take(&mut *r.lock().unwrap_or_else(|e| e.into_inner())))
        .collect();
    eprintln!(
        "{kills} kills; acknowledged {} QoS 1 and {} QoS 2 messages ({} and {} sent more than once)",
        q1.acked.len(),
        q2.acked.len(),
        q1.resent.len(),
        q2.resent.len()
    );
    assert!(
        q1.acked.len() > 100 && q2.acked.len() > 100,
        "too little traffic"
    );
    for (id, r) in ids.iter().zip(&received) {
        let got = &r.got;
        assert_eq!(r.sessions_lost, 0, "{id} found its session gone");
        let lost: Vec<&String> = wanted.iter().filter(|m| !got.contains_key(*m)).collect();
        assert!(
            lost.is_empty(),
            "{id}: {} acknowledged but never delivered (of {} received): {:?} … {:?}",
            lost.len(),
            got.len(),
            &lost[..lost.len().min(5)],
            &lost[lost.len().saturating_sub(5)..]
        );
        let twice: Vec<&String> = q2
            .acked
            .iter()
            .filter(|n| !q2.resent.contains(n))
            .map(|n| format!("q2-{n}"))
            .filter_map(|m| {
                got.get_key_value(&m)
                    .filter(|(_, c)| **c > 1)
                    .map(|(k, _)| k)
            })
            .collect();
        assert!(
            twice.is_empty(),
            "{id}: QoS 2 messages sent once, delivered twice: {twice:?}"
        );
        let dups: usize = got
            .iter()
            .filter(|(m, _)| m.starts_with("q1-"))
            .map(|(_, c)| c - 1)
            .sum();
        eprintln!("{id}: {} messages, {dups} QoS 1 duplicates", got.len());
    }
}
