//! The seed's event payloads: `['content' => X]` on `broadcast`, and
//! `['to_connection_id' => C, 'content' => X]` on a worker's own channel, PHP-serialized so that
//! PHP publishers and gateways on the same channel server understand them.

use bytes::Bytes;
use channel_proto::Value;

/// The channel every gateway worker listens on for pushes to all clients.
pub const BROADCAST: &str = "broadcast";

/// One push as a gateway worker sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    /// `None` for a broadcast.
    pub to_connection_id: Option<Vec<u8>>,
    pub content: Vec<u8>,
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
        let v = match &self.to_connection_id {
            Some(c) => Value::assoc([("to_connection_id", Value::str(c)), content]),
            None => Value::assoc([content]),
        };
        v.encode().into()
    }

    /// Read a payload; PHP scalars are turned into strings as PHP's `send()` would.
    pub fn decode(data: &[u8]) -> Result<Push, PushError> {
        let v = Value::parse(data)?;
        let content = v.get("content").and_then(Value::to_php_string).ok_or(PushError::NoContent)?;
        let to_connection_id = v.get("to_connection_id").and_then(Value::to_php_string);
        Ok(Push { to_connection_id, content })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_payloads() {
        let p = Push { to_connection_id: Some(b"2".to_vec()), content: b"hi".to_vec() };
        assert_eq!(&p.encode()[..], b"a:2:{s:16:\"to_connection_id\";s:1:\"2\";s:7:\"content\";s:2:\"hi\";}");
        assert_eq!(Push::decode(&p.encode()).unwrap(), p);
        let from_php_int = Push::decode(b"a:2:{s:16:\"to_connection_id\";i:7;s:7:\"content\";i:5;}").unwrap();
        assert_eq!(from_php_int.to_connection_id.as_deref(), Some(&b"7"[..]));
        assert_eq!(from_php_int.content, b"5");
        assert!(matches!(Push::decode(b"a:0:{}"), Err(PushError::NoContent)));
        assert!(matches!(Push::decode(b"junk"), Err(PushError::NotPhp(_))));
    }
}
