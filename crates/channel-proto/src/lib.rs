//! The Workerman Channel wire protocol, with no I/O.
//!
//! A Channel peer sends frames ([`frame`]): a 4-byte big-endian length that counts itself, then
//! a payload that is a PHP `serialize()`d array ([`value`]). The array's `type` key says what it
//! is; [`message`] turns payloads into typed requests and events and back.
//!
//! Everything here is total on untrusted input: malformed bytes give an [`Error`], never a panic,
//! and no input can make the parser recurse without bound or allocate more than the frame holds.

pub mod frame;
pub mod message;
pub mod value;

pub use frame::{FrameError, DEFAULT_MAX_FRAME, HEADER_LEN};
pub use message::{Keep, MessageError, Name, Request, ServerMessage};
pub use value::{Key, Value, ValueError, MAX_DEPTH};

/// Any error decoding a Channel frame or payload.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Value(#[from] ValueError),
    #[error(transparent)]
    Message(#[from] MessageError),
}
