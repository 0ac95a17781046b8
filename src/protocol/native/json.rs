//! What a `?format=json` connection receives: every message as one JSON object.
//!
//! - a push: `{"channel":C,"offset":N,"epoch":E,"data":CONTENT}` (`offset` and `epoch` when the
//!   channel keeps history; `data` is the push's text);
//! - the welcome: `{"worker_id":W,"connection_id":N}`, plus `uid` and `channels` when known;
//! - the end of a recovery, or a loss that could not be repaired: `{"channel":C,"recovered":B}`.
//!
//! Without `format=json` a connection gets the seed's raw text, byte for byte.

use serde::Serialize;

use crate::history::Position;

#[derive(Serialize)]
struct Push<'a> {
    channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<&'a str>,
    data: &'a str,
}

/// A push on `channel` carrying `content`, at `position` when it has one.
pub fn push(channel: &str, position: Option<&Position>, content: &[u8]) -> Vec<u8> {
    let data = String::from_utf8_lossy(content);
    let p = Push { channel, offset: position.map(|p| p.offset), epoch: position.map(|p| &*p.epoch), data: &data };
    serde_json::to_vec(&p).unwrap_or_default()
}

#[derive(Serialize)]
struct Welcome<'a> {
    worker_id: &'a str,
    connection_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    channels: &'a [String],
}

/// The first message of a JSON connection.
pub fn welcome(worker_id: &str, connection_id: u64, uid: Option<&str>, channels: &[String]) -> Vec<u8> {
    serde_json::to_vec(&Welcome { worker_id, connection_id, uid, channels }).unwrap_or_default()
}

/// Whether what `channel`'s client missed was delivered (`true`, after the last recovered
/// message), or could not be (`false`: the history no longer reaches back, or its epoch changed).
pub fn recovered(channel: &str, ok: bool) -> Vec<u8> {
    serde_json::json!({"channel": channel, "recovered": ok}).to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let p = Position { offset: 7, epoch: "ab12".into() };
        assert_eq!(
            push("topic:a", Some(&p), b"hi \"x\""),
            br#"{"channel":"topic:a","offset":7,"epoch":"ab12","data":"hi \"x\""}"#
        );
        assert_eq!(push("web-0", None, b"x"), br#"{"channel":"web-0","data":"x"}"#);
        assert_eq!(welcome("w-0", 3, None, &[]), br#"{"worker_id":"w-0","connection_id":3}"#);
        assert_eq!(
            welcome("w-0", 3, Some("u"), &["t".into()]),
            br#"{"worker_id":"w-0","connection_id":3,"uid":"u","channels":["t"]}"#
        );
        assert_eq!(recovered("broadcast", false), br#"{"channel":"broadcast","recovered":false}"#);
    }
}
