//! What travels through a broker: a channel name, a payload, and the message's place in the
//! channel's history when the channel keeps one. A leaf module, so that the hub, the brokers and
//! the gateway can all name it without depending on each other.

use bytes::Bytes;

pub use crate::history::Position;

/// One published message: the channel it was published on and its payload (for the seed's events,
/// a PHP-serialized array; see [`crate::protocol::native::push`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub channel: Bytes,
    pub data: Bytes,
    /// Offset and epoch in the channel's history, assigned by the broker that stores it.
    pub position: Option<Position>,
}
