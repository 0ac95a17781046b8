//! Connection tokens: a JWT given as `?token=` on the WebSocket URL says who the connection is
//! (`sub`, the user id) and which topics it joins at once (`channels`). HS256 with a shared secret,
//! or RS256 / ES256 with a public key; `exp` and `nbf` are honoured when present, with no leeway
//! beyond [`LEEWAY`]. With a longest lifetime set (`--token-max-age`), a token must have `exp`, no
//! further than that from now. Names are checked like every user and topic name ([`crate::protocol::native::push::valid_name`]).

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// Clock difference tolerated for `exp` and `nbf`.
pub const LEEWAY: Duration = Duration::from_secs(5);
/// Most topics a token may name.
pub const MAX_TOKEN_CHANNELS: usize = 64;
/// Longest token accepted, in bytes.
pub const MAX_TOKEN: usize = 8 * 1024;

/// Who a connection is, as its token says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Identity {
    pub uid: Option<String>,
    pub channels: Vec<String>,
}

/// Why a token is refused (the text goes back to the client with the 401).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TokenError {
    #[error("a token is required (?token=JWT)")]
    Missing,
    #[error("tokens are not accepted here (the gateway has no --token-secret or --token-public-key)")]
    NotConfigured,
    #[error("token longer than {MAX_TOKEN} bytes")]
    TooLong,
    #[error("token expired")]
    Expired,
    #[error("token has no exp, and this gateway accepts tokens valid for at most {0:?}")]
    NoExpiry(Duration),
    #[error("token valid for longer than this gateway accepts ({0:?})")]
    TooLongLived(Duration),
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token algorithm {0} is not accepted here")]
    WrongAlgorithm(String),
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token claim {0}")]
    BadClaim(String),
}

/// How tokens are checked.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verifier({:?})", self.validation.algorithms)
    }
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<u64>,
    #[serde(default)]
    channels: Vec<String>,
}

impl Verifier {
    /// HS256 tokens signed with `secret`.
    pub fn hs256(secret: &[u8]) -> Verifier {
        Verifier::new(DecodingKey::from_secret(secret), Algorithm::HS256)
    }

    /// RS256 or ES256 tokens, from a PEM public key (`-----BEGIN PUBLIC KEY-----`, RSA or P-256).
    pub fn public_key_pem(pem: &[u8]) -> Result<Verifier, String> {
        if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            return Ok(Verifier::new(key, Algorithm::ES256));
        }
        DecodingKey::from_rsa_pem(pem)
            .map(|key| Verifier::new(key, Algorithm::RS256))
            .map_err(|e| format!("not an RSA or P-256 public key in PEM: {e}"))
    }

    fn new(key: DecodingKey, alg: Algorithm) -> Verifier {
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY.as_secs();
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.required_spec_claims.clear(); // `exp` is checked when present
        Verifier { key, validation }
    }

    /// Check `token` (valid for at most `max_age` from now, when given) and read the identity it
    /// carries.
    pub fn verify(&self, token: &str, max_age: Option<Duration>) -> Result<Identity, TokenError> {
        use jsonwebtoken::errors::ErrorKind as K;
        if token.len() > MAX_TOKEN {
            return Err(TokenError::TooLong);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        if !self.validation.algorithms.contains(&header.alg) {
            return Err(TokenError::WrongAlgorithm(format!("{:?}", header.alg)));
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
            K::ExpiredSignature => TokenError::Expired,
            K::ImmatureSignature => TokenError::NotYetValid,
            K::InvalidSignature => TokenError::BadSignature,
            K::InvalidAlgorithm => TokenError::WrongAlgorithm(format!("{:?}", header.alg)),
            _ => TokenError::Malformed(e.to_string()),
        })?;
        let Claims { sub, exp, channels } = data.claims;
        if let Some(max) = max_age {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            match exp {
                None => return Err(TokenError::NoExpiry(max)),
                Some(e) if e > (now + max + LEEWAY).as_secs() => return Err(TokenError::TooLongLived(max)),
                Some(_) => {}
            }
        }
        if let Some(uid) = &sub {
            crate::protocol::native::push::check_name("sub", uid).map_err(TokenError::BadClaim)?;
        }
        if channels.len() > MAX_TOKEN_CHANNELS {
            return Err(TokenError::BadClaim(format!("channels names more than {MAX_TOKEN_CHANNELS} topics")));
        }
        for c in &channels {
            crate::protocol::native::push::check_name("channels", c).map_err(TokenError::BadClaim)?;
        }
        let mut channels = channels;
        channels.sort();
        channels.dedup();
        Ok(Identity { uid: sub.filter(|s| !s.is_empty()), channels })
    }
}

