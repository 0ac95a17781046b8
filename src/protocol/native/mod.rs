//! The native protocol: the seed's (`workerID:W connectionID:C connected`, then each push's
//! content as it was published) and what pushwire adds when a client asks for it (`format=json`,
//! `recover=`, a `token` naming a user and topics). Its clients' messages are checked and
//! dropped without being kept.
//!
//! Parts: [`push`] (the broker payloads publishers and PHP nodes send, and the names of the
//! channels they go to), [`json`] (`format=json` messages), [`token`] (who a connection is).

pub mod json;
pub mod push;
pub mod token;

use bytes::Bytes;

use self::push::Audience;
use self::token::Identity;
use super::{BoxFuture, Engine, Held, Protocol};

/// The seed's protocol: its connections are held by the engine with their user and topics, and
/// get the welcome line (or JSON) from [`welcome`].
pub struct Native;

impl Protocol for Native {
    const READS: bool = false;
    const HELD: Held = Held::Native;
    /// Nothing: what the connection asked for ([`Wants`]) goes to the engine when it opens.
    type Session = ();

    fn on_message<'a>(_: &'a mut Self::Session, _: &'a mut dyn Engine, _: bool, _: Bytes) -> BoxFuture<'a, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// The first message of a connection: the seed's line, or JSON with `format=json`.
pub fn welcome(worker: &str, connection: u64, wants: Option<&Wants>) -> Vec<u8> {
    match wants {
        Some(w) if w.json => json::welcome(worker, connection, w.who.uid.as_deref(), &w.who.channels),
        _ => format!("workerID:{worker} connectionID:{connection} connected\n").into_bytes(),
    }
}

/// What a connection asks for beyond the seed's plain URL: who it is (`token`), JSON messages
/// (`format=json`), and what to recover (`recover=C:E:N,...`). Boxed, and absent for a seed client.
#[derive(Debug, Default, PartialEq)]
pub struct Wants {
    pub who: Identity,
    pub json: bool,
    pub recover: Vec<Recover>,
}

/// One channel to recover: the client saw offset `offset` of epoch `epoch` last.
#[derive(Debug, Clone, PartialEq)]
pub struct Recover {
    pub channel: String,
    pub epoch: String,
    pub offset: u64,
}

/// Most channels one `recover=` may name (a connection is in `broadcast`, its user's channel and
/// at most 256 topics).
pub const MAX_RECOVER: usize = 258;

impl Wants {
    /// Read `format` and `recover` from a connection's `query` for a connection of `who`; other
    /// parameters are the application's (the seed's clients may add their own). An event stream's
    /// `last_event_id` (a position `C:E:N` of a JSON stream) recovers C from there; one that is
    /// not such a position is ignored, so that `EventSource` never stops reconnecting over it.
    pub fn parse(query: Option<&str>, who: Identity, last_event_id: Option<&str>) -> Result<Wants, String> {
        let mut w = Wants { who, ..Wants::default() };
        let mut recover = None;
        for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match &*k {
                "format" => match &*v {
                    "json" => w.json = true,
                    "text" => {}
                    other => return Err(format!("format={other:?}: use json (or text, the default)")),
                },
                "recover" if recover.is_some() => return Err("parameter \"recover\" given twice".into()),
                "recover" => recover = Some(v.into_owned()),
                _ => {}
            }
        }
        if let Some(recover) = recover {
            if !w.json {
                return Err("recover= needs format=json (the client is told what was recovered)".into());
            }
            for item in recover.split(',').filter(|i| !i.is_empty()) {
                let r = w.position(item)?;
                if w.recover.iter().any(|x| x.channel == r.channel) {
                    return Err(format!("recover names {:?} twice", r.channel));
                }
                w.recover.push(r);
                if w.recover.len() > MAX_RECOVER {
                    return Err(format!("recover names more than {MAX_RECOVER} channels"));
                }
            }
        }
        if let Some(r) = last_event_id.filter(|_| w.json).and_then(|id| w.position(id).ok()) {
            w.recover.retain(|x| x.channel != r.channel);
            w.recover.push(r);
        }
        Ok(w)
    }

    /// A position `CHANNEL:EPOCH:OFFSET` on a channel of this connection.
    fn position(&self, item: &str) -> Result<Recover, String> {
        let mut parts = item.rsplitn(3, ':');
        let (Some(n), Some(epoch), Some(channel)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("recover item {item:?} is not CHANNEL:EPOCH:OFFSET"));
        };
        let offset = n.parse().map_err(|_| format!("recover item {item:?}: offset {n:?} is not a number"))?;
        if epoch.is_empty() || epoch.len() > 64 || !epoch.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(format!("recover item {item:?}: epoch {epoch:?} is not one this server hands out"));
        }
        let member = match Audience::of(channel) {
            Some(Audience::All) => true,
            Some(Audience::User(u)) => self.who.uid.as_deref() == Some(u),
            Some(Audience::Topic(t)) => self.who.channels.iter().any(|c| c == t),
            None => false,
        };
        if !member {
            return Err(format!(
                "recover names {channel:?}, not a channel of this connection (broadcast, user:UID of its token, \
                 topic:T of its token's channels)"
            ));
        }
        Ok(Recover { channel: channel.to_owned(), epoch: epoch.to_owned(), offset })
    }
}
