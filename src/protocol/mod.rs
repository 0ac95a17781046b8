//! Client protocols: what a connection's client sends and is sent, on top of the gateway's
//! transport (WebSocket frames, compression, bounded queues, heartbeats) and its engine (workers,
//! fan-out). The gateway picks a connection's protocol from the path of its upgrade request.
//!
//! - [`native::Native`]: the seed's protocol (welcome line, pushes; `format=json`, `recover=`, tokens):
//!   on every path but the ones other protocols are served on. Its clients' messages are checked
//!   and dropped without being kept.
//! - [`echo::Echo`]: every client message sent back (a conformance endpoint, `--echo-path`).
//! - [`pusher::Pusher`]: the Pusher Channels protocol (version 7) on `/app/KEY`, for the apps a
//!   gateway is given.

pub mod echo;
pub mod native;
pub mod pusher;

pub use native::Native;

use std::borrow::Cow;

use bytes::Bytes;

use crate::history::{Keep, Position};

/// How a connection gets a push, whatever carries it (WebSocket, event stream) and whether it is
/// compressed: the engine encodes each push at most once per kind of connection per worker
/// (per encoding, transport and compression) and shares the frame among them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The push's content as published (the seed's connections).
    Raw,
    /// The native protocol's JSON object (`format=json`): channel, position, content.
    NativeJson,
    /// A Pusher event, as published (its JSON, made once by the publisher).
    Pusher,
}

impl Encoding {
    /// How many encodings there are (the engine's frame cache has a place for each).
    pub const COUNT: usize = 3;

    /// The close code of a connection that stopped answering pings.
    pub fn dead_close_code(self) -> u16 {
        match self {
            Encoding::Pusher => pusher::session::code::NO_PONG,
            _ => crate::ws::close::GOING_AWAY,
        }
    }

    /// The close code of a connection the server closes as it stops (Pusher's: reconnect now).
    pub fn going_away_close_code(self) -> u16 {
        match self {
            Encoding::Pusher => pusher::session::code::RECONNECT,
            _ => crate::ws::close::GOING_AWAY,
        }
    }

    /// The message a push on `channel` at `position` with `content` is for a client, and the id
    /// an event stream gives it (so that `EventSource` resumes from there), if any.
    pub fn push<'a>(
        self,
        channel: &str,
        position: Option<&Position>,
        content: &'a [u8],
    ) -> (Cow<'a, [u8]>, Option<String>) {
        match self {
            Encoding::Raw | Encoding::Pusher => (Cow::Borrowed(content), None),
            Encoding::NativeJson => {
                let id = position.map(|p| format!("{channel}:{}:{}", p.epoch, p.offset));
                (Cow::Owned(native::json::push(channel, position, content)), id)
            }
        }
    }
}

/// A boxed future, as the engine's calls and protocols' message handlers return them (made only
/// when a client sends something).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// How the engine holds a protocol's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// In the worker's table with the native protocol's users and topics: pushed to by
    /// broadcast, user, topic and connection.
    Native,
    /// Pushed to only through the broker channels the protocol joins, in this encoding.
    Joiner(Encoding),
    /// Never pushed to: pinged, swept and closed with the others.
    Unlisted,
}

/// What a protocol may ask of the engine for one of its connections (the gateway implements it).
pub trait Engine: Send {
    /// Send a message to this client (`text`: a text message, else binary).
    fn send(&mut self, text: bool, payload: &[u8]);
    /// Close the connection with `code` and `reason` once what is queued is written.
    fn close(&mut self, code: u16, reason: &str);
    /// The connection's worker and number: together, unique in the cluster.
    fn socket(&self) -> (&str, u64);
    /// Join broker channel `channel` (as `member`, a user id and its info, on a channel with
    /// members): pushes on it reach this connection once this resolves. False when it had
    /// joined already.
    fn join<'a>(&'a mut self, channel: &'a str, member: Option<(&'a str, &'a str)>) -> BoxFuture<'a, bool>;
    /// The members of `channel` on every gateway, each user once with its info (`None`: they
    /// could not be asked).
    fn members<'a>(&'a mut self, channel: &'a str)
        -> BoxFuture<'a, Option<std::collections::BTreeMap<String, String>>>;
    /// Leave broker channel `channel`; false when it was not in it.
    fn leave<'a>(&'a mut self, channel: &'a str) -> BoxFuture<'a, bool>;
    /// Publish on the broker; whether the broker took it.
    fn publish<'a>(&'a mut self, channel: &'a str, data: Bytes, keep: Option<Keep>) -> BoxFuture<'a, bool>;
    /// The latest message kept on `channel`, if any.
    fn last<'a>(&'a mut self, channel: &'a str) -> BoxFuture<'a, Option<Bytes>>;
    /// The engine's side that is not one connection's, for what a protocol does later (a
    /// throttled announcement to a channel).
    fn cluster(&self) -> std::sync::Arc<dyn Cluster>;
}

/// What a protocol may ask of the engine outside any one connection (a gateway worker).
pub trait Cluster: Send + Sync {
    /// The subscribers of broker channel `channel` on every live gateway (`None`: they could
    /// not be asked).
    fn subscribers<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Option<u64>>;
    /// Publish on the broker; whether the broker took it.
    fn publish<'a>(&'a self, channel: &'a str, data: Bytes, keep: Option<Keep>) -> BoxFuture<'a, bool>;
}

/// One client protocol, as the connection's task uses it (static dispatch: a connection pays
/// nothing for the seam).
pub trait Protocol: Send + Sync + 'static {
    /// Whether clients' messages are read whole (fragments joined, inflated, within the frame
    /// limit) and handed to [`Protocol::on_message`]. When not, they are checked and dropped as
    /// they arrive, and an idle connection holds nothing for them.
    const READS: bool;
    /// How the engine holds its connections.
    const HELD: Held;
    /// What the protocol keeps for one connection, from its admission on.
    type Session: Send + 'static;

    /// What to send (or do) once the connection has its place in the engine.
    fn welcome(_: &mut Self::Session, _: &mut dyn Engine) {}

    /// What to do when the connection ends (before the engine forgets it).
    fn on_close<'a>(_: &'a mut Self::Session, _: &'a mut dyn Engine) -> BoxFuture<'a, ()> {
        Box::pin(std::future::ready(()))
    }

    /// What to do with a client's whole message (`text`: a text message, valid UTF-8).
    fn on_message<'a>(
        session: &'a mut Self::Session,
        engine: &'a mut dyn Engine,
        text: bool,
        data: Bytes,
    ) -> BoxFuture<'a, ()>;
}
