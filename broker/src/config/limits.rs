//! `limits`: session, queue and protocol limits (B4, B5, B6, B12).

use serde::{Deserialize, Serialize};

use super::Problems;

/// Limits of the product specification (B4, B5, B6, B12).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest MQTT packet accepted, in bytes.
    pub max_packet_size: u32,
    /// Longest topic name or filter, in characters.
    pub max_topic_length: usize,
    /// Longest Client ID, in characters.
    pub max_client_id_length: usize,
    /// Subscriptions per client; 0 means unlimited.
    pub max_subscriptions_per_client: usize,
    /// Seconds a persistent session outlives its connection; also the cap of an
    /// MQTT 5 session expiry interval.
    pub session_expiry_secs: u32,
    /// Offline messages kept per persistent session; the oldest is dropped first.
    pub offline_queue_len: usize,
    /// Seconds an offline message is kept.
    pub offline_message_ttl_secs: u64,
    /// Offline messages pushed in one batch after CONNECT.
    pub offline_batch: usize,
    /// Seconds between two offline batches.
    pub offline_batch_interval_secs: u64,
    /// `$SYS/getOfflineMsg` pulls allowed per client per second.
    pub offline_pulls_per_sec: u32,
    /// Messages waiting for an online client. Beyond it QoS 0 messages are
    /// dropped (counted); QoS 1/2 ones are still queued (up to twice the
    /// limit, or the limit plus `receive_maximum`), and their publishers'
    /// acknowledgements wait until the queue is down to half the limit, so
    /// publishers slow down to the subscriber's pace.
    pub max_queued_messages: usize,
    /// Longest time a PUBLISH acknowledgement waits for room in a subscriber
    /// queue, milliseconds.
    pub queue_full_wait_ms: u64,
    /// QoS 1/2 messages in flight towards one client (capped by its receive maximum).
    pub max_inflight: u16,
    /// QoS 1/2 messages a client may have in flight towards the broker (MQTT 5
    /// receive maximum).
    pub receive_maximum: u16,
    /// Topic aliases per direction with an MQTT 5 client (those it may use, and
    /// at most those the broker uses towards it).
    pub topic_alias_maximum: u16,
    /// Keep-alive (seconds) enforced for clients that ask for none; 0 keeps such
    /// connections open until the peer goes away.
    pub default_keep_alive_secs: u16,
    /// Largest keep-alive (seconds) granted; a client asking for more gets this
    /// value as the MQTT 5 Server Keep Alive (3.1.1 clients are closed after 1.5
    /// times it). 0 grants whatever the client asks.
    pub max_keep_alive_secs: u16,
    /// Seconds a client has to send CONNECT after the TCP handshake (and
    /// again for the rest of it once its first bytes arrived).
    pub connect_timeout_secs: u16,
    /// File descriptors MQTT connections leave free under the open-file
    /// limit (at most a quarter of it), for the admin port, cluster links,
    /// Kafka and the journal; past the rest, new MQTT connections are closed
    /// at once (counted as `fd_limit`).
    pub reserved_file_descriptors: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_packet_size: 128 * 1024,
            max_topic_length: 64,
            max_client_id_length: 128,
            max_subscriptions_per_client: 30,
            session_expiry_secs: 2 * 3600,
            offline_queue_len: 10,
            offline_message_ttl_secs: 3 * 24 * 3600,
            offline_batch: 30,
            offline_batch_interval_secs: 5,
            offline_pulls_per_sec: 5,
            max_queued_messages: 1000,
            queue_full_wait_ms: 10_000,
            max_inflight: 32,
            receive_maximum: 64,
            topic_alias_maximum: 32,
            default_keep_alive_secs: 0,
            max_keep_alive_secs: 0,
            connect_timeout_secs: 10,
            reserved_file_descriptors: 256,
        }
    }
}

impl LimitsConfig {
    pub(super) fn check(&self, p: &mut Problems) {
        p.unless(
            (64..=268_435_455).contains(&self.max_packet_size),
            "limits.max_packet_size must be between 64 and 268435455",
        );
        p.unless(
            (1..=65_535).contains(&self.max_topic_length),
            "limits.max_topic_length must be between 1 and 65535",
        );
        p.unless(
            (1..=65_535).contains(&self.max_client_id_length),
            "limits.max_client_id_length must be between 1 and 65535",
        );
        p.unless(
            self.connect_timeout_secs > 0,
            "limits.connect_timeout_secs must be at least 1",
        );
        p.unless(
            self.offline_batch > 0,
            "limits.offline_batch must be at least 1",
        );
        p.unless(
            self.max_inflight > 0 && self.receive_maximum > 0,
            "limits.max_inflight and limits.receive_maximum must be at least 1",
        );
        p.unless(
            self.max_queued_messages > 0,
            "limits.max_queued_messages must be at least 1",
        );
        p.unless(
            self.offline_pulls_per_sec > 0,
            "limits.offline_pulls_per_sec must be at least 1",
        );
    }
}
