//! Topic names, topic filters and Client IDs: validation and matching.
//!
//! This is the parsing the project does itself (ntex-mqtt decodes packets), so
//! it is what the fuzz target exercises.

/// Why a topic, filter or Client ID was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("empty topic")]
    Empty,
    #[error("topic longer than {0} characters")]
    TooLong(usize),
    #[error("wildcard in a topic name")]
    WildcardInName,
    #[error("misplaced wildcard in a topic filter")]
    BadWildcard,
    #[error("character not allowed by the strict-names rule")]
    StrictNames,
    #[error("invalid shared subscription")]
    BadShare,
    #[error("NUL character in topic")]
    Nul,
}

/// Why a Client ID was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientIdError {
    #[error("Client ID longer than {0} characters")]
    TooLong(usize),
    #[error("Client ID has no Group ID (GroupID@@@DeviceID required)")]
    GroupIdRequired,
    #[error("invalid Group ID (GID_ followed by 3 to 28 letters, digits or underscores)")]
    BadGroupId,
    #[error("invalid Device ID")]
    BadDeviceId,
}

pub type Result<T> = std::result::Result<T, TopicError>;

const GROUP_SEPARATOR: &str = "@@@";

/// A Client ID split into its Group ID and Device ID (B8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdParts<'a> {
    pub group_id: Option<&'a str>,
    pub device_id: &'a str,
}

/// Checks a Client ID against the product rules and splits it.
pub fn parse_client_id(
    client_id: &str,
    max_len: usize,
    require_group: bool,
    strict: bool,
) -> std::result::Result<ClientIdParts<'_>, ClientIdError> {
    if client_id.chars().count() > max_len {
        return Err(ClientIdError::TooLong(max_len));
    }
    let Some((group, device)) = client_id.split_once(GROUP_SEPARATOR) else {
        if require_group {
            return Err(ClientIdError::GroupIdRequired);
        }
        if strict && !client_id.chars().all(is_strict_name_char) {
            return Err(ClientIdError::BadDeviceId);
        }
        return Ok(ClientIdParts {
            group_id: None,
            device_id: client_id,
        });
    };
    if !is_valid_group_id(group) {
        return Err(ClientIdError::BadGroupId);
    }
    if device.is_empty()
        || device.contains(GROUP_SEPARATOR)
        || (strict && !device.chars().all(is_strict_name_char))
    {
        return Err(ClientIdError::BadDeviceId);
    }
    Ok(ClientIdParts {
        group_id: Some(group),
        device_id: device,
    })
}

/// `GID_` followed by letters, digits or underscores, 7 to 32 characters in all.
pub fn is_valid_group_id(group: &str) -> bool {
    group.starts_with("GID_")
        && (7..=32).contains(&group.len())
        && group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn is_strict_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

fn check_common(topic: &str, max_len: usize) -> Result<()> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.chars().count() > max_len {
        return Err(TopicError::TooLong(max_len));
    }
    if topic.contains('\0') {
        return Err(TopicError::Nul);
    }
    Ok(())
}

/// Validates a topic name of a PUBLISH (no wildcards).
pub fn validate_name(topic: &str, max_len: usize, strict: bool) -> Result<()> {
    check_common(topic, max_len)?;
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    if strict
        && !topic.starts_with('$')
        && !topic.chars().all(|c| is_strict_name_char(c) || c == '/')
    {
        return Err(TopicError::StrictNames);
    }
    Ok(())
}

/// A parsed subscription filter: `$share/<group>/<filter>` or a plain filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter<'a> {
    pub share_group: Option<&'a str>,
    pub filter: &'a str,
}

/// Validates a topic filter of a SUBSCRIBE, including shared subscriptions.
pub fn parse_filter(raw: &str, max_len: usize, strict: bool) -> Result<Filter<'_>> {
    check_common(raw, max_len)?;
    let (share_group, filter) = match raw.strip_prefix("$share/") {
        Some(rest) => {
            let (group, filter) = rest.split_once('/').ok_or(TopicError::BadShare)?;
            if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
                return Err(TopicError::BadShare);
            }
            (Some(group), filter)
        }
        None => (None, raw),
    };
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        match level {
            "#" if levels.peek().is_some() => return Err(TopicError::BadWildcard),
            "#" | "+" => {}
            l if l.contains(['+', '#']) => return Err(TopicError::BadWildcard),
            l if strict && !l.starts_with('$') && !l.chars().all(is_strict_name_char) => {
                return Err(TopicError::StrictNames);
            }
            _ => {}
        }
    }
    Ok(Filter {
        share_group,
        filter,
    })
}

