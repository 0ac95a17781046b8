//! The seed's event payloads: `['content' => X]` on `broadcast`, and
//! `['to_connection_id' => C, 'content' => X]` on a worker's own channel, PHP-serialized so that
//! PHP publishers and gateways on the same channel server understand them. Pushes to a user go to
//! the broker channel `user:U`, to a topic to `topic:T` (names PHP nodes never subscribe to), with
//! the same payload; `exclude_uid` (a list) leaves users out.

use bytes::Bytes;
use channel_proto::Value;

/// The channel every gateway worker listens on for pushes to all clients.
pub const BROADCAST: &str = "broadcast";

/// Longest node id (`--node-id`).
pub const MAX_NODE_ID: usize = 64;

/// Whether `id` can be a node id: 1 to [`MAX_NODE_ID`] ASCII letters, digits, `_` and `-`.
pub fn valid_node_id(id: &str) -> bool {
    (1..=MAX_NODE_ID).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `id` names a gateway worker: a pushwire worker id `NODE-N` (the node part may carry a
/// `.EPOCH`), or a PHP worker's number. `broadcast` and internal channels are not workers.
pub fn is_worker_id(id: &str) -> bool {
    match id.rsplit_once('-') {
        None => !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()),
        Some((node, n)) => {
            let node_ok = node.split('.').all(valid_node_id);
            node_ok && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
        }
    }
}

/// Longest user or topic name, in bytes.
pub const MAX_NAME: usize = 128;

/// Whether `name` can be a user id or a topic: 1 to [`MAX_NAME`] ASCII letters, digits and
/// `_ - . : @ = / +`. A clear message says why not.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!("{what} must be 1 to {MAX_NAME} characters"));
    }
    match name.bytes().find(|&b| !(b.is_ascii_alphanumeric() || b"_-.:@=/+".contains(&b))) {
        Some(b) => Err(format!("{what} {name:?} has {:?}; use letters, digits and _-.:@=/+", b as char)),
        None => Ok(()),
    }
}

/// The broker channel of user `uid`'s connections.
pub fn user_channel(uid: &str) -> String {
    format!("user:{uid}")
}

/// The broker channel of topic `topic`.
pub fn topic_channel(topic: &str) -> String {
    format!("topic:{topic}")
}

/// Whether publishes on `channel` keep history: `broadcast`, users' and topics' channels. Worker
/// channels (pushes to one connection, whose id does not outlive it) and internal ones do not.
pub fn keeps_history(channel: &[u8]) -> bool {
    std::str::from_utf8(channel).ok().and_then(Audience::of).is_some()
}

