//! Client protocols: what a connection's client sends and is sent, on top of the gateway's
//! transport (WebSocket frames, compression, bounded queues, heartbeats) and its engine (workers,
//! fan-out). The gateway picks a connection's protocol from the path of its upgrade request.
//!
//! - [`native::Native`]: the seed's protocol (welcome line, pushes; `format=json`, `recover=`, tokens):
//!   on every path but the ones other protocols are served on. Its clients' messages are checked
//!   and dropped without being kept.
//! - [`echo::Echo`]: every client message sent back (a conformance endpoint, `--echo-path`).

pub mod echo;
pub mod native;

pub use native::Native;

use std::borrow::Cow;

use bytes::Bytes;

use crate::history::Position;

/// How a connection gets a push, whatever carries it (WebSocket, event stream) and whether it is
/// compressed: the engine encodes each push at most once per kind of connection per worker
/// (per encoding, transport and compression) and shares the frame among them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The push's content as published (the seed's connections).
    Raw,
    /// The native protocol's JSON object (`format=json`): channel, position, content.
    NativeJson,
}

impl Encoding {
    /// How many encodings there are (the engine's frame cache has a place for each).
    pub const COUNT: usize = 2;

    /// The message a push on `channel` at `position` with `content` is for a client, and the id
    /// an event stream gives it (so that `EventSource` resumes from there), if any.
    pub fn push<'a>(
        self,
        channel: &str,
        position: Option<&Position>,
        content: &'a [u8],
    ) -> (Cow<'a, [u8]>, Option<String>) {
        match self {
            Encoding::Raw => (Cow::Borrowed(content), None),
            Encoding::NativeJson => {
                let id = position.map(|p| format!("{channel}:{}:{}", p.epoch, p.offset));
                (Cow::Owned(native::json::push(channel, position, content)), id)
            }
        }
    }
}

/// One client protocol, as the connection's task uses it (static dispatch: a connection pays
/// nothing for the seam).
pub trait Protocol: Send + Sync + 'static {
    /// Whether clients' messages are read whole (fragments joined, inflated, within the frame
    /// limit) and handed to [`Protocol::on_message`]. When not, they are checked and dropped as
    /// they arrive, and an idle connection holds nothing for them.
    const READS: bool;
    /// Whether the protocol's connections take part in the worker's fan-out (pushes, recovery,
    /// presence); when not, the worker only pings them and closes them at shutdown.
    const PUSHED: bool;

    /// What to do with a client's whole message (`text`: a text message, valid UTF-8): each
    /// message for the client goes to `reply` as (text?, payload).
    fn on_message(text: bool, data: Bytes, reply: &mut dyn FnMut(bool, &[u8]));
}
