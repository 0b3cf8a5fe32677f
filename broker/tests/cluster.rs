//! Clusters of real broker processes on loopback (SPEC C1–C5): clients on
//! any node behave as on one broker.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::netns::Netns;
use common::v4::persistent;
use common::{Broker, Cluster, QUIET, WAIT, owned_by, v4 as v3, v5};
use rumqttc::v5::mqttbytes::v5::Packet as P5;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};

#[tokio::test]
async fn three_nodes_form_one_ring_and_a_stranger_is_refused() {
    let mut c = Cluster::start(3, "");
    let wrong = c.nodes[0].dir.path().join("wrong-secret");
    std::fs::write(&wrong, "not the secret").unwrap_or_else(|e| panic!("{e}"));
    c.add_named("stranger", &wrong);
    let stranger = c.take(3);
    tokio::time::sleep(QUIET).await;
    assert_eq!(stranger.metric("ringmq_cluster_nodes"), 1.0);
    c.wait_ring(3);
    let refused: f64 = c
        .nodes
        .iter()
        .map(|n| n.metric("ringmq_packets_rejected_total{reason=\"cluster_handshake\"}"))
        .sum();
    assert!(refused >= 1.0, "the stranger's handshake was refused");
}

#[tokio::test]
async fn publish_on_any_node_reaches_every_subscriber_once() {
    let c = Cluster::start(3, "");
    let mut subs = Vec::new();
    for (i, node) in c.nodes.iter().enumerate() {
        let mut s = v5::connect(v5::options(&format!("sub-{i}"), node.tcp)).await;
        s.subscribe("fleet/+/temp", v5::QoS::AtLeastOnce).await;
        subs.push(s);
    }
    // Routes reach the other nodes asynchronously.
    tokio::time::sleep(QUIET).await;
    for (i, node) in c.nodes.iter().enumerate() {
        let p = v5::connect(v5::options(&format!("pub-{i}"), node.tcp)).await;
        p.publish(
            &format!("fleet/{i}/temp"),
            v5::QoS::AtLeastOnce,
            false,
            "21",
        )
        .await;
    }
    for s in &mut subs {
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(String::from_utf8_lossy(&s.next_publish().await.topic).into_owned());
        }
        got.sort();
        assert_eq!(got, ["fleet/0/temp", "fleet/1/temp", "fleet/2/temp"]);
        s.no_publish().await;
    }
}

