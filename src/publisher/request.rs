//! A native publish as the HTTP API takes it (the seed's `content`, `to_worker_id`,
//! `to_connection_id`, and pushwire's `to_uid`, `to_channel`, `exclude_uid`): its fields checked,
//! and the broker channel and payload it becomes.

use bytes::Bytes;

use super::PublishError;
use crate::protocol::native::push::{check_name, topic_channel, user_channel, Push, BROADCAST};

/// Longest `to_worker_id`, in characters.
pub const MAX_WORKER_ID: usize = 256;
/// Longest `to_connection_id`, in characters.
pub const MAX_CONNECTION_ID: usize = 64;

/// Most users one push may exclude.
pub const MAX_EXCLUDE: usize = 100;

/// The fields of one publish.
#[derive(Debug, Default, PartialEq)]
pub struct PublishRequest {
    pub content: String,
    pub to_worker_id: Option<String>,
    pub to_connection_id: Option<String>,
    pub to_uid: Option<String>,
    pub to_channel: Option<String>,
    pub exclude_uid: Vec<String>,
    pub key: Option<String>,
}

impl PublishRequest {
    /// Read the fields from a query string or form body.
    pub fn parse(form: &[u8], max_content: usize) -> Result<PublishRequest, PublishError> {
        let bad = |m: String| Err(PublishError::BadRequest(m));
        let mut r = PublishRequest::default();
        let mut content = None;
        for (k, v) in form_urlencoded::parse(form) {
            let slot = match &*k {
                "content" => &mut content,
                "to_worker_id" => &mut r.to_worker_id,
                "to_connection_id" => &mut r.to_connection_id,
                "to_uid" => &mut r.to_uid,
                "to_channel" => &mut r.to_channel,
                "key" => &mut r.key,
                "exclude_uid" => {
                    r.exclude_uid.extend(v.split(',').map(str::to_owned));
                    continue;
                }
                other => {
                    return bad(format!(
                        "unknown parameter {other:?} (expected content, to_worker_id, to_connection_id, to_uid, \
                         to_channel, exclude_uid, key)"
                    ))
                }
            };
            if slot.replace(v.into_owned()).is_some() {
                return bad(format!("parameter {k:?} given twice"));
            }
        }
        r.content = match content {
            None => return bad("missing parameter \"content\"".into()),
            Some(c) if c.is_empty() => return bad("parameter \"content\" is empty".into()),
            Some(c) if c.chars().count() > max_content => {
                return bad(format!("content of {} characters exceeds the limit of {max_content}", c.chars().count()))
            }
            Some(c) => c,
        };
        for (name, value, max) in [
            ("to_worker_id", &r.to_worker_id, MAX_WORKER_ID),
            ("to_connection_id", &r.to_connection_id, MAX_CONNECTION_ID),
        ] {
            if value.as_ref().is_some_and(|v| v.chars().count() > max) {
                return bad(format!("{name} is longer than {max} characters"));
            }
        }
        for (what, name) in [("to_uid", &r.to_uid), ("to_channel", &r.to_channel)] {
            if let Some(n) = name {
                check_name(what, n).map_err(PublishError::BadRequest)?;
            }
        }
        if r.exclude_uid.len() > MAX_EXCLUDE {
            return bad(format!("exclude_uid names more than {MAX_EXCLUDE} users"));
        }
        for u in &r.exclude_uid {
            check_name("exclude_uid", u).map_err(PublishError::BadRequest)?;
        }
        let targets =
            [r.to_worker_id.is_some() || r.to_connection_id.is_some(), r.to_uid.is_some(), r.to_channel.is_some()];
        if targets.iter().filter(|&&t| t).count() > 1 {
            return bad("give one of to_worker_id + to_connection_id, to_uid, to_channel".into());
        }
        if !r.exclude_uid.is_empty() && (targets[0] || targets[1]) {
            return bad("exclude_uid applies to broadcasts and to_channel pushes".into());
        }
        match (&r.to_worker_id, &r.to_connection_id) {
            (Some(w), Some(c)) if w.is_empty() || c.is_empty() => {
                bad("to_worker_id and to_connection_id must not be empty".into())
            }
            (Some(w), Some(_)) => check_worker(w, false).map(|()| r),
            (Some(_), None) | (None, Some(_)) => bad("to_worker_id and to_connection_id go together".into()),
            _ => Ok(r),
        }
    }

