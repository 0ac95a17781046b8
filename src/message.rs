//! What travels through a broker: a channel name and a payload. A leaf module, so that the hub,
//! the brokers and the gateway can all name it without depending on each other.

use bytes::Bytes;

/// One published message: the channel it was published on and its payload (for the seed's events,
/// a PHP-serialized array; see [`crate::push`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub channel: Bytes,
    pub data: Bytes,
}
