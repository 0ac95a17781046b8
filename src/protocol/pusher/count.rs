//! `pusher_internal:subscription_count` for the apps that turn it on: when a socket subscribes to
//! or leaves a channel that is not a presence channel, the gateway counts the channel's
//! subscribers on every live gateway and publishes the count to all of them (and to the app's
//! `subscription_count` webhook). A channel last counted above [`THROTTLE_ABOVE`] is counted at
//! most once per [`EVERY`] on a gateway: changes within that time are told together at its end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::hooks::{Event, Hooks};
use super::{event_json, payload};
use crate::protocol::Cluster;

/// Counts above this are sent at most once per [`EVERY`].
pub const THROTTLE_ABOVE: u64 = 100;
/// See [`THROTTLE_ABOVE`].
pub const EVERY: Duration = Duration::from_secs(5);
/// Channels whose last count a gateway remembers; past it, the ones last counted before
/// [`EVERY`] are forgotten.
const MAX_CHANNELS: usize = 100_000;

/// When a channel's count was last sent and what it was; whether a send is already due.
struct Last {
    at: Instant,
    count: u64,
    due: bool,
}

/// What to do about a change.
#[derive(Debug, PartialEq)]
enum Decision {
    Now,
    At(Instant),
    /// A send is due already and will count this change too.
    Nothing,
}

/// The channels' last counts on one gateway.
#[derive(Default)]
pub struct Counts {
    channels: Mutex<HashMap<String, Last>>,
}

impl Counts {
    fn decide(&self, channel: &str, now: Instant) -> Decision {
        let mut channels = crate::io::lock(&self.channels);
        let Some(last) = channels.get_mut(channel) else { return Decision::Now };
        if last.due {
            return Decision::Nothing;
        }
        if last.count > THROTTLE_ABOVE && now < last.at + EVERY {
            last.due = true;
            return Decision::At(last.at + EVERY);
        }
        Decision::Now
    }

    fn sent(&self, channel: &str, count: u64, now: Instant) {
        let mut channels = crate::io::lock(&self.channels);
        if count == 0 {
            channels.remove(channel);
            return;
        }
        if channels.len() >= MAX_CHANNELS && !channels.contains_key(channel) {
            channels.retain(|_, l| l.due || now < l.at + EVERY);
        }
        if channels.len() < MAX_CHANNELS || channels.contains_key(channel) {
            channels.insert(channel.to_owned(), Last { at: now, count, due: false });
        }
    }
}

/// The subscribers of app `app`'s channel `name` (broker channel `to`) changed on this gateway:
/// count them and tell them, now or at the end of the channel's throttle.
pub fn changed(
    counts: &Arc<Counts>,
    hooks: Option<Arc<Hooks>>,
    cluster: Arc<dyn Cluster>,
    app: &str,
    name: &str,
    to: &str,
) {
    let at = match counts.decide(to, Instant::now()) {
        Decision::Nothing => return,
        Decision::Now => None,
        Decision::At(at) => Some(at),
    };
    let (counts, app, name, to) = (counts.clone(), app.to_owned(), name.to_owned(), to.to_owned());
    tokio::spawn(async move {
        if let Some(at) = at {
            tokio::time::sleep_until(at).await;
        }
        let Some(n) = cluster.subscribers(&to).await else {
            // Not counted: the next change tries again.
            return counts.sent(&to, 0, Instant::now());
        };
        counts.sent(&to, n, Instant::now());
        if n > 0 {
            let data = serde_json::json!({ "subscription_count": n }).to_string();
            let data = serde_json::value::to_raw_value(&data).expect("a string is JSON");
            let event = event_json("pusher_internal:subscription_count", &name, &data, None);
            cluster.publish(&to, payload(None, &event), None).await;
        }
        if let Some(h) = hooks {
            h.send(&app, &Event { subscription_count: Some(n), ..Event::new("subscription_count", &name) });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_above_the_threshold_wait_for_the_end_of_the_window() {
        let counts = Counts::default();
        let t0 = Instant::now();
        assert_eq!(counts.decide("c", t0), Decision::Now, "never counted");
        counts.sent("c", 5, t0);
        assert_eq!(counts.decide("c", t0), Decision::Now, "small channels: every change");
        counts.sent("c", THROTTLE_ABOVE + 1, t0);
        let later = t0 + Duration::from_secs(1);
        assert_eq!(counts.decide("c", later), Decision::At(t0 + EVERY), "large: at the window's end");
        assert_eq!(counts.decide("c", later), Decision::Nothing, "already due");
        counts.sent("c", THROTTLE_ABOVE + 2, t0 + EVERY);
        assert_eq!(counts.decide("c", t0 + EVERY * 2), Decision::Now, "a window later");
        counts.sent("c", 0, t0 + EVERY * 2);
        assert_eq!(counts.decide("c", t0 + EVERY * 2), Decision::Now, "empty: forgotten");
    }
}
