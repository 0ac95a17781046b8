//! Client protocols: what a connection's client sends and is sent, on top of the gateway's
//! transport (WebSocket frames, compression, bounded queues, heartbeats) and its engine (workers,
//! fan-out). The gateway picks a connection's protocol from the path of its upgrade request.
//!
//! - [`Native`]: the seed's protocol (welcome line, pushes; `format=json`, `recover=`, tokens):
//!   on every path but the ones other protocols are served on. Its clients' messages are checked
//!   and dropped without being kept.
//! - [`echo::Echo`]: every client message sent back (a conformance endpoint, `--echo-path`).

pub mod echo;

use bytes::Bytes;

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

/// The seed's protocol. What it sends is built by the gateway (welcome line or JSON welcome,
/// pushes encoded once per kind of connection).
pub struct Native;

impl Protocol for Native {
    const READS: bool = false;
    const PUSHED: bool = true;

    fn on_message(_: bool, _: Bytes, _: &mut dyn FnMut(bool, &[u8])) {}
}
