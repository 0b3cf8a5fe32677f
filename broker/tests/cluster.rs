//! Clusters of real broker processes on loopback (SPEC C1–C5): clients on
//! any node behave as on one broker.

mod common;

use std::collections::HashMap;

use common::{Broker, Cluster, QUIET, v4 as v3, v5};
use rumqttc::v5::mqttbytes::v5::Packet as P5;

#[tokio::test]
async fn three_nodes_form_one_ring_and_a_stranger_is_refused() {
    let mut c = Cluster::start(3, "");
    let wrong = c.nodes[0].dir.path().join("wrong-secret");
    std::fs::write(&wrong, "not the secret").unwrap_or_else(|e| panic!("{e}"));
    c.add_named("stranger", &wrong);
    let stranger = c.nodes.pop().unwrap_or_else(|| panic!("no stranger"));
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
    let mut opts = v3::options("GID_test@@@sleepy", c.nodes[0].tcp);
    opts.set_clean_session(false);
    let mut s = v3::connect(opts.clone()).await;
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
    let mut opts = v3::options("GID_test@@@sleepy", c.nodes[1].tcp);
    opts.set_clean_session(false);
    let mut s = v3::connect(opts).await;
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
    let mut watcher = v5::connect(v5::options("watcher", c.nodes[0].tcp)).await;
    watcher.subscribe("alive/#", v5::QoS::AtLeastOnce).await;
    let victim_port = c.nodes[2].tcp;
    let mut on_victim = v5::connect(v5::options("GID_test@@@victim-client", victim_port)).await;
    let victim: Broker = c.nodes.remove(2);
    drop(victim); // SIGKILL
    assert!(matches!(
        tokio::time::timeout(common::WAIT, on_victim.rx.recv()).await,
        Ok(Some(P5::Disconnect(_)))
    ));
    c.wait_ring(2);
    // The client comes back through a surviving node and works at once.
    let back = v5::connect(v5::options("GID_test@@@victim-client", c.nodes[1].tcp)).await;
    back.publish("alive/again", v5::QoS::AtLeastOnce, false, "hi")
        .await;
    assert_eq!(&watcher.next_publish().await.payload[..], b"hi");
}
