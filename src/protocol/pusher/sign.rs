//! Pusher's signatures: channel and user authorization (`KEY:HEX`, HMAC-SHA256 of the exact
//! bytes the client sent), HTTP API requests (`auth_key`, `auth_timestamp`, `auth_version`,
//! `body_md5`, `auth_signature`), and webhook bodies. Every comparison is in constant time.

use md5::Digest;
use subtle::ConstantTimeEq;

use super::app::App;
pub use crate::webhook::hmac_hex;

/// How far `auth_timestamp` may be from now, in seconds.
pub const MAX_CLOCK_SKEW: u64 = 600;

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex of the MD5 of `body`.
pub fn md5_hex(body: &[u8]) -> String {
    hex(&md5::Md5::digest(body))
}

/// Whether `given` equals `want`, in time that does not depend on where they differ.
pub fn same(given: &str, want: &str) -> bool {
    bool::from(given.as_bytes().ct_eq(want.as_bytes()))
}

/// Whether `auth` (`KEY:SIGNATURE`, as a client sends it) signs `string_to_sign` for `app`.
pub fn authorizes(app: &App, string_to_sign: &[u8], auth: &str) -> bool {
    let Some((key, signature)) = auth.split_once(':') else { return false };
    same(key, &app.key) & same(signature, &hmac_hex(&app.secret, string_to_sign))
}

/// Why an HTTP API request is refused (401 unless said otherwise).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("missing parameter {0}")]
    Missing(&'static str),
    #[error("unknown auth_key")]
    UnknownKey,
    #[error("auth_key does not belong to app {0}")]
    OtherApp(String),
    #[error("auth_version must be 1.0")]
    Version,
    #[error("auth_timestamp is more than {MAX_CLOCK_SKEW} s from the server's time")]
    Timestamp,
    #[error("body_md5 does not match the body")]
    BodyMd5,
    #[error("invalid signature: expected HMAC-SHA256 hex digest of {0:?}")]
    Signature(String),
}

/// The string an HTTP API request signs: `METHOD\nPATH\nQUERY`, the query's pairs (decoded,
/// without `auth_signature`) with lowercase keys, sorted, joined with `&`, values as they are.
pub fn request_string(method: &str, path: &str, query: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, &str)> = query
        .iter()
        .filter(|(k, _)| k != "auth_signature")
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
        .collect();
    pairs.sort();
    let joined: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{method}\n{path}\n{}", joined.join("&"))
}

/// Check an HTTP API request for app `app` (its `auth_key` must be that app's) made at `now`
/// (Unix seconds): its version, timestamp, body digest and signature.
pub fn check_request(
    app: &App,
    method: &str,
    path: &str,
    query: &[(String, String)],
    body: &[u8],
    now: u64,
) -> Result<(), SignError> {
    let get = |k: &'static str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let key = get("auth_key").ok_or(SignError::Missing("auth_key"))?;
    if !same(key, &app.key) {
        return Err(SignError::OtherApp(app.id.clone()));
    }
    let signature = get("auth_signature").ok_or(SignError::Missing("auth_signature"))?;
    let timestamp = get("auth_timestamp").ok_or(SignError::Missing("auth_timestamp"))?;
    if get("auth_version").ok_or(SignError::Missing("auth_version"))? != "1.0" {
        return Err(SignError::Version);
    }
    let at: u64 = timestamp.parse().map_err(|_| SignError::Timestamp)?;
    if at.abs_diff(now) > MAX_CLOCK_SKEW {
        return Err(SignError::Timestamp);
    }
    // A body must be signed by its digest; an empty one may carry the digest of nothing (the
    // Python SDK adds it to GETs).
    match get("body_md5") {
        Some(md5) if !same(md5, &md5_hex(body)) => return Err(SignError::BodyMd5),
        None if !body.is_empty() => return Err(SignError::Missing("body_md5")),
        _ => {}
    }
    let string = request_string(method, path, query);
    match same(signature, &hmac_hex(&app.secret, string.as_bytes())) {
        true => Ok(()),
        false => Err(SignError::Signature(string)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> App {
        App::new("3", "278d425bdf160c739803", "7ad3773142a6692b25b8")
    }

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_documents_vectors() {
        let a = app();
        assert_eq!(
            hmac_hex(&a.secret, b"1234.1234:private-foobar"),
            "58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
        assert_eq!(
            hmac_hex(&a.secret, br#"1234.1234::user::{"id":"12345"}"#),
            "4708d583dada6a56435fb8bc611c77c359a31eebde13337c16ab43aa6de336ba"
        );
        let presence = br#"1234.1234:presence-foobar:{"user_id":10,"user_info":{"name":"Mr. Channels"}}"#;
        assert_eq!(hmac_hex(&a.secret, presence), "31935e7d86dba64c2a90aed31fdc61869f9b22ba9d8863bba239c03ca481bc80");
        let auth = format!("{}:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4", a.key);
        assert!(authorizes(&a, b"1234.1234:private-foobar", &auth));
        assert!(!authorizes(&a, b"1234.1234:private-other", &auth));
        assert!(!authorizes(&a, b"1234.1234:private-foobar", &auth.replacen("278d", "378d", 1)), "another key");
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        assert_eq!(md5_hex(body), "ec365a775a4cd0599faeb73354201b6f");
        let mut query = q(&[
            ("auth_key", &a.key),
            ("auth_timestamp", "1353088179"),
            ("auth_version", "1.0"),
            ("body_md5", "ec365a775a4cd0599faeb73354201b6f"),
        ]);
        let string = request_string("POST", "/apps/3/events", &query);
        assert_eq!(
            hmac_hex(&a.secret, string.as_bytes()),
            "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
        query
            .push(("auth_signature".into(), "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c".into()));
        assert_eq!(check_request(&a, "POST", "/apps/3/events", &query, body, 1353088179 + 599), Ok(()));
        assert_eq!(
            check_request(&a, "POST", "/apps/3/events", &query, body, 1353088179 + 601),
            Err(SignError::Timestamp)
        );
        assert_eq!(check_request(&a, "POST", "/apps/3/events", &query, b"{}", 1353088179), Err(SignError::BodyMd5));
        assert!(matches!(
            check_request(&a, "POST", "/apps/3/channels", &query, body, 1353088179),
            Err(SignError::Signature(_))
        ));
    }

    #[test]
    fn a_python_style_get_with_the_digest_of_an_empty_body() {
        let a = app();
        let mut query = q(&[
            ("auth_key", &a.key),
            ("auth_timestamp", "1353088179"),
            ("auth_version", "1.0"),
            ("body_md5", "d41d8cd98f00b204e9800998ecf8427e"),
            ("filter_by_prefix", "presence-"),
            ("info", "user_count"),
        ]);
        let sig = "f3f17c61ae491cc9085db68b22076e9b772e3bcb301659d655153ee3f9782aba";
        assert_eq!(hmac_hex(&a.secret, request_string("GET", "/apps/3/channels", &query).as_bytes()), sig);
        query.push(("auth_signature".into(), sig.into()));
        assert_eq!(check_request(&a, "GET", "/apps/3/channels", &query, b"", 1353088179), Ok(()));
    }

    #[test]
    fn a_webhook_body() {
        let body = br#"{"time_ms":1327078148132,"events":[{"name":"channel_occupied","channel":"my-channel"}]}"#;
        assert_eq!(hmac_hex(&app().secret, body), "c19001ae3963ccb13bf618e5b16ba9848e7e74df0993aa0689168e341c6833cf");
    }
}
