//! Replicated sessions, the broker's part (D2): the copies this node keeps
//! for other nodes (`replica::Replicas`), serving them when their owner is
//! lost, and sending the sessions this node owns whole to replicas that
//! are new or may have missed changes (a link that came up again).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{Broker, gauge};
use crate::durable::{self, Change, RecoveredSession};
use crate::peers::{Handover, Peers};
use crate::replica::Replication;
use crate::ring::Ring;
use crate::session::Session;

/// What this node has sent whole to its replicas.
#[derive(Debug, Default)]
pub(super) struct Resync {
    /// Per peer, the link stream on which every session this node owns and
    /// the peer keeps went out whole.
    synced: Mutex<HashMap<Arc<str>, u64>>,
    /// The ring the last pass sent for.
    ring: Mutex<Arc<Ring>>,
    running: AtomicBool,
    again: AtomicBool,
}

/// Sessions sent whole between two looks at the link's queue.
const RESYNC_STEP: usize = 64;

impl Broker {
    /// A change of a session `from` owns, for the copy kept here.
    pub fn replica_change(&self, from: &Arc<str>, stream: u64, client: &str, change: Change) {
        self.replicas.apply(from, stream, client, change);
    }

    /// A session `from` handed over without its stored messages
    /// (`Handover::copy`): they are taken from the copy kept here, if it
    /// holds what `from` holds. False: no such copy (`from` then sends the
    /// session whole).
    pub fn messages_from_copy(&self, from: &str, h: &mut Handover) -> bool {
        let Some(expected) = h.copy.take() else {
            return true;
        };
        let Some(messages) = self.replicas.take_matching(&h.client_id, from, expected) else {
            tracing::info!(client_id = %h.client_id, from, "a session handed over for its copy here refused: the copy differs; it comes whole");
            return false;
        };
        for mut d in messages {
            d.unnumber();
            if d.dup {
                h.resend.push(d);
            } else {
                h.offline.push(d);
            }
        }
        self.metrics.sessions_moved_in_from_copy.inc();
        self.count_replicas();
        true
    }

    /// `from` sent every session this node keeps for it whole on `stream`.
    pub fn replicas_synced(&self, from: &str, stream: u64) {
        self.replicas.synced(from, stream);
    }

    /// The ring changed or a link came up: serves the copies whose owner
    /// is lost and that this node owns now, drops the copies it no longer
    /// keeps, and sends the sessions it owns to replicas that lack them.
    pub(super) fn replicate_ring(self: &Arc<Self>) {
        let (Some(c), Some(r)) = (&self.peers, &self.replication) else {
            return;
        };
        let ring = c.ring();
        let mut lost: Vec<Arc<str>> = Vec::new();
        let serving = self
            .serving_copies
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let taken = self.replicas.promotable(|client, from| {
            let serve = self.owner_lost(c, &ring, client, from);
            if serve && !lost.iter().any(|l| **l == *from) {
                lost.push(Arc::from(from));
            }
            serve
        });
        let opened = self.take_over(taken);
        drop(serving);
        self.merge_copies(opened);
        // The failover time, once per lost owner: from its last word to
        // its sessions served here (the kill itself is not seen here).
        for node in lost {
            if let Some(t) = c.last_heard(&node) {
                self.metrics
                    .failover_seconds
                    .observe(t.elapsed().as_secs_f64());
            }
        }
        self.replicas.retain(|client, from| {
            crate::replica::keeps_copy(&ring, r.factor(), client, from, |n| c.is_local(n))
                || c.is_handing_over(from)
        });
        self.count_replicas();
        self.start_resync();
    }

    /// Copies whose owner left the ring without handing them over, of
    /// Client IDs another node owns now (one that came back with an older
    /// copy in its store, or joined): taken, to be sent to that node whole
    /// as a moving session is, so that the newest state is the one served.
    pub(super) fn orphaned_copies(&self) -> Vec<(Arc<str>, Handover)> {
        let (Some(c), Some(_)) = (&self.peers, &self.replication) else {
            return Vec::new();
        };
        let ring = c.ring();
        let lost =
            |from: &str| !ring.nodes().iter().any(|n| **n == *from) && !c.is_handing_over(from);
        self.replicas
            .promotable(|client, from| {
                ring.owner(client).is_some_and(|o| !c.is_local(o)) && lost(from)
            })
            .into_iter()
            .filter_map(|rs| {
                // A clean session's will is published by the Client ID's
                // new owner from the copy it keeps (the owner's successor
                // keeps one); one sent there could be published twice.
                if rs.record.is_clean() {
                    return None;
                }
                let owner = ring.owner(&rs.client)?.clone();
                Some((owner, handover_of(rs)))
            })
            .collect()
    }

    /// Whether this node serves `client`'s copy now: it owns the Client
    /// ID and the copy's owner left the ring without handing it over.
    fn owner_lost(&self, c: &Arc<dyn Peers>, ring: &Ring, client: &str, from: &str) -> bool {
        ring.owner(client).is_some_and(|o| c.is_local(o))
            && !ring.nodes().iter().any(|n| **n == *from)
            && !c.is_handing_over(from)
    }