/// What a gateway does with tokens.
#[derive(Debug, Clone, Default)]
pub struct TokenPolicy {
    pub verifier: Option<Verifier>,
    /// Refuse connections without a token.
    pub required: bool,
    /// Refuse tokens without `exp`, or valid for longer than this from now.
    pub max_age: Option<Duration>,
}

impl TokenPolicy {
    /// The identity of a connection that gave `token` (or none).
    pub fn identify(&self, token: Option<&str>) -> Result<Identity, TokenError> {
        match (token, &self.verifier) {
            (None, _) if self.required => Err(TokenError::Missing),
            (None, _) => Ok(Identity::default()),
            (Some(_), None) => Err(TokenError::NotConfigured),
            (Some(t), Some(v)) => v.verify(t, self.max_age),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    fn hs(claims: serde_json::Value, secret: &[u8]) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    #[test]
    fn hs256_rules() {
        let v = Verifier::hs256(b"k");
        let id = v.verify(&hs(serde_json::json!({"sub": "42", "channels": ["b", "a", "a"]}), b"k"), None).unwrap();
        assert_eq!(id, Identity { uid: Some("42".into()), channels: vec!["a".into(), "b".into()] });
        let e = |c: serde_json::Value| v.verify(&hs(c, b"k"), None).unwrap_err();
        assert_eq!(e(serde_json::json!({"sub": "1", "exp": now() - 60})), TokenError::Expired);
        assert_eq!(e(serde_json::json!({"sub": "1", "nbf": now() + 60})), TokenError::NotYetValid);
        assert!(v.verify(&hs(serde_json::json!({"sub": "1", "exp": now() + 60}), b"k"), None).is_ok());
        assert!(matches!(e(serde_json::json!({"sub": "a b"})), TokenError::BadClaim(_)));
        assert!(matches!(e(serde_json::json!({"sub": "1", "channels": ["ok", ""]})), TokenError::BadClaim(_)));
        assert!(matches!(e(serde_json::json!({"sub": 5})), TokenError::Malformed(_)));
        assert_eq!(
            v.verify(&hs(serde_json::json!({"sub": "1"}), b"other"), None).unwrap_err(),
            TokenError::BadSignature
        );
        assert!(matches!(v.verify("nonsense", None).unwrap_err(), TokenError::Malformed(_)));
        // alg "none" and algorithms other than the configured one are refused.
        let none = format!(
            "{}.{}.",
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, br#"{"alg":"none","typ":"JWT"}"#),
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, br#"{"sub":"1"}"#)
        );
        assert!(v.verify(&none, None).is_err());
        let hs512 =
            encode(&Header::new(Algorithm::HS512), &serde_json::json!({"sub": "1"}), &EncodingKey::from_secret(b"k"));
        assert!(matches!(v.verify(&hs512.unwrap(), None).unwrap_err(), TokenError::WrongAlgorithm(_)));
        assert!(v.verify(&"x".repeat(MAX_TOKEN + 1), None).is_err());
    }

    #[test]
    fn a_longest_lifetime_refuses_tokens_without_exp_or_beyond_it() {
        let hour = Duration::from_secs(3600);
        let p = TokenPolicy { verifier: Some(Verifier::hs256(b"k")), required: false, max_age: Some(hour) };
        let t = |c: serde_json::Value| p.identify(Some(&hs(c, b"k")));
        assert_eq!(t(serde_json::json!({"sub": "1"})), Err(TokenError::NoExpiry(hour)));
        assert_eq!(t(serde_json::json!({"sub": "1", "exp": now() + 7200})), Err(TokenError::TooLongLived(hour)));
        assert!(t(serde_json::json!({"sub": "1", "exp": now() + 3500})).is_ok());
        assert_eq!(t(serde_json::json!({"sub": "1", "exp": now() - 60})), Err(TokenError::Expired));
        // Without the setting, a token without exp is accepted as before.
        let open = TokenPolicy { max_age: None, ..p };
        assert!(open.identify(Some(&hs(serde_json::json!({"sub": "1"}), b"k"))).is_ok());
    }

    #[test]
    fn policy() {
        let open = TokenPolicy::default();
        assert_eq!(open.identify(None), Ok(Identity::default()));
        assert_eq!(open.identify(Some("t")), Err(TokenError::NotConfigured));
        let strict = TokenPolicy { verifier: Some(Verifier::hs256(b"k")), required: true, max_age: None };
        assert_eq!(strict.identify(None), Err(TokenError::Missing));
    }
}
