//! Pusher apps: each with its `id`, `key` and `secret` and its settings, from the config file's
//! `[[apps]]` or, for a quick start, one `--app ID:KEY:SECRET`. Apps never see each other's
//! channels: their broker channels are named `pusher:ID:CHANNEL`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::Deserialize;

/// One app and its settings (defaults as Pusher's hosted service).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct App {
    pub id: String,
    pub key: String,
    pub secret: String,
    /// A disabled app refuses connections (4003) and API calls (403).
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// Clients may send `client-*` events on private and presence channels.
    #[serde(default)]
    pub client_events: bool,
    /// Clients may sign in as a user (`pusher:signin`), and get what is sent to that user.
    #[serde(default = "defaults::yes")]
    pub user_authentication: bool,
    /// Client events one connection may send per second (more get `pusher:error` 4301).
    #[serde(default = "defaults::client_event_rate")]
    pub client_event_rate: u32,
    /// Connections of this app at once on one gateway (more are closed with 4004); 0: no limit.
    #[serde(default)]
    pub max_connections: usize,
    /// Largest event `data`, in bytes (HTTP API 413, client events 4300).
    #[serde(default = "defaults::max_event_payload")]
    pub max_event_payload: usize,
    /// Channels one connection may be subscribed to at once.
    #[serde(default = "defaults::max_channels")]
    pub max_channels_per_connection: usize,
    /// Users one presence channel may hold.
    #[serde(default = "defaults::max_presence_members")]
    pub max_presence_members: usize,
    /// Largest `user_info` of a presence member, in bytes of its JSON.
    #[serde(default = "defaults::max_user_info")]
    pub max_user_info: usize,
    /// `pusher_internal:subscription_count` events to subscribers, and the webhook.
    #[serde(default)]
    pub subscription_count: bool,
    /// Watchlist events to signed-in sockets whose `user_data` has a `watchlist`.
    #[serde(default)]
    pub watchlist_events: bool,
    /// The `activity_timeout` told to clients, in seconds.
    #[serde(default = "defaults::activity_timeout")]
    pub activity_timeout: u64,
    /// Webhook endpoints and which events each gets.
    #[serde(default)]
    pub webhooks: Vec<Webhook>,
}

/// One webhook endpoint of an app.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Webhook {
    pub url: String,
    /// Event names it gets (`channel_occupied`, `member_added`, …); empty: all.
    #[serde(default)]
    pub events: Vec<String>,
}

mod defaults {
    pub fn yes() -> bool {
        true
    }
    pub fn client_event_rate() -> u32 {
        10
    }
    pub fn max_event_payload() -> usize {
        10 * 1024
    }
    pub fn max_channels() -> usize {
        100
    }
    pub fn max_presence_members() -> usize {
        100
    }
    pub fn max_user_info() -> usize {
        1024
    }
    pub fn activity_timeout() -> u64 {
        120
    }
}

/// Longest app id, key or secret.
const MAX_FIELD: usize = 128;

impl App {
    /// An app with the default settings.
    pub fn new(id: &str, key: &str, secret: &str) -> App {
        App {
            id: id.into(),
            key: key.into(),
            secret: secret.into(),
            enabled: true,
            client_events: false,
            user_authentication: true,
            client_event_rate: defaults::client_event_rate(),
            max_connections: 0,
            max_event_payload: defaults::max_event_payload(),
            max_channels_per_connection: defaults::max_channels(),
            max_presence_members: defaults::max_presence_members(),
            max_user_info: defaults::max_user_info(),
            subscription_count: false,
            watchlist_events: false,
            activity_timeout: defaults::activity_timeout(),
            webhooks: Vec::new(),
        }
    }

    /// `--app ID:KEY:SECRET` (client events on, as a quick start expects).
    pub fn parse_flag(s: &str) -> Result<App, String> {
        let mut parts = s.splitn(3, ':');
        let (Some(id), Some(key), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("{s:?} is not ID:KEY:SECRET"));
        };
        let app = App { client_events: true, ..App::new(id, key, secret) };
        app.check()?;
        Ok(app)
    }

    /// Whether the settings can be used: id, key and secret present and plain, limits above 0.
    pub fn check(&self) -> Result<(), String> {
        // The id and key go in paths and before a ':' of signatures; the secret only into HMACs.
        for (what, v, path) in [("id", &self.id, true), ("key", &self.key, true), ("secret", &self.secret, false)] {
            let plain = v.bytes().all(|b| b.is_ascii_graphic() && !(path && b":/?#%".contains(&b)));
            if v.is_empty() || v.len() > MAX_FIELD || !plain {
                let not = if path { " without : / ? # %" } else { "" };
                return Err(format!("app {what} must be 1 to {MAX_FIELD} printable ASCII characters{not}"));
            }
        }
        if self.activity_timeout == 0 || self.max_event_payload == 0 || self.max_channels_per_connection == 0 {
            return Err(format!(
                "app {}: activity-timeout, max-event-payload and max-channels-per-connection must be above 0",
                self.id
            ));
        }
        for w in &self.webhooks {
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                return Err(format!("app {}: webhook {:?} is not an http:// or https:// URL", self.id, w.url));
            }
        }
        Ok(())
    }
}