    /// A client connects: if the session here is one this node read back
    /// from its store after a restart and has not served since, another
    /// node may have served it meanwhile and be handing it back now (a
    /// node owns its Client IDs again as soon as it is on the ring, before
    /// the session's newer state arrives). The connection waits until
    /// that state arrived (it replaces the stale copy), or every peer said
    /// it has handed over what it holds for this ring (`is_settled`: the
    /// hand-overs are ahead of that word on each link), at most twice the
    /// failure timeout. Served at once, the stale copy sent messages
    /// another node had already delivered and released: a QoS 2 message
    /// came twice.
    pub async fn await_current(&self, client: &str) {
        let Some(c) = &self.peers else {
            return;
        };
        let Some(session) = self.sessions.get(client) else {
            return;
        };
        let stale = || session.lock().stale_upto.is_some();
        if !stale() {
            return;
        }
        let deadline = Instant::now() + self.settle_bound();
        while stale() && !c.is_settled() && Instant::now() < deadline {
            ntex::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::debug!(
            client_id = client,
            waited_for_handover = !stale(),
            "a restored session served"
        );
    }

    /// A client connects to a session this node owns: if a lost owner's
    /// copy of it is here and not served yet, it is served now, so that
    /// the client finds it (`session_present`) even before the next ring
    /// pass.
    pub(super) fn claim_copy(self: &Arc<Self>, client: &str) {
        let Some(c) = &self.peers else {
            return;
        };
        if self.replication.is_none() || self.sessions.get(client).is_some() {
            return;
        }
        // After a ring pass that is serving copies: its session is here then.
        let serving = self
            .serving_copies
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.sessions.get(client).is_some() {
            return;
        }
        let ring = c.ring();
        let taken = self
            .replicas
            .take_one(client, |from, _| self.owner_lost(c, &ring, client, from));
        // A clean session's copy publishes its will (the connection that
        // ended with the lost node) before the client's new one attaches.
        let opened = self.take_over(taken.into_iter().collect());
        drop(serving);
        self.merge_copies(opened);
    }

    /// A copy arrives (`Handover::from_copy`) while this node keeps a
    /// replica of the same session of that epoch or newer: that replica
    /// is the state its owner served after the copy was made (the copy's
    /// node had handed the session to it and took it back unconfirmed, or
    /// kept a copy from before the owner's restart). Returned, to be
    /// taken in first, so that the copy gives way to it rather than
    /// replace it: the copy's sender found that owner lost, and this node
    /// finds it lost too a moment later (seen from here, the owner may
    /// still be on the ring). A clean connection's will kept here is no
    /// such state, and stays.
    pub(super) fn newer_copy_here(&self, client: &str, epoch: u64) -> Option<Handover> {
        self.replicas
            .take_one(client, |_, r| !r.is_clean() && r.epoch >= epoch)
            .map(handover_of)
    }

    /// Serves copies as sessions of this node, as sessions read back from
    /// a store, each then written whole to this node's store and its
    /// replicas. Returns the copies whose client opened a session here
    /// first, for `merge_copies` (after `serving_copies` is let go: a merge
    /// may start a ring pass).
    fn take_over(self: &Arc<Self>, taken: Vec<RecoveredSession>) -> Vec<RecoveredSession> {
        let (clean, taken): (Vec<_>, Vec<_>) =
            taken.into_iter().partition(|rs| rs.record.is_clean());
        for rs in clean {
            self.publish_lost_will(rs);
        }
        if taken.is_empty() {
            return Vec::new();
        }
        tracing::info!(
            sessions = taken.len(),
            "sessions of a lost node served from their replicas"
        );
        self.metrics
            .sessions_failed_over
            .inc_by(u64::try_from(taken.len()).unwrap_or(u64::MAX));
        let (fresh, opened): (Vec<_>, Vec<_>) = taken
            .into_iter()
            .partition(|rs| self.sessions.get(&rs.client).is_none());
        for session in self.restore_sessions(fresh, true) {
            let mut st = session.lock();
            // A new owner: a copy of the lost owner's state that surfaces
            // later is older than this.
            st.epoch = st.epoch.saturating_add(1);
            session.save_all(&mut st, None);
        }
        self.metrics.sessions.set(gauge(self.sessions.len()));
        opened
    }

    /// Merges copies into the sessions their clients opened here first.
    fn merge_copies(self: &Arc<Self>, opened: Vec<RecoveredSession>) {
        for rs in opened {
            self.install_session(handover_of(rs), &mut durable::Pending::detached());
        }
    }

    /// The copy of a lost node's clean session: its client was connected
    /// there, so the connection ended with the node, abnormally, and its
    /// will is published here, once (no delay is left: a clean session
    /// ends with its connection, and the will with it). No session is
    /// made of it.
    fn publish_lost_will(&self, rs: RecoveredSession) {
        let Some(will) = rs.record.armed_will else {
            return;
        };
        tracing::info!(client_id = %rs.client, topic = %will.msg.topic, "the will of a lost node's clean-session client published");
        self.metrics.wills_failed_over.inc();
        self.publish_will(&will.msg, rs.record.ordered, false);
    }

    /// Starts sending sessions whole to the replicas that lack them, or
    /// asks the pass under way to run again.
    fn start_resync(self: &Arc<Self>) {
        self.resync.again.store(true, Ordering::Release);
        if self.resync.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let broker = self.clone();
        ntex::rt::spawn(async move {
            while broker.resync.again.swap(false, Ordering::AcqRel) {
                broker.resync_pass().await;
            }
            broker.resync.running.store(false, Ordering::Release);
            // A request that came in after the last pass and before the flag
            // was cleared.
            if broker.resync.again.load(Ordering::Acquire) {
                broker.start_resync();
            }
        });
    }

    /// One pass: every persistent session this node owns goes whole to
    /// each of its replicas that was not one on the last pass's ring, or
    /// whose link came up since; then each such link is told it has all.
    async fn resync_pass(self: &Arc<Self>) {
        let (Some(c), Some(r)) = (self.peers.clone(), self.replication.clone()) else {
            return;
        };
        let ring = c.ring();
        let before = self
            .resync
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let streams: HashMap<Arc<str>, u64> = c.streams().into_iter().collect();
        let fresh: Vec<(Arc<str>, u64)> = {
            let synced = self
                .resync
                .synced
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            streams
                .iter()
                .filter(|(n, s)| synced.get(*n) != Some(*s))
                .map(|(n, s)| (n.clone(), *s))
                .collect()
        };
        let mut under = 0_usize;
        for (i, session) in self.sessions.all().into_iter().enumerate() {
            let client = &session.client_id;
            if !ring.owner(client).is_some_and(|o| c.is_local(o)) {
                continue;
            }
            let now = r.replicas_of(&ring, client);
            let had = r.replicas_of(&before, client);
            if resync_session(&r, &session, &now, &had, &fresh) && now.len() + 1 < r.factor() {
                under += 1;
            }
            if i % RESYNC_STEP == RESYNC_STEP - 1 {
                // Let the links drain what went out before sending more.
                for node in &now {
                    c.room(node, Duration::from_secs(5)).await;
                }
            }
        }
        for (node, stream) in fresh {
            r.synced(&node, stream).await;
            self.resync
                .synced
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(node, stream);
        }
        *self
            .resync
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = ring;
        self.metrics.sessions_under_replicated.set(gauge(under));
    }

    /// Updates the gauges of the copies kept here.
    pub fn count_replicas(&self) {
        let k = self.replicas.count();
        self.metrics.replica_sessions.set(gauge(k.sessions));
        self.metrics.replica_messages.set(gauge(k.messages));
        self.metrics.replica_wills.set(gauge(k.wills));
    }
}

/// Sends `session` whole to each of its replicas `now` that was not one on
/// the last pass's ring (`had`), or whose link came up since (`fresh`). A
/// clean session's connection with a will sends its record (the will),
/// without messages. True for a persistent session.
fn resync_session(
    r: &Replication,
    session: &Session,
    now: &[Arc<str>],
    had: &[Arc<str>],
    fresh: &[(Arc<str>, u64)],
) -> bool {
    let st = session.lock();
    let will_only = !st.persistent && st.armed_will.is_some();
    if !(st.persistent || will_only) || st.moved_to.is_some() {
        return false;
    }
    let lacking = now
        .iter()
        .filter(|n| !had.contains(n) || fresh.iter().any(|(f, _)| f == *n));
    for node in lacking {
        if will_only {
            r.send_whole(node, &session.client_id, st.record(), std::iter::empty());
        } else {
            r.send_whole(node, &session.client_id, st.record(), st.stored());
        }
    }
    st.persistent
}

/// A copy merged into the session its client opened before the copy was
/// served: its subscriptions and messages join it.
fn handover_of(mut rs: RecoveredSession) -> Handover {
    rs.drop_released();
    let now = Instant::now();
    let now_ms = crate::message::now_ms();
    // A will waiting for its delay, or the will of the connection that
    // ended with the lost owner (due after its delay from now).
    let will = rs
        .record
        .will
        .take()
        .map(|w| (w.msg, w.due_ms))
        .or_else(|| {
            let w = rs.record.armed_will.take()?;
            (rs.record.disconnected_ms == 0).then(|| (w.msg, now_ms.saturating_add(w.delay_ms)))
        });
    let disconnected = durable::disconnected_at(&rs.record, now, crate::message::now_ms());
    let expiry = Duration::from_millis(rs.record.expiry_ms)
        .saturating_sub(now.saturating_duration_since(disconnected));
    Handover {
        client_id: rs.client.to_string(),
        expiry,
        ordered: rs.record.ordered,
        subscriptions: rs.record.subscriptions,
        resend: Vec::new(),
        since: Vec::new(),
        offline: rs
            .messages
            .into_iter()
            .map(|mut d| {
                d.unnumber();
                d
            })
            .collect(),
        qos2_received: rs.record.qos2_ids,
        released: rs.record.released.iter().map(|r| r.id).collect(),
        will,
        epoch: rs.record.epoch,
        from_copy: true,
        copy: None,
    }
}
