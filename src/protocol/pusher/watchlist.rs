//! Watchlist events, for the apps that turn them on (`watchlist-events = true`): a socket that
//! signs in with a `watchlist` in its `user_data` (at most [`MAX_WATCHLIST`] user ids) is told
//! which of those users are online (a user is online while a socket anywhere is signed in as
//! it), then each change, as `pusher_internal:watchlist_events`.
//!
//! On the engine: a user is online while its user channel (`#server-to-user-ID`) has a joiner on
//! some live gateway; a watcher joins each watched user's broker channel `#watchlist-ID` (a name
//! no client may subscribe to), where the sign-in of a user's first socket anywhere publishes
//! `online` and the end of its last one `offline`. Two first sockets at the same instant on two
//! gateways may both announce `online`; a gateway that is lost takes its users offline for the
//! watchers on the others once its lease ends (every gateway tells its own watchers).

use std::sync::Arc;

use super::{broker_channel, payload, user_channel};
use crate::protocol::Cluster;

/// Most user ids in one watchlist.
pub const MAX_WATCHLIST: usize = 100;

/// Where a watched user's changes go, under the app's namespace.
pub const PREFIX: &str = "#watchlist-";

/// The broker channel of app `app`'s watchers of `user`.
pub fn channel(app: &str, user: &str) -> String {
    broker_channel(app, &format!("{PREFIX}{user}"))
}

/// `pusher_internal:watchlist_events` with the users that are `online` and `offline`.
pub fn event(online: &[&str], offline: &[&str]) -> Vec<u8> {
    let mut events = Vec::new();
    for (name, ids) in [("online", online), ("offline", offline)] {
        if !ids.is_empty() {
            events.push(serde_json::json!({ "name": name, "user_ids": ids }));
        }
    }
    let m = serde_json::json!({ "event": "pusher_internal:watchlist_events", "data": { "events": events } });
    m.to_string().into_bytes()
}

/// Which of app `app`'s `users` are online (`None`: the gateways could not be asked).
pub async fn online<'a>(cluster: &dyn Cluster, app: &str, users: &'a [String]) -> Option<Vec<&'a str>> {
    let asks = users.iter().map(|u| async move {
        let n = cluster.subscribers(&user_channel(app, u)).await?;
        Some((n > 0).then_some(u.as_str()))
    });
    let answers = futures_util::future::join_all(asks).await;
    answers.into_iter().collect::<Option<Vec<_>>>().map(|v| v.into_iter().flatten().collect())
}

/// Tell `user`'s watchers that it came online (`true`) or went offline, if no other socket of
/// it holds it that way: online when this is its only socket anywhere, offline when none is left.
pub async fn announce(cluster: Arc<dyn Cluster>, app: &str, user: &str, up: bool) {
    let Some(n) = cluster.subscribers(&user_channel(app, user)).await else { return };
    if (up && n == 1) || (!up && n == 0) {
        let ids = [user];
        let event = if up { event(&ids, &[]) } else { event(&[], &ids) };
        cluster.publish(&channel(app, user), payload(None, &event), None).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_shape() {
        let e = String::from_utf8(event(&["a", "b"], &["c"])).unwrap();
        assert_eq!(
            e,
            r#"{"data":{"events":[{"name":"online","user_ids":["a","b"]},{"name":"offline","user_ids":["c"]}]},"event":"pusher_internal:watchlist_events"}"#
        );
        assert!(super::super::channel::check(&format!("{PREFIX}u1")).is_err(), "no client may subscribe");
        assert_eq!(channel("1", "u1"), "pusher:1:#watchlist-u1");
    }
}