#[tokio::test]
async fn a_shared_group_across_nodes_gets_each_message_once() {
    let c = Cluster::start(3, "");
    let mut members = Vec::new();
    for (i, node) in c.nodes.iter().enumerate() {
        let mut m = v3::connect(v3::options(&format!("worker-{i}"), node.tcp)).await;
        m.subscribe("$share/workers/jobs/#", v3::QoS::AtLeastOnce)
            .await;
        members.push(m);
    }
    tokio::time::sleep(QUIET).await;
    let p = v3::connect(v3::options("dispatcher", c.nodes[1].tcp)).await;
    for n in 0..30 {
        p.publish(&format!("jobs/{n}"), v3::QoS::AtLeastOnce, false, "x")
            .await;
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in &mut members {
        while let Ok(Some(rumqttc::Packet::Publish(p))) =
            tokio::time::timeout(QUIET, m.rx.recv()).await
        {
            *seen.entry(p.topic).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), 30, "every job delivered");
    assert!(seen.values().all(|n| *n == 1), "no job twice: {seen:?}");
}

#[tokio::test]
async fn duplicate_client_id_on_two_nodes_closes_the_older_once() {
    let c = Cluster::start(3, "");
    let mut first = v5::connect(v5::options("GID_test@@@same", c.nodes[0].tcp)).await;
    let mut second = v5::connect(v5::options("GID_test@@@same", c.nodes[2].tcp)).await;
    assert_eq!(
        first.closed().await,
        v5::DisconnectReasonCode::SessionTakenOver
    );
    second.subscribe("still/here", v5::QoS::AtLeastOnce).await;
    let p = v5::connect(v5::options("poker", c.nodes[1].tcp)).await;
    tokio::time::sleep(QUIET).await;
    p.publish("still/here", v5::QoS::AtLeastOnce, false, "yes")
        .await;
    assert_eq!(&second.next_publish().await.payload[..], b"yes");
    second.no_publish().await;
}

#[tokio::test]
async fn a_persistent_session_resumes_through_another_node() {
    let c = Cluster::start(3, "");
    let mut s = persistent("GID_test@@@sleepy", c.nodes[0].tcp).await;
    s.subscribe("mail/sleepy", v3::QoS::AtLeastOnce).await;
    s.disconnect().await;
    tokio::time::sleep(QUIET).await;
    let p = v3::connect(v3::options("postman", c.nodes[2].tcp)).await;
    for n in 0..3 {
        p.publish(
            "mail/sleepy",
            v3::QoS::AtLeastOnce,
            false,
            format!("letter {n}"),
        )
        .await;
    }
    let mut s = persistent("GID_test@@@sleepy", c.nodes[1].tcp).await;
    assert!(s.connack.session_present, "the session followed the client");
    for n in 0..3 {
        assert_eq!(
            s.next_publish().await.payload,
            format!("letter {n}").as_bytes()
        );
    }
}

#[tokio::test]
async fn retained_will_and_p2p_cross_nodes() {
    let c = Cluster::start(3, "");
    let p = v3::connect(v3::options("retainer", c.nodes[0].tcp)).await;
    p.publish("status/door", v3::QoS::AtLeastOnce, true, "closed")
        .await;
    tokio::time::sleep(QUIET).await;
    let mut late = v3::connect(v3::options("late-reader", c.nodes[2].tcp)).await;
    late.subscribe("status/#", v3::QoS::AtLeastOnce).await;
    let m = late.next_publish().await;
    assert_eq!((&m.payload[..], m.retain), (&b"closed"[..], true));

    late.subscribe("wills/#", v3::QoS::AtLeastOnce).await;
    tokio::time::sleep(QUIET).await;
    let mut opts = v3::options("mortal", c.nodes[1].tcp);
    opts.set_last_will(rumqttc::LastWill::new(
        "wills/mortal",
        "gone",
        v3::QoS::AtLeastOnce,
        false,
    ));
    let mortal = v3::connect(opts).await;
    mortal.kill();
    assert_eq!(&late.next_publish().await.payload[..], b"gone");

    let mut target = v5::connect(v5::options("GID_test@@@target", c.nodes[0].tcp)).await;
    let sender = v5::connect(v5::options("GID_test@@@sender", c.nodes[1].tcp)).await;
    sender
        .publish(
            "app/p2p/GID_test@@@target",
            v5::QoS::AtLeastOnce,
            false,
            "psst",
        )
        .await;
    let m = target.next_publish().await;
    assert_eq!(
        (&m.topic[..], &m.payload[..]),
        (&b"app/p2p/GID_test@@@target"[..], &b"psst"[..])
    );
}

#[tokio::test]
async fn a_killed_node_leaves_the_ring_and_its_clients_get_service_elsewhere() {
    let mut c = Cluster::start(3, "");
    // State before the loss: a retained message, and a persistent session
    // with a queued message on the victim and on a survivor.
    let on_victim = owned_by("n2", &c.names, "GID_test@@@victim");
    let on_survivor = owned_by("n1", &c.names, "GID_test@@@survivor");
    for id in [&on_victim, &on_survivor] {
        let mut s = persistent(id, c.nodes[0].tcp).await;
        s.subscribe("queued/#", v3::QoS::AtLeastOnce).await;
        s.disconnect().await;
    }
    tokio::time::sleep(QUIET).await;
    let p = v3::connect(v3::options("before", c.nodes[0].tcp)).await;
    p.publish("queued/x", v3::QoS::AtLeastOnce, false, "queued")
        .await;
    p.publish("state/x", v3::QoS::AtLeastOnce, true, "retained")
        .await;
    let mut watcher = v5::connect(v5::options("watcher", c.nodes[0].tcp)).await;
    watcher.subscribe("alive/#", v5::QoS::AtLeastOnce).await;
    let mut connected = v5::connect(v5::options("GID_test@@@connected", c.nodes[2].tcp)).await;
    tokio::time::sleep(QUIET).await;

    let victim: Broker = c.take(2);
    drop(victim); // SIGKILL
    assert!(matches!(
        tokio::time::timeout(WAIT, connected.rx.recv()).await,
        Ok(Some(P5::Disconnect(_)))
    ));
    c.wait_ring(2);
    // Clients come back through a surviving node and get service at once.
    let back = v5::connect(v5::options("GID_test@@@connected", c.nodes[1].tcp)).await;
    back.publish("alive/again", v5::QoS::AtLeastOnce, false, "hi")
        .await;
    assert_eq!(&watcher.next_publish().await.payload[..], b"hi");
    // What survives (ARCHITECTURE.md, "Failure model"): sessions held by the
    // survivors, the lost node's sessions (their replicas), retained
    // messages (every node has a copy).
    for id in [&on_survivor, &on_victim] {
        let mut s = persistent(id, c.nodes[0].tcp).await;
        assert!(s.connack.session_present, "{id} lost its session");
        assert_eq!(&s.next_publish().await.payload[..], b"queued");
    }
    let mut r = v3::connect(v3::options("reader", c.nodes[1].tcp)).await;
    r.subscribe("state/#", v3::QoS::AtLeastOnce).await;
    assert_eq!(&r.next_publish().await.payload[..], b"retained");
}

/// Persistent sessions with queued offline messages, on a cluster that
/// changes size: every session and message is found again after the change.
async fn park_sessions(c: &Cluster, n: usize) {
    for i in 0..n {
        let port = c.nodes[i % c.nodes.len()].tcp;
        let mut s = persistent(&format!("GID_test@@@parked-{i}"), port).await;
        s.subscribe(&format!("box/{i}"), v3::QoS::AtLeastOnce).await;
        s.disconnect().await;
    }
    tokio::time::sleep(QUIET).await;
    fill(c, n, 0).await;
}

/// Queues messages `round:0` and `round:1` for every parked session.
async fn fill(c: &Cluster, n: usize, round: usize) {
    let p = v3::connect(v3::options("filler", c.nodes[0].tcp)).await;
    for i in 0..n {
        for k in 0..2 {
            p.publish(
                &format!("box/{i}"),
                v3::QoS::AtLeastOnce,
                false,
                format!("{i}:{round}:{k}"),
            )
            .await;
        }
    }
    tokio::time::sleep(QUIET).await;
}

/// Every parked session is present (through another node than it was
/// created on) with the messages of `round`.
async fn check_sessions(c: &Cluster, n: usize, round: usize) {
    for i in 0..n {
        let port = c.nodes[(i + 1) % c.nodes.len()].tcp;
        let mut s = persistent(&format!("GID_test@@@parked-{i}"), port).await;
        assert!(s.connack.session_present, "session {i} survived");
        for k in 0..2 {
            assert_eq!(
                s.next_publish().await.payload,
                format!("{i}:{round}:{k}").as_bytes()
            );
        }
        s.disconnect().await;
    }
}

fn moved(c: &Cluster) -> f64 {
    c.nodes
        .iter()
        .map(|n| n.metric("ringmq_sessions_moved_total"))
        .sum()
}

#[tokio::test]
async fn scaling_up_and_down_moves_sessions_with_their_offline_messages() {
    let mut c = Cluster::start(3, "");
    park_sessions(&c, 24).await;
    // Scale up: the new node takes over its share of the sessions, and is
    // ready only once it has them: clients find them at once.
    c.add();
    assert!(moved(&c) > 0.0, "some sessions belong to the new node");
    assert!(c.nodes[3].metric("ringmq_sessions") > 0.0);
    check_sessions(&c, 24, 0).await;
    fill(&c, 24, 1).await;
    // Scale down by two: planned leaves hand every session over.
    for i in [3, 0] {
        let mut gone = c.take(i);
        assert_eq!(gone.terminate(), Some(0));
    }
    c.wait_ring(2);
    check_sessions(&c, 24, 1).await;
}

/// Sends QoS 1 messages one by one through whichever node is up, until each
/// is acknowledged; returns the acknowledged numbers.
async fn stream(ports: Arc<Mutex<Vec<u16>>>, count: usize) -> BTreeSet<usize> {
    let mut acked = BTreeSet::new();
    let mut n = 0;
    let mut attempt = 0usize;
    while n < count {
        attempt += 1;
        let port = {
            let p = ports.lock().unwrap_or_else(|e| e.into_inner());
            p[attempt % p.len()]
        };
        let mut opts = MqttOptions::new("GID_test@@@streamer", "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = AsyncClient::new(opts, 10);
        'conn: loop {
            if client
                .publish("stream/x", rumqttc::QoS::AtLeastOnce, false, n.to_string())
                .await
                .is_err()
            {
                break 'conn;
            }
            loop {
                match tokio::time::timeout(Duration::from_secs(2), el.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                        acked.insert(n);
                        n += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        if n == count {
                            return acked;
                        }
                        continue 'conn;
                    }
                    Ok(Ok(_)) => {}
                    // Disconnected or stuck: try again through another node.
                    Ok(Err(_)) | Err(_) => break 'conn,
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    acked
}

/// Receives on a persistent QoS 1 session through whichever node is up.
async fn collect(ports: Arc<Mutex<Vec<u16>>>, stop: Arc<Mutex<bool>>) -> BTreeSet<usize> {
    let mut got = BTreeSet::new();
    let mut attempt = 0usize;
    while !*stop.lock().unwrap_or_else(|e| e.into_inner()) {
        attempt += 1;
        let port = {
            let p = ports.lock().unwrap_or_else(|e| e.into_inner());
            p[attempt % p.len()]
        };
        let mut opts = MqttOptions::new("GID_test@@@collector", "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(false);
        let (client, mut el) = AsyncClient::new(opts, 10);
        let _ = client
            .subscribe("stream/#", rumqttc::QoS::AtLeastOnce)
            .await;
        loop {
            if *stop.lock().unwrap_or_else(|e| e.into_inner()) {
                return got;
            }
            match tokio::time::timeout(Duration::from_millis(500), el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    if let Ok(n) = String::from_utf8_lossy(&p.payload).parse() {
                        got.insert(n);
                    }
                }
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(_)) => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    got
}

#[tokio::test]
async fn a_rolling_restart_under_a_qos1_stream_loses_no_acknowledged_message() {
    let mut c = Cluster::start(3, "");
    let ports = Arc::new(Mutex::new(c.ports()));
    let stop = Arc::new(Mutex::new(false));
    let collector = tokio::spawn(collect(ports.clone(), stop.clone()));
    tokio::time::sleep(QUIET).await;
    let streamer = tokio::spawn(stream(ports.clone(), 300));
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The oldest node goes first, as a StatefulSet's rolling update does.
        c.restart(0);
        *ports.lock().unwrap_or_else(|e| e.into_inner()) = c.ports();
        c.wait_ring(3);
    }
    let acked = tokio::time::timeout(Duration::from_secs(60), streamer)
        .await
        .unwrap_or_else(|_| panic!("the stream did not finish"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(acked.len(), 300);
    tokio::time::sleep(Duration::from_secs(2)).await;
    *stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
    let got = collector.await.unwrap_or_else(|e| panic!("{e}"));
    let lost: Vec<&usize> = acked.difference(&got).collect();
    assert!(
        lost.is_empty(),
        "acknowledged but never delivered: {lost:?}"
    );
}

/// An MQTT 3.1.1 client with a persistent session (cleanSession=false),
/// connected through the node at `port`.

#[tokio::test]
async fn a_leaving_node_tells_its_clients_to_reconnect_and_a_drained_node_owns_nothing() {
    let mut c = Cluster::start(3, "");
    // SIGTERM: an MQTT 5 client of the leaving node gets 0x9C and finds its
    // session (and what was queued for it) through another node.
    let id = owned_by("n2", &c.names, "GID_test@@@leaver");
    let mut opts = v5::options(&id, c.nodes[0].tcp);
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(600));
    let mut client = v5::connect(opts).await;
    client.subscribe("leave/test", v5::QoS::AtLeastOnce).await;
    let mut gone = c.take(2);
    let stopping = std::thread::spawn(move || gone.terminate());
    assert_eq!(
        client.closed().await,
        v5::DisconnectReasonCode::UseAnotherServer
    );
    assert_eq!(stopping.join().ok().flatten(), Some(0));
    c.wait_ring(2);
    let p = v5::connect(v5::options("leave-pub", c.nodes[1].tcp)).await;
    p.publish("leave/test", v5::QoS::AtLeastOnce, false, "kept")
        .await;
    let mut opts = v5::options(&id, c.nodes[1].tcp);
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(600));
    let mut back = v5::connect(opts).await;
    assert!(back.connack.session_present);
    assert_eq!(&back.next_publish().await.payload[..], b"kept");

    // Drain (what the operator calls before scaling down): the node hands
    // every session over and leaves the ring while it keeps running.
    let (status, body) = c.nodes[0].post("/cluster/drain");
    assert_eq!(status, 202, "{body}");
    // Unready while leaving, so that a Service sends new clients elsewhere.
    let (status, body) = c.nodes[0].http("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("leaving"), "{body}");
    let deadline = tokio::time::Instant::now() + WAIT;
    while c.nodes[0].metric("ringmq_sessions") > 0.0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.nodes[0].metric("ringmq_sessions"), 0.0);
    // The drained node is off the ring of the node that stays.
    while c.nodes[1].metric("ringmq_cluster_nodes") != 1.0 && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.nodes[1].metric("ringmq_cluster_nodes"), 1.0);
}

/// Three nodes, `n2` in a network namespace whose cluster links the test
/// can cut; `None` (the test skipped, said on stderr) where namespaces
/// cannot be made.
fn split_cluster(test: &str) -> Option<(Netns, Cluster)> {
    let Some(ns) = Netns::create() else {
        // Needs root (CAP_NET_ADMIN), as CI has; elsewhere the test cannot run.
        eprintln!("SKIPPED: {test} needs network namespaces");
        return None;
    };
    let mut c = Cluster::start_on(2, "", &ns.host_ip);
    c.add_in_netns("n2", &ns.name, &ns.ns_ip, &ns.client_ip);
    c.wait_ring(3);
    Some((ns, c))
}

#[tokio::test]
async fn a_partitioned_node_serves_alone_and_its_sessions_find_their_owners_when_it_heals() {
    let Some((ns, c)) = split_cluster("a_partitioned_node") else {
        return;
    };
    let p = c.nodes[2].tcp;
    let owned_by_n0 = owned_by("n0", &c.names, "GID_test@@@stray");

    ns.set(false);
    // Each side sees the other gone within the failure timeout.
    let deadline = tokio::time::Instant::now() + WAIT;
    while (c.nodes[0].metric("ringmq_cluster_nodes") != 2.0
        || c.nodes[1].metric("ringmq_cluster_nodes") != 2.0)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.nodes[1].metric("ringmq_cluster_nodes"), 2.0);
    // The majority side works on its own.
    let mut sub = v5::connect(v5::options("majority-sub", c.nodes[1].tcp)).await;
    sub.subscribe("side/a", v5::QoS::AtLeastOnce).await;
    tokio::time::sleep(QUIET).await;
    let pb = v5::connect(v5::options("majority-pub", c.nodes[0].tcp)).await;
    pb.publish("side/a", v5::QoS::AtLeastOnce, false, "majority")
        .await;
    assert_eq!(&sub.next_publish().await.payload[..], b"majority");
    // The cut-off node serves the clients that reach it, as a ring of one: a
    // session that belongs to n0 is created there, with a queued message.
    let mut opts = v3::options_at(&owned_by_n0, &ns.client_ip, p);
    opts.set_clean_session(false);
    let mut stray = v3::connect(opts).await;
    stray.subscribe("stray/box", v3::QoS::AtLeastOnce).await;
    stray.disconnect().await;
    let local = v3::connect(v3::options_at("minority-pub", &ns.client_ip, p)).await;
    local
        .publish(
            "stray/box",
            v3::QoS::AtLeastOnce,
            false,
            "queued on the minority side",
        )
        .await;
    tokio::time::sleep(QUIET).await;

    ns.set(true);
    c.wait_ring(3);
    // Healed: the session created on the wrong side moved to its owner.
    let deadline = tokio::time::Instant::now() + WAIT;
    while c.nodes[0].metric("ringmq_sessions") < 1.0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut back = persistent(&owned_by_n0, c.nodes[1].tcp).await;
    assert!(back.connack.session_present);
    assert_eq!(
        &back.next_publish().await.payload[..],
        b"queued on the minority side"
    );
}

/// D2 under a partition: the owner of a persistent session is cut off and
/// keeps serving the session to the clients that reach it, while the other
/// side serves it from its replica. A message acknowledged on each side
/// while they are apart is there after the partition heals: the two
/// states are merged, as README "Cluster" says.
#[tokio::test]
async fn a_session_served_on_both_sides_of_a_partition_keeps_what_each_side_acknowledged() {
    let Some((ns, c)) = split_cluster("a_session_served_on_both_sides") else {
        return;
    };
    let id = owned_by("n2", &c.names, "GID_test@@@split");
    let mut s = persistent(&id, c.nodes[0].tcp).await;
    s.subscribe("split/#", v3::QoS::AtLeastOnce).await;
    s.disconnect().await;
    // The replica has the subscription before the cut.
    tokio::time::sleep(QUIET).await;

    ns.set(false);
    let deadline = tokio::time::Instant::now() + WAIT;
    while (c.nodes[0].metric("ringmq_cluster_nodes") != 2.0
        || c.nodes[2].metric("ringmq_cluster_nodes") != 1.0)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.nodes[2].metric("ringmq_cluster_nodes"), 1.0);
    // Each side acknowledges one message for the session (MQTT 5: a
    // publish refused while the majority takes the session over says so,
    // and is sent again).
    let majority = v5::connect(v5::options("split-pub-a", c.nodes[0].tcp)).await;
    let minority = v5::connect(v5::options_at("split-pub-b", &ns.client_ip, c.nodes[2].tcp)).await;
    for (mut p, m) in [(majority, "majority"), (minority, "minority")] {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            p.publish("split/x", v5::QoS::AtLeastOnce, false, m).await;
            let reason = loop {
                if let P5::PubAck(a) = common::recv(&mut p.rx, "PUBACK").await {
                    break a.reason;
                }
            };
            if matches!(reason, v5::PubAckReason::Success) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{m} refused: {reason:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    ns.set(true);
    c.wait_ring(3);
    c.nodes[2].wait_ready();
    let mut s = persistent(&id, c.nodes[0].tcp).await;
    assert!(s.connack.session_present);
    let mut got = BTreeSet::new();
    while got.len() < 2 {
        got.insert(String::from_utf8_lossy(&s.next_publish().await.payload).into_owned());
    }
    assert_eq!(got, ["majority", "minority"].map(String::from).into());
}

/// Percent-encodes a form value.
fn form(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A token service request signed the seed's way (HmacSHA1 of the sorted
/// parameters with the SecretKey, Base64), sent as a GET query.
fn token_call(node: &Broker, op: &str, params: &[(&str, &str)]) -> serde_json::Value {
    use base64::Engine as _;
    use hmac::Mac as _;
    let base = ringmq_broker::token::canonical(params);
    let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(b"SK_cluster_secret")
        .unwrap_or_else(|e| panic!("{e}"));
    mac.update(base.as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let mut query: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{k}={}", form(v)))
        .collect();
    query.push(format!("signature={}", form(&signature)));
    query.push("accessKey=AK_cluster".into());
    query.push("proxyType=MQTT".into());
    let (status, body) = node.http(&format!("/token/{op}?{}", query.join("&")));
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[tokio::test]
async fn a_token_revoked_on_one_node_is_refused_on_every_node() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let creds = dir.path().join("credentials.yaml");
    std::fs::write(
        &creds,
        "access_keys:\n  - access_key: AK_cluster\n    secret_key: SK_cluster_secret\ngroup_ids: [GID_token]\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let key = dir.path().join("signing-key");
    std::fs::write(&key, "one-signing-key-for-every-node").unwrap_or_else(|e| panic!("{e}"));
    let extra = format!(
        "auth:\n  credentials_file: {}\n  token_signing_key_file: {}\n",
        creds.display(),
        key.display()
    );
    let c = Cluster::start(2, &extra);
    let expire = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
        + 600_000)
        .to_string();
    let answer = token_call(
        &c.nodes[0],
        "apply",
        &[
            ("actions", "W"),
            ("resources", "tok/#"),
            ("expireTime", &expire),
            ("serviceName", "mq"),
        ],
    );
    let token = answer["tokenData"].as_str().unwrap_or_default().to_owned();
    assert!(!token.is_empty(), "{answer}");

    // The device's session lives on n1 (it connects through n0); the token
    // service answers on n0. MQTT 3.1.1, so that the notice is read before
    // the connection closes (rumqttc's MQTT 5 client drops a PUBLISH that
    // arrives together with DISCONNECT).
    let id = owned_by("n1", &c.names, "GID_token@@@dev");
    let mut opts = v3::options(&id, c.nodes[0].tcp);
    opts.set_credentials("Token|AK_cluster|instance-1", "");
    let mut dev = v3::connect(opts).await;
    let upload = serde_json::json!({"token": token, "type": "W"}).to_string();
    dev.publish("$SYS/uploadToken", v3::QoS::AtLeastOnce, false, upload)
        .await;
    tokio::time::sleep(QUIET).await;
    // Allowed: no notice, the connection stays.
    dev.publish("tok/a", v3::QoS::AtLeastOnce, false, "allowed")
        .await;
    dev.no_publish().await;

    let answer = token_call(&c.nodes[0], "revoke", &[("token", &token)]);
    assert_eq!(answer["code"], 200, "{answer}");
    tokio::time::sleep(QUIET).await;
    dev.publish("tok/a", v3::QoS::AtLeastOnce, false, "refused")
        .await;
    let notice = match tokio::time::timeout(WAIT, dev.rx.recv()).await {
        Ok(Some(Packet::Publish(p))) => p,
        other => {
            for n in &c.nodes {
                eprintln!("---- node log\n{}", n.log());
            }
            panic!("no notice: {other:?}");
        }
    };
    assert_eq!(notice.topic, "$SYS/tokenInvalidNotice");
    let body: serde_json::Value = serde_json::from_slice(&notice.payload).unwrap_or_default();
    assert_eq!(body, serde_json::json!({"code": 3, "type": "W"}));
    dev.closed().await;
}