/// The apps a node serves, by key (clients) and by id (the HTTP API), with each app's open
/// connections on this node.
#[derive(Debug, Default)]
pub struct Apps {
    by_key: HashMap<String, Arc<App>>,
    by_id: HashMap<String, Arc<App>>,
    open: HashMap<String, Arc<AtomicUsize>>,
    /// What a gateway keeps for all its connections, from its first one on.
    local: std::sync::OnceLock<Arc<Local>>,
}

/// What a gateway keeps for all its Pusher connections: the senders of the webhooks it sends
/// (`client_event`, `cache_miss`, `subscription_count`), if an app has an endpoint for them, and
/// the channels' last subscription counts.
pub struct Local {
    pub hooks: Option<Arc<super::hooks::Hooks>>,
    pub counts: Arc<super::count::Counts>,
}

impl Local {
    /// The subscribers of `app`'s channel `name` changed here (see [`super::count`]).
    pub fn count_changed(&self, app: &App, engine: &dyn crate::protocol::Engine, name: &str) {
        let to = super::broker_channel(&app.id, name);
        super::count::changed(&self.counts, self.hooks.clone(), engine.cluster(), &app.id, name, &to);
    }
}

impl std::fmt::Debug for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Local").field("hooks", &self.hooks).finish_non_exhaustive()
    }
}

/// One of an app's connection slots on this node, held for the connection's life.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Apps {
    /// The apps of `list`, each checked; ids and keys must be unique.
    pub fn new(list: Vec<App>) -> Result<Apps, String> {
        let mut apps = Apps::default();
        for app in list {
            app.check()?;
            let app = Arc::new(app);
            if apps.by_id.insert(app.id.clone(), app.clone()).is_some() {
                return Err(format!("two apps have the id {:?}", app.id));
            }
            if apps.by_key.insert(app.key.clone(), app.clone()).is_some() {
                return Err(format!("two apps have the key {:?}", app.key));
            }
            apps.open.insert(app.id.clone(), Arc::default());
        }
        Ok(apps)
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn by_key(&self, key: &str) -> Option<&Arc<App>> {
        self.by_key.get(key)
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<App>> {
        self.by_id.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<App>> {
        self.by_id.values()
    }

    /// What a gateway keeps for all its connections; its webhook senders start on the first call.
    pub fn local(&self) -> Arc<Local> {
        let hooks = || super::hooks::Hooks::spawn(self, &super::hooks::GATEWAY);
        self.local.get_or_init(|| Arc::new(Local { hooks: hooks(), counts: Arc::default() })).clone()
    }

    /// A connection slot of `app` on this node, unless it has `max_connections` open already.
    pub fn slot(&self, app: &App) -> Option<Slot> {
        let open = self.open.get(&app.id)?.clone();
        let n = open.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(open);
        (app.max_connections == 0 || n < app.max_connections).then_some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_and_file_forms() {
        let a = App::parse_flag("1:key:se:cret").unwrap();
        assert_eq!((a.id.as_str(), a.key.as_str(), a.secret.as_str(), a.client_events), ("1", "key", "se:cret", true));
        assert!(App::parse_flag("1:key").is_err());
        assert!(App::parse_flag(":key:secret").is_err());
        let toml = r#"
            id = "7"
            key = "k7"
            secret = "s7"
            max-connections = 5
            webhooks = [{ url = "http://127.0.0.1:9/hook", events = ["channel_occupied"] }]
        "#;
        let a: App = toml::from_str(toml).unwrap();
        assert_eq!((a.max_connections, a.max_event_payload, a.client_events), (5, 10 * 1024, false));
        assert!(toml::from_str::<App>("id = \"1\"\nkey = \"k\"\nsecret = \"s\"\ncolour = 1").is_err());
        assert!(Apps::new(vec![App::new("1", "k", "s"), App::new("1", "k2", "s")]).is_err(), "ids are unique");
        assert!(Apps::new(vec![App::new("1", "k", "s"), App::new("2", "k", "s")]).is_err(), "keys are unique");
        let apps = Apps::new(vec![App::new("1", "k", "s")]).unwrap();
        assert_eq!(apps.by_key("k").unwrap().id, "1");
    }
}
