//! Pusher channel names: which characters and how long, and what kind a name is (its prefix,
//! longest first), which decides authorization, presence, client events and caching.

/// Longest channel name, prefix included (the SDKs' limit; the documents say 164).
pub const MAX_CHANNEL: usize = 200;
/// Longest event name.
pub const MAX_EVENT: usize = 200;

/// What a channel's name makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    /// Subscribing needs a signature (`private-`, `presence-`, and their variants).
    pub private: bool,
    /// A presence channel: members with their `user_info`.
    pub presence: bool,
    /// `private-encrypted-`: the server relays what it cannot read; no client events.
    pub encrypted: bool,
    /// `cache-`: the last event is kept and replayed to each new subscriber.
    pub cache: bool,
    /// `#server-to-user-ID`: only a socket signed in as that user may subscribe.
    pub user: bool,
}

impl Kind {
    /// The kind of a valid channel `name`.
    pub fn of(name: &str) -> Kind {
        let none = Kind { private: false, presence: false, encrypted: false, cache: false, user: false };
        if let Some(rest) = name.strip_prefix("private-encrypted-") {
            return Kind { private: true, encrypted: true, cache: rest.starts_with("cache-"), ..none };
        }
        if let Some(rest) = name.strip_prefix("private-") {
            return Kind { private: true, cache: rest.starts_with("cache-"), ..none };
        }
        if let Some(rest) = name.strip_prefix("presence-") {
            return Kind { private: true, presence: true, cache: rest.starts_with("cache-"), ..none };
        }
        if name.starts_with(USER_PREFIX) {
            return Kind { user: true, ..none };
        }
        Kind { cache: name.starts_with("cache-"), ..none }
    }

    /// Whether clients may send `client-*` events on it (private and presence channels; not
    /// encrypted ones, whose data the server could not vouch for).
    pub fn takes_client_events(&self) -> bool {
        self.private && !self.encrypted
    }
}

/// The channel of one user's sockets (`sendToUser`).
pub const USER_PREFIX: &str = "#server-to-user-";

/// Whether `name` is a channel name: 1 to [`MAX_CHANNEL`] of `A-Z a-z 0-9 _ - = @ , . ;`, or
/// `#server-to-user-` and such a user id.
pub fn check(name: &str) -> Result<(), String> {
    let body = name.strip_prefix(USER_PREFIX).unwrap_or(name);
    let ok = |b: u8| b.is_ascii_alphanumeric() || b"_-=@,.;".contains(&b);
    if name.is_empty() || name.len() > MAX_CHANNEL {
        return Err(format!("channel name must be 1 to {MAX_CHANNEL} characters"));
    }
    match body.bytes().find(|&b| !ok(b)) {
        Some(b) => Err(format!("channel name {name:?} has {:?}; use A-Z a-z 0-9 _ - = @ , . ;", b as char)),
        None if body.is_empty() => Err(format!("channel name {name:?} names no user")),
        None => Ok(()),
    }
}

/// Whether `name` is an event name a client may send: `client-` and at most [`MAX_EVENT`]
/// characters in all.
pub fn is_client_event(name: &str) -> bool {
    name.starts_with("client-") && name.len() <= MAX_EVENT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_kinds() {
        assert!(check("my-channel_1=@,.;").is_ok());
        assert!(check("").is_err() && check("a b").is_err() && check("a#b").is_err());
        assert!(check(&"x".repeat(200)).is_ok() && check(&"x".repeat(201)).is_err());
        assert!(check("#server-to-user-42").is_ok() && check("#server-to-user-").is_err());
        assert_eq!(
            Kind::of("news"),
            Kind { private: false, presence: false, encrypted: false, cache: false, user: false }
        );
        assert!(Kind::of("cache-news").cache && !Kind::of("cache-news").private);
        let k = Kind::of("private-encrypted-cache-x");
        assert!(k.private && k.encrypted && k.cache && !k.takes_client_events());
        let k = Kind::of("presence-cache-room");
        assert!(k.private && k.presence && k.cache && k.takes_client_events());
        assert!(Kind::of("private-chat").takes_client_events() && !Kind::of("chat").takes_client_events());
        assert!(Kind::of("#server-to-user-7").user);
        assert!(is_client_event("client-typing") && !is_client_event("typing") && !is_client_event("pusher:x"));
    }
}