/// Whom a channel reaches by interest: every connection (`broadcast`), a user's (`user:U`), a
/// topic's (`topic:T`). These are the channels that keep history; a worker's own channel and
/// internal ones are none of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience<'a> {
    All,
    User(&'a str),
    Topic(&'a str),
}

impl<'a> Audience<'a> {
    /// The audience of broker channel `channel`, if it is one of the three kinds.
    pub fn of(channel: &'a str) -> Option<Audience<'a>> {
        match channel.split_once(':') {
            _ if channel == BROADCAST => Some(Audience::All),
            Some(("user", u)) => Some(Audience::User(u)),
            Some(("topic", t)) => Some(Audience::Topic(t)),
            _ => None,
        }
    }
}

/// One push as a gateway worker sees it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Push {
    /// `None` for a broadcast.
    pub to_connection_id: Option<Vec<u8>>,
    pub content: Vec<u8>,
    /// Users whose connections do not get this push.
    pub exclude_uid: Vec<Vec<u8>>,
}

/// Why an event payload is not a push.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("event data is not a serialized PHP value: {0}")]
    NotPhp(#[from] channel_proto::ValueError),
    #[error("event data has no scalar `content`")]
    NoContent,
}

impl Push {
    /// The serialized payload, as the seed's publisher builds it.
    pub fn encode(&self) -> Bytes {
        let content = ("content", Value::str(&self.content));
        let v = match (&self.to_connection_id, self.exclude_uid.is_empty()) {
            (Some(c), _) => Value::assoc([("to_connection_id", Value::str(c)), content]),
            (None, true) => Value::assoc([content]),
            (None, false) => {
                Value::assoc([content, ("exclude_uid", Value::list(self.exclude_uid.iter().map(Value::str)))])
            }
        };
        v.encode().into()
    }

    /// Read a payload; PHP scalars are turned into strings as PHP's `send()` would.
    pub fn decode(data: &[u8]) -> Result<Push, PushError> {
        let v = Value::parse(data)?;
        let content = v.get("content").and_then(Value::to_php_string).ok_or(PushError::NoContent)?;
        let to_connection_id = v.get("to_connection_id").and_then(Value::to_php_string);
        let exclude_uid = match v.get("exclude_uid") {
            Some(Value::Array(items)) => items.iter().filter_map(|(_, u)| u.to_php_string()).collect(),
            _ => Vec::new(),
        };
        Ok(Push { to_connection_id, content, exclude_uid })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_ids() {
        for ok in ["3f9a0c1b2d4e-0", "web1.lx2k9a1b-12", "a_b-c-3", "0", "17"] {
            assert!(is_worker_id(ok), "{ok}");
        }
        for bad in ["broadcast", "", "-1", "web1-", "web1-x", "pushwire:ack:1f-0", "a b-1", "web1..x-0", "x.-0"] {
            assert!(!is_worker_id(bad), "{bad}");
        }
        assert!(valid_node_id("web-1_a") && !valid_node_id("web.1") && !valid_node_id(&"x".repeat(65)));
    }

    #[test]
    fn seed_payloads() {
        let p = Push { to_connection_id: Some(b"2".to_vec()), content: b"hi".to_vec(), ..Push::default() };
        assert_eq!(&p.encode()[..], b"a:2:{s:16:\"to_connection_id\";s:1:\"2\";s:7:\"content\";s:2:\"hi\";}");
        assert_eq!(Push::decode(&p.encode()).unwrap(), p);
        let from_php_int = Push::decode(b"a:2:{s:16:\"to_connection_id\";i:7;s:7:\"content\";i:5;}").unwrap();
        assert_eq!(from_php_int.to_connection_id.as_deref(), Some(&b"7"[..]));
        assert_eq!(from_php_int.content, b"5");
        assert!(matches!(Push::decode(b"a:0:{}"), Err(PushError::NoContent)));
        assert!(matches!(Push::decode(b"junk"), Err(PushError::NotPhp(_))));
        let broadcast = Push { content: b"x".to_vec(), ..Push::default() };
        assert_eq!(&broadcast.encode()[..], b"a:1:{s:7:\"content\";s:1:\"x\";}", "the seed's bytes");
        let ex = Push { content: b"x".to_vec(), exclude_uid: vec![b"7".to_vec(), b"u".to_vec()], ..Push::default() };
        assert_eq!(Push::decode(&ex.encode()).unwrap(), ex);
    }

    #[test]
    fn names() {
        for ok in ["42", "user@example.com", "order:17", "a/b.c=d+e_f-g"] {
            assert!(check_name("uid", ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a,b", "é", &"x".repeat(MAX_NAME + 1)] {
            assert!(check_name("uid", bad).is_err(), "{bad}");
        }
        assert_eq!(user_channel("42"), "user:42");
        assert!(!is_worker_id(&user_channel("42")) && !is_worker_id(&topic_channel("t-1")));
        assert_eq!(Audience::of(&user_channel("a:b")), Some(Audience::User("a:b")));
        assert_eq!(Audience::of(&topic_channel("t")), Some(Audience::Topic("t")));
        assert_eq!(Audience::of(BROADCAST), Some(Audience::All));
        for none in ["3f9a-0", "pushwire:ack:1", "users:x", "broadcasts"] {
            assert_eq!(Audience::of(none), None, "{none}");
        }
    }
}
