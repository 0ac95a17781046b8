//! Typed Channel messages: what clients ask ([`Request`]) and what the server sends
//! ([`ServerMessage`]).
//!
//! The `data` of a publish or enqueue is kept as the serialized bytes the peer sent (checked, not
//! re-encoded), so a server forwards it to subscribers byte for byte and encodes it zero times.

use bytes::Bytes;

use crate::value::{array_spans, encode_str, Key, Value, ValueError};

/// A channel or queue name. PHP may send `i:0;` or `s:1:"0";` for the same name; both compare
/// and hash equal, and the form the peer used is kept so that events echo it.
#[derive(Debug, Clone)]
pub struct Name {
    bytes: Bytes,
    int: bool,
}

impl Name {
    /// A string name.
    pub fn new(name: impl Into<Bytes>) -> Name {
        Name { bytes: name.into(), int: false }
    }

    /// The name's bytes (an integer name as its decimal digits).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The name as text, with invalid UTF-8 replaced.
    pub fn to_string_lossy(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    fn from_value(v: Value) -> Option<Name> {
        match v {
            Value::Int(i) => Some(Name { bytes: i.to_string().into(), int: true }),
            Value::Str(s) => Some(Name { bytes: s.into(), int: false }),
            _ => None,
        }
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        if self.int {
            out.extend_from_slice(b"i:");
            out.extend_from_slice(&self.bytes);
            out.push(b';');
        } else {
            encode_str(&self.bytes, out);
        }
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        self.bytes == other.bytes
    }
}
impl Eq for Name {}
impl std::hash::Hash for Name {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.bytes.hash(state)
    }
}
impl std::borrow::Borrow<[u8]> for Name {
    fn borrow(&self) -> &[u8] {
        &self.bytes
    }
}

/// Why a well-formed value is not a valid Channel message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("payload is not a PHP array: {0}")]
    NotArray(#[source] ValueError),
    #[error("message has no string `type`")]
    MissingType,
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("message of type {kind} lacks `{field}`")]
    MissingField { kind: &'static str, field: &'static str },
    #[error("`{0}` must be a list of int or string names")]
    BadNames(&'static str),
    #[error("an authentication secret is required before any other message")]
    AuthRequired,
}

/// A client-to-server message.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Subscribe(Vec<Name>),
    Unsubscribe(Vec<Name>),
    /// Deliver `data` to every subscriber of each channel.
    Publish {
        channels: Vec<Name>,
        data: Bytes,
        /// pushwire extension: keep the message in its channel's history, within these bounds
        /// (two more keys, `keep_size` and `keep_ttl`, which PHP's server ignores). `None`: as
        /// the server decides for publishers that do not say.
        keep: Option<Keep>,
    },
    /// Deliver `data` to one subscriber of each channel, round-robin.
    PublishLoop {
        channels: Vec<Name>,
        data: Bytes,
    },
    Watch(Vec<Name>),
    Unwatch(Vec<Name>),
    Enqueue {
        channels: Vec<Name>,
        data: Bytes,
    },
    /// Ready for one more queue item.
    Reserve,
    /// pushwire extension: the shared secret of a protected channel server. Sent first.
    Auth(Bytes),
}

/// How a published message is kept in its channel's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    /// At most this many of the channel's latest messages are kept.
    pub size: u64,
    /// For at most this many milliseconds.
    pub ttl_ms: u64,
}

/// What a server sends to a client.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerMessage {
    pub kind: ServerKind,
    pub channel: Name,
    /// The serialized `data` value.
    pub data: Bytes,
    /// pushwire extension: the message's place in its channel's history (offset, epoch), sent
    /// only to clients that asked for it, as two more keys of the event.
    pub position: Option<(u64, Bytes)>,
}

/// The two kinds of server message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// A publish on a subscribed channel.
    Event,
    /// One item of a watched queue.
    Queue,
}

/// The top-level entries of a message, parsed once: each value's bytes and its parsed form.
struct Fields {
    payload: Bytes,
    entries: Vec<(Key, std::ops::Range<usize>, Value)>,
}