/// Whether a topic name matches a (valid, non-shared) filter, with the MQTT rule
/// that wildcards at the first level do not match `$` topics.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether every topic matched by `inner` is also matched by `outer`
/// (both valid, non-shared filters): a grant on `outer` covers `inner`.
pub fn filter_covers(outer: &str, inner: &str) -> bool {
    if inner.starts_with('$') != outer.starts_with('$') && outer.starts_with(['+', '#']) {
        return false;
    }
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    loop {
        match (o.next(), i.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(l)) if l != "#" => {}
            (Some(ol), Some(il)) if ol == il && il != "+" && il != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether some topic is matched by both filters (valid, non-shared).
pub fn filters_overlap(a: &str, b: &str) -> bool {
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some(p), Some(q)) if p == "+" || q == "+" || p == q => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The level separator as a pattern for the per-message paths: a `char`
/// pattern finds each `/` and then compares it through a `memcmp` call (2 %
/// of a QoS 1 profile); a one-element set tests the characters in place.
pub const SEPARATOR: [char; 1] = ['/'];

/// The parent topic: the first level of a topic (B9).
pub fn parent_topic(topic: &str) -> &str {
    topic.split(SEPARATOR).next().unwrap_or(topic)
}

/// The target Client ID of a P2P topic `<parent>/p2p/<clientId>` (B10).
pub fn p2p_target(topic: &str) -> Option<&str> {
    let mut parts = topic.splitn(3, SEPARATOR);
    let _parent = parts.next()?;
    match (parts.next(), parts.next()) {
        (Some("p2p"), Some(target)) if !target.is_empty() => Some(target),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_matching() {
        assert!(matches("a/+/c", "a/b/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("a/+", "a/"));
        assert!(matches("+", ""));
        assert!(!matches("a/b", "a/b/c"));
    }

    #[test]
    fn filters_are_validated() {
        assert!(parse_filter("a/#/b", 64, false).is_err());
        assert!(parse_filter("a/b#", 64, false).is_err());
        assert!(parse_filter("a+/b", 64, false).is_err());
        assert_eq!(
            parse_filter("$share/g1/a/+", 64, false),
            Ok(Filter {
                share_group: Some("g1"),
                filter: "a/+"
            })
        );
        assert!(parse_filter("$share/g1", 64, false).is_err());
        assert!(parse_filter("$share//a", 64, false).is_err());
        assert_eq!(
            parse_filter(&"a".repeat(65), 64, false),
            Err(TopicError::TooLong(64))
        );
        assert_eq!(
            parse_filter("a b/c", 64, true),
            Err(TopicError::StrictNames)
        );
    }

    #[test]
    fn names_are_validated() {
        assert_eq!(
            validate_name("a/+", 64, false),
            Err(TopicError::WildcardInName)
        );
        assert_eq!(validate_name("", 64, false), Err(TopicError::Empty));
        assert!(validate_name("a b", 64, false).is_ok());
        assert_eq!(validate_name("a b", 64, true), Err(TopicError::StrictNames));
    }

    /// Found by the `topic` fuzz target: `$share/` is a valid topic name but,
    /// as a filter, a shared subscription that needs a group and a filter.
    #[test]
    fn share_prefix_as_name_and_as_filter() {
        for raw in ["$share/", "$share//"] {
            assert!(validate_name(raw, 64, false).is_ok());
            assert_eq!(parse_filter(raw, 64, false), Err(TopicError::BadShare));
        }
    }

    #[test]
    fn client_ids() {
        let p = parse_client_id("GID_test@@@dev-1", 128, true, true);
        assert_eq!(
            p,
            Ok(ClientIdParts {
                group_id: Some("GID_test"),
                device_id: "dev-1"
            })
        );
        assert_eq!(
            parse_client_id("dev1", 128, true, false),
            Err(ClientIdError::GroupIdRequired)
        );
        assert!(parse_client_id("dev1", 128, false, false).is_ok());
        assert_eq!(
            parse_client_id("GID_ab@@@d", 128, false, false),
            Err(ClientIdError::BadGroupId)
        );
        assert_eq!(
            parse_client_id("GID_abc@@@", 128, false, false),
            Err(ClientIdError::BadDeviceId)
        );
        assert_eq!(
            parse_client_id(&"x".repeat(129), 128, false, false),
            Err(ClientIdError::TooLong(128))
        );
    }

    #[test]
    fn grant_coverage_and_overlap() {
        assert!(filter_covers("#", "a/b/+"));
        assert!(filter_covers("a/#", "a"));
        assert!(filter_covers("a/+", "a/b"));
        assert!(filter_covers("a/+/c", "a/+/c"));
        assert!(!filter_covers("a/+", "a/#"));
        assert!(!filter_covers("a/b", "a/+"));
        assert!(!filter_covers("a/b", "a/b/c"));
        assert!(!filter_covers("#", "$SYS/x"));
        assert!(filters_overlap("test/nosubscribe", "test/#"));
        assert!(filters_overlap("a/+/c", "a/b/+"));
        assert!(!filters_overlap("a/b", "a/c"));
        assert!(!filters_overlap("a/b", "a/b/c"));
    }

    #[test]
    fn p2p_and_parent() {
        assert_eq!(p2p_target("t/p2p/GID_a@@@d"), Some("GID_a@@@d"));
        assert_eq!(p2p_target("t/x/p2p/c"), None);
        assert_eq!(parent_topic("t/a/b"), "t");
    }
}