    /// The broker channel and payload of this publish.
    pub fn to_message(&self) -> (String, Bytes) {
        let push = Push {
            to_connection_id: self.to_connection_id.clone().map(String::into_bytes),
            content: self.content.clone().into_bytes(),
            exclude_uid: self.exclude_uid.iter().map(|u| u.clone().into_bytes()).collect(),
        };
        let channel = match (&self.to_worker_id, &self.to_uid, &self.to_channel) {
            (Some(w), _, _) => w.clone(),
            (_, Some(u), _) => user_channel(u),
            (_, _, Some(t)) => topic_channel(t),
            _ => BROADCAST.to_owned(),
        };
        (channel, push.encode())
    }
}

/// Whether `to_worker_id` names a worker: a pushwire worker (`NODE-N`, as in the welcome line),
/// or, unless `pushwire` (a request only pushwire's workers answer), a PHP worker's number.
pub(super) fn check_worker(w: &str, pushwire: bool) -> Result<(), PublishError> {
    let kind = if pushwire { "pushwire worker" } else { "worker" };
    match crate::protocol::native::push::is_worker_id(w) && (!pushwire || w.contains('-')) {
        true => Ok(()),
        false => Err(PublishError::BadRequest(format!(
            "to_worker_id {w:?} does not name a {kind} (NODE-N, as in the welcome line)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(q: &str) -> Result<PublishRequest, String> {
        PublishRequest::parse(q.as_bytes(), 10).map_err(|e| e.to_string())
    }

    #[test]
    fn seed_queries() {
        let r = parse("content=h%C3%A9+x").unwrap();
        assert_eq!((r.content.as_str(), r.to_message().0.as_str()), ("hé x", "broadcast"));
        let r = parse("to_worker_id=ab-1&to_connection_id=2&content=hi").unwrap();
        assert_eq!(r.to_message().0, "ab-1");
    }

    #[test]
    fn bad_queries() {
        assert!(parse("").unwrap_err().contains("missing parameter \"content\""));
        assert!(parse("content=").unwrap_err().contains("empty"));
        assert!(parse("content=a&foo=1").unwrap_err().contains("unknown parameter \"foo\""));
        assert!(parse("content=a&content=b").unwrap_err().contains("twice"));
        assert!(parse("content=a&to_worker_id=1").unwrap_err().contains("go together"));
        for w in ["broadcast", "pushwire%3Aack%3Aab12", "a+b-1"] {
            let e = parse(&format!("content=a&to_worker_id={w}&to_connection_id=1")).unwrap_err();
            assert!(e.contains("does not name a worker"), "{w}: {e}");
        }
        assert!(parse("content=a&to_worker_id=0&to_connection_id=1").is_ok(), "a PHP worker");
        assert!(parse("content=0123456789x").unwrap_err().contains("exceeds"));
        assert!(parse("content=ééééééééé").is_ok(), "characters, not bytes");
    }

    #[test]
    fn users_and_topics() {
        assert_eq!(parse("to_uid=42&content=a").unwrap().to_message().0, "user:42");
        let r = parse("to_channel=room-1&exclude_uid=a,b&exclude_uid=c&content=a").unwrap();
        assert_eq!((r.to_message().0.as_str(), r.exclude_uid.len()), ("topic:room-1", 3));
        assert!(parse("exclude_uid=a&content=a").is_ok(), "a broadcast may exclude");
        assert!(parse("to_uid=a+b&content=a").unwrap_err().contains("to_uid"));
        assert!(parse("to_uid=1&to_channel=t&content=a").unwrap_err().contains("one of"));
        assert!(parse("to_uid=1&exclude_uid=2&content=a").unwrap_err().contains("exclude_uid applies"));
        assert!(parse("to_uid=1&to_uid=2&content=a").unwrap_err().contains("twice"));
    }
}
