//! Leader election against the fake API server: which replica holds the
//! Lease, when another may take it over, and what a holder does when it
//! loses it. Time is tokio's paused clock, so the lease duration passes
//! without waiting.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use ringmq_operator::lease::{Config, Elector};
use serde_json::{Value, json};

mod fakeapi;
use fakeapi::{Shared, fake_api};

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/ringmq-operator";

fn elector(client: &kube::Client, identity: &str) -> Elector {
    Elector::new(
        Api::<Lease>::namespaced(client.clone(), "ops"),
        Config {
            name: "ringmq-operator".into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        },
    )
}

fn lease(state: &Shared) -> Value {
    state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .objects
        .get(LEASE)
        .cloned()
        .unwrap_or(Value::Null)
}

async fn try_lead(e: &mut Elector) -> bool {
    e.try_acquire_or_renew()
        .await
        .unwrap_or_else(|err| panic!("{err}"))
}

#[tokio::test(start_paused = true)]
async fn one_replica_leads_and_another_takes_over_only_once_the_lease_expired() {
    let state = Shared::default();
    let client = fake_api(state.clone());
    let mut a = elector(&client, "op-a");
    let mut b = elector(&client, "op-b");
    assert!(
        try_lead(&mut a).await,
        "the first replica creates the Lease"
    );
    assert!(!try_lead(&mut b).await);
    assert_eq!(lease(&state)["spec"]["holderIdentity"], "op-a");
    assert_eq!(lease(&state)["spec"]["leaseDurationSeconds"], 15);
    // The holder renews: the other replica's wait starts again.
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(try_lead(&mut a).await);
    assert!(!try_lead(&mut b).await);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(
        !try_lead(&mut b).await,
        "10 s since the last renewal it saw"
    );
    // The holder stopped renewing: after the lease duration it is taken.
    tokio::time::advance(Duration::from_secs(6)).await;
    assert!(try_lead(&mut b).await);
    let l = lease(&state);
    assert_eq!(l["spec"]["holderIdentity"], "op-b");
    assert_eq!(l["spec"]["leaseTransitions"], 1);
    assert!(
        !try_lead(&mut a).await,
        "the old holder does not take it back"
    );
}

#[tokio::test(start_paused = true)]
async fn a_released_lease_is_taken_at_once() {
    let state = Shared::default();
    let client = fake_api(state.clone());
    let mut a = elector(&client, "op-a");
    let mut b = elector(&client, "op-b");
    assert!(try_lead(&mut a).await);
    assert!(!try_lead(&mut b).await);
    a.release().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(lease(&state)["spec"]["holderIdentity"].is_null());
    assert!(try_lead(&mut b).await, "no wait for an expiry");
    // Releasing what another replica holds changes nothing.
    a.release().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(lease(&state)["spec"]["holderIdentity"], "op-b");
}

#[tokio::test(start_paused = true)]
async fn a_write_over_a_changed_lease_loses() {
    let state = Shared::default();
    let client = fake_api(state.clone());
    let mut a = elector(&client, "op-a");
    assert!(try_lead(&mut a).await);
    // Another replica wrote the Lease after this one read it (the API
    // server's optimistic concurrency): the stale write is refused.
    let mut stale: Lease = serde_json::from_value(lease(&state)).unwrap_or_else(|e| panic!("{e}"));
    let mut b = elector(&client, "op-b");
    tokio::time::advance(Duration::from_secs(20)).await;
    assert!(!try_lead(&mut b).await);
    tokio::time::advance(Duration::from_secs(16)).await;
    assert!(try_lead(&mut b).await, "expired: op-b takes it");
    if let Some(spec) = stale.spec.as_mut() {
        spec.holder_identity = Some("op-a".into());
    }
    let api = Api::<Lease>::namespaced(client.clone(), "ops");
    let refused = api
        .replace("ringmq-operator", &Default::default(), &stale)
        .await;
    assert!(
        matches!(refused, Err(kube::Error::Api(ref s)) if s.code == 409),
        "{refused:?}"
    );
    assert_eq!(lease(&state)["spec"]["holderIdentity"], "op-b");
}

#[tokio::test(start_paused = true)]
async fn a_holder_stops_when_another_replica_holds_the_lease() {
    let state = Shared::default();
    let client = fake_api(state.clone());
    let mut a = elector(&client, "op-a");
    a.acquire().await;
    let holding = Arc::new(tokio::sync::Notify::new());
    let done = holding.clone();
    let task = tokio::spawn(async move {
        a.hold().await;
        done.notify_one();
    });
    // Renewals keep it: a minute later it still leads.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!task.is_finished());
    assert_eq!(lease(&state)["spec"]["holderIdentity"], "op-a");
    // Taken over (it was partitioned away, say): it stops leading.
    {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = st.objects.get_mut(LEASE) {
            l["spec"]["holderIdentity"] = json!("op-b");
        }
    }
    tokio::time::timeout(Duration::from_secs(30), holding.notified())
        .await
        .unwrap_or_else(|_| panic!("still holding after another replica took the lease"));
    task.await.unwrap_or_else(|e| panic!("{e}"));
}