impl Fields {
    fn parse(payload: &Bytes) -> Result<Fields, MessageError> {
        let entries = array_spans(payload).map_err(MessageError::NotArray)?;
        Ok(Fields { payload: payload.clone(), entries })
    }

    fn entry(&mut self, key: &str) -> Option<&mut (Key, std::ops::Range<usize>, Value)> {
        self.entries.iter_mut().find(|(k, ..)| matches!(k, Key::Str(s) if s == key.as_bytes()))
    }

    /// The value's bytes as the peer sent them.
    fn raw(&mut self, key: &str) -> Option<Bytes> {
        let range = self.entry(key)?.1.clone();
        Some(self.payload.slice(range))
    }

    /// The parsed value, taken out (each field is read once).
    fn take(&mut self, key: &str) -> Option<Value> {
        self.entry(key).map(|e| std::mem::replace(&mut e.2, Value::Null))
    }

    fn kind(&mut self) -> Result<String, MessageError> {
        match self.take("type") {
            Some(Value::Str(s)) => Ok(String::from_utf8_lossy(&s).into_owned()),
            _ => Err(MessageError::MissingType),
        }
    }

    fn names(&mut self, kind: &'static str) -> Result<Vec<Name>, MessageError> {
        let field = "channels";
        match self.take(field) {
            Some(Value::Array(items)) => {
                items.into_iter().map(|(_, v)| Name::from_value(v).ok_or(MessageError::BadNames(field))).collect()
            }
            // A single name is accepted too, as PHP's `(array)` cast would.
            Some(v @ (Value::Int(_) | Value::Str(_))) => Ok(Name::from_value(v).into_iter().collect()),
            Some(_) => Err(MessageError::BadNames(field)),
            None => Err(MessageError::MissingField { kind, field }),
        }
    }

    fn data(&mut self, kind: &'static str) -> Result<Bytes, MessageError> {
        self.raw("data").ok_or(MessageError::MissingField { kind, field: "data" })
    }
}

impl Request {
    /// Decode a frame payload (not a ping: the caller handles empty payloads).
    pub fn parse(payload: &Bytes) -> Result<Request, MessageError> {
        let mut f = Fields::parse(payload)?;
        let kind = f.kind()?;
        Ok(match kind.as_str() {
            "subscribe" => Request::Subscribe(f.names("subscribe")?),
            "unsubscribe" => Request::Unsubscribe(f.names("unsubscribe")?),
            "publish" => {
                let (channels, data) = (f.names("publish")?, f.data("publish")?);
                let keep = match (f.take("keep_size"), f.take("keep_ttl")) {
                    (Some(Value::Int(size)), Some(Value::Int(ttl))) if size >= 0 && ttl >= 0 => {
                        Some(Keep { size: size as u64, ttl_ms: ttl as u64 })
                    }
                    _ => None,
                };
                Request::Publish { channels, data, keep }
            }
            "publishLoop" => Request::PublishLoop { channels: f.names("publishLoop")?, data: f.data("publishLoop")? },
            "watch" => Request::Watch(f.names("watch")?),
            "unwatch" => Request::Unwatch(f.names("unwatch")?),
            "enqueue" => Request::Enqueue { channels: f.names("enqueue")?, data: f.data("enqueue")? },
            "reserve" => Request::Reserve,
            "auth" => match f.take("secret") {
                Some(Value::Str(s)) => Request::Auth(s.into()),
                _ => return Err(MessageError::MissingField { kind: "auth", field: "secret" }),
            },
            _ => return Err(MessageError::UnknownType(kind)),
        })
    }

