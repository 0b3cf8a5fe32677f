//! Topic names, filters and Client IDs from arbitrary bytes: never a panic,
//! and the matching rules hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringmq_broker::topic;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (a, b) = s.split_once('\n').unwrap_or((s, s));
    let _ = topic::parse_client_id(a, 128, false, false);
    let _ = topic::parse_client_id(a, 128, true, true);
    let _ = topic::p2p_target(a);
    let _ = topic::parent_topic(a);
    let name_ok = topic::validate_name(b, 65_535, false).is_ok();
    if let Ok(f) = topic::parse_filter(a, 65_535, false) {
        let _ = topic::matches(f.filter, b);
    }
    if name_ok && !b.starts_with("$share/") {
        // A topic name is also a valid filter that matches exactly itself
        // (except under `$share/`, where a filter names a shared group).
        assert!(topic::parse_filter(b, 65_535, false).is_ok());
        assert!(topic::matches(b, b));
        assert_eq!(topic::matches("#", b), !b.starts_with('$'));
    }
});
