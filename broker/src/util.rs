//! Small things the whole crate uses and that depend on nothing of it.

/// A map on the message path, keyed by what clients send (topic levels,
/// Client IDs). SipHash, std's default, showed as 3 % of a QoS 1 profile;
/// foldhash is several times faster and still randomly seeded per map.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