    /// The `type` string of this request.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Subscribe(_) => "subscribe",
            Request::Unsubscribe(_) => "unsubscribe",
            Request::Publish { .. } => "publish",
            Request::PublishLoop { .. } => "publishLoop",
            Request::Watch(_) => "watch",
            Request::Unwatch(_) => "unwatch",
            Request::Enqueue { .. } => "enqueue",
            Request::Reserve => "reserve",
            Request::Auth(_) => "auth",
        }
    }

    /// Encode as PHP's Channel client does (key order `type`, `channels`, `data`).
    pub fn encode(&self) -> Vec<u8> {
        let (names, data): (Option<&[Name]>, Option<&Bytes>) = match self {
            Request::Subscribe(n) | Request::Unsubscribe(n) | Request::Watch(n) | Request::Unwatch(n) => {
                (Some(n), None)
            }
            Request::Publish { channels, data, .. }
            | Request::PublishLoop { channels, data }
            | Request::Enqueue { channels, data } => (Some(channels), Some(data)),
            Request::Reserve | Request::Auth(_) => (None, None),
        };
        let keep = match self {
            Request::Publish { keep, .. } => *keep,
            _ => None,
        };
        let count = 1
            + names.is_some() as usize
            + data.is_some() as usize
            + matches!(self, Request::Auth(_)) as usize
            + 2 * keep.is_some() as usize;
        let mut out = Vec::with_capacity(64 + data.map_or(0, |d| d.len()));
        out.extend_from_slice(format!("a:{count}:{{").as_bytes());
        encode_str(b"type", &mut out);
        encode_str(self.kind().as_bytes(), &mut out);
        if let Some(names) = names {
            encode_str(b"channels", &mut out);
            out.extend_from_slice(format!("a:{}:{{", names.len()).as_bytes());
            for (i, n) in names.iter().enumerate() {
                out.extend_from_slice(format!("i:{i};").as_bytes());
                n.encode_into(&mut out);
            }
            out.push(b'}');
        }
        if let Some(data) = data {
            encode_str(b"data", &mut out);
            out.extend_from_slice(data);
        }
        if let Request::Auth(secret) = self {
            encode_str(b"secret", &mut out);
            encode_str(secret, &mut out);
        }
        if let Some(k) = keep {
            // PHP integers are signed: larger bounds are sent as the largest.
            let int = |n: u64| format!("i:{};", n.min(i64::MAX as u64));
            encode_str(b"keep_size", &mut out);
            out.extend_from_slice(int(k.size).as_bytes());
            encode_str(b"keep_ttl", &mut out);
            out.extend_from_slice(int(k.ttl_ms).as_bytes());
        }
        out.push(b'}');
        out
    }
}

impl ServerMessage {
    /// Decode a server-to-client payload.
    pub fn parse(payload: &Bytes) -> Result<ServerMessage, MessageError> {
        let mut f = Fields::parse(payload)?;
        let kind = match f.kind()?.as_str() {
            "event" => ServerKind::Event,
            "queue" => ServerKind::Queue,
            other => return Err(MessageError::UnknownType(other.to_owned())),
        };
        let name = match kind {
            ServerKind::Event => "event",
            ServerKind::Queue => "queue",
        };
        let channel = f
            .take("channel")
            .and_then(Name::from_value)
            .ok_or(MessageError::MissingField { kind: name, field: "channel" })?;
        let data = f.data(name)?;
        let position = match (f.take("offset"), f.take("epoch")) {
            (Some(Value::Int(o)), Some(Value::Str(e))) if o > 0 => Some((o as u64, e.into())),
            _ => None,
        };
        Ok(ServerMessage { kind, channel, data, position })
    }

    /// Encode one server message; `data` is spliced in as the serialized bytes it is.
    pub fn encode_parts(kind: ServerKind, channel: &Name, data: &[u8]) -> Vec<u8> {
        Self::encode_at(kind, channel, data, None)
    }

    /// [`ServerMessage::encode_parts`] with the message's history position, if any.
    pub fn encode_at(kind: ServerKind, channel: &Name, data: &[u8], position: Option<(u64, &[u8])>) -> Vec<u8> {
        let mut out = Vec::with_capacity(96 + channel.bytes.len() + data.len());
        out.extend_from_slice(if position.is_some() { b"a:5:{" } else { b"a:3:{" });
        out.extend_from_slice(b"s:4:\"type\";");
        out.extend_from_slice(match kind {
            ServerKind::Event => b"s:5:\"event\";",
            ServerKind::Queue => b"s:5:\"queue\";",
        });
        out.extend_from_slice(b"s:7:\"channel\";");
        channel.encode_into(&mut out);
        out.extend_from_slice(b"s:4:\"data\";");
        out.extend_from_slice(data);
        if let Some((offset, epoch)) = position {
            out.extend_from_slice(format!("s:6:\"offset\";i:{offset};s:5:\"epoch\";").as_bytes());
            encode_str(epoch, &mut out);
        }
        out.push(b'}');
        out
    }

    /// Encode this message.
    pub fn encode(&self) -> Vec<u8> {
        Self::encode_at(self.kind, &self.channel, &self.data, self.position.as_ref().map(|(o, e)| (*o, &e[..])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_and_string_names_are_one_name() {
        let a = Name::from_value(Value::Int(0)).unwrap();
        let b = Name::new("0");
        assert_eq!(a, b);
        let mut out = Vec::new();
        a.encode_into(&mut out);
        assert_eq!(out, b"i:0;");
    }

    #[test]
    fn errors_are_specific() {
        let p = |s: &str| Request::parse(&Bytes::from(s.to_owned()));
        assert_eq!(p("a:1:{s:4:\"type\";s:7:\"explode\";}"), Err(MessageError::UnknownType("explode".into())));
        assert_eq!(p("a:0:{}"), Err(MessageError::MissingType));
        assert_eq!(
            p("a:2:{s:4:\"type\";s:7:\"publish\";s:8:\"channels\";a:0:{}}"),
            Err(MessageError::MissingField { kind: "publish", field: "data" })
        );
        assert_eq!(
            p("a:2:{s:4:\"type\";s:9:\"subscribe\";s:8:\"channels\";a:1:{i:0;N;}}"),
            Err(MessageError::BadNames("channels"))
        );
        assert!(matches!(p("i:1;"), Err(MessageError::NotArray(_))));
    }

    #[test]
    fn positions_round_trip() {
        let m = ServerMessage {
            kind: ServerKind::Event,
            channel: Name::new("topic:a"),
            data: Bytes::from_static(b"N;"),
            position: Some((7, Bytes::from_static(b"ab12cd34"))),
        };
        let encoded = m.encode();
        assert!(encoded.starts_with(b"a:5:{s:4:\"type\";s:5:\"event\";"));
        assert_eq!(ServerMessage::parse(&Bytes::from(encoded)).unwrap(), m);
        let plain = ServerMessage { position: None, ..m };
        assert_eq!(ServerMessage::parse(&Bytes::from(plain.encode())).unwrap(), plain);
    }

    #[test]
    fn keep_round_trips_and_a_plain_publish_stays_as_php_sends_it() {
        let data = Bytes::from_static(b"s:2:\"hi\";");
        let publish = |keep| Request::Publish { channels: vec![Name::new("c")], data: data.clone(), keep };
        let kept = publish(Some(Keep { size: 1, ttl_ms: 1_800_000 }));
        let encoded = kept.encode();
        assert!(
            encoded.starts_with(b"a:5:{") && encoded.ends_with(b"s:9:\"keep_size\";i:1;s:8:\"keep_ttl\";i:1800000;}")
        );
        assert_eq!(Request::parse(&Bytes::from(encoded)).unwrap(), kept);
        let most = publish(Some(Keep { size: u64::MAX, ttl_ms: i64::MAX as u64 }));
        let parsed = Request::parse(&Bytes::from(most.encode())).unwrap();
        assert!(matches!(parsed, Request::Publish { keep: Some(Keep { size, .. }), .. } if size == i64::MAX as u64));
        let plain = publish(None);
        assert_eq!(
            plain.encode(),
            b"a:3:{s:4:\"type\";s:7:\"publish\";s:8:\"channels\";a:1:{i:0;s:1:\"c\";}s:4:\"data\";s:2:\"hi\";}"
        );
    }

    #[test]
    fn auth_round_trip() {
        let r = Request::Auth(Bytes::from_static(b"s3cret"));
        assert_eq!(Request::parse(&Bytes::from(r.encode())).unwrap(), r);
    }
}
