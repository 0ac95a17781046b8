//! The gateway's part in presence (see [`crate::cluster`]): a [`Heartbeat`] on `pushwire:cluster`
//! every third of its lease, and answers to the questions publishers ask every gateway on
//! `pushwire:nodes` (a user's connections, a topic's members, "heartbeat now").

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use tokio::time::Instant;

use super::Gateway;
use crate::broker::Subscription;
use crate::cluster::{decode, encode, Answer, Envelope, Heartbeat, Report, Request, CLUSTER, MAX_PRESENCE_UIDS};
use crate::metrics::GLOBAL;

/// How often a gateway with Pusher apps looks for gateways that were lost.
const PEERS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Until the gateway is gone: when a gateway drops out of the live ones (its lease ran out),
/// each worker tells its presence joiners which members went with it. Not while this gateway's
/// own heartbeat is unheard (its broker link is down: every other gateway looks lost).
pub(super) async fn watch_peers(gw: Weak<Gateway>, asker: Arc<crate::cluster::Asker>) {
    let mut tick = tokio::time::interval(PEERS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut live = BTreeSet::new();
    loop {
        tick.tick().await;
        let Some(gw) = gw.upgrade() else { return };
        let now: BTreeSet<String> = asker.alive().into_iter().map(|hb| hb.node).collect();
        if !now.contains(&gw.node_id) {
            continue;
        }
        let lost = live.difference(&now).next().is_some();
        live = now;
        if lost {
            for w in &gw.workers {
                w.reconcile_members().await;
            }
        }
    }
}

/// Run until the gateway is gone.
pub(super) async fn run(gw: Weak<Gateway>, mut nodes: Subscription) {
    let Some(lease) = gw.upgrade().map(|g| g.cfg.lease) else { return };
    let mut beat = tokio::time::interval(lease / 3);
    let mut changes = tokio::time::interval(CHANGES_EVERY);
    for t in [&mut beat, &mut changes] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    let mut rates = Rates::default();
    loop {
        tokio::select! {
            m = nodes.recv() => {
                let Some(m) = m else { return };
                let Some(env) = decode::<Envelope>(&m.data) else { continue };
                let Some(gw) = gw.upgrade() else { return };
                if env.req == Request::Hello {
                    gw.report(&mut rates).await;
                    continue;
                }
                let mut a = gw.presence(&env.req);
                (a.id, a.node) = (env.id, gw.node_id.clone());
                // Answers go out on their own, so that a slow broker confirmation holds up no other.
                tokio::spawn(async move {
                    let _ = gw.broker.publish(&env.reply, encode(&a), None).await;
                });
            }
            _ = beat.tick() => {
                let Some(gw) = gw.upgrade() else { return };
                gw.report(&mut rates).await;
            }
            _ = changes.tick() => {
                let Some(gw) = gw.upgrade() else { return };
                gw.send_changes().await;
            }
        }
    }
}

/// Changes in one report.
const CHANGES_PER_REPORT: usize = 1000;

/// Counters at the previous heartbeat, for rates.
struct Rates {
    at: Instant,
    messages_in: u64,
    messages_out: u64,
}

impl Default for Rates {
    fn default() -> Self {
        Rates { at: Instant::now(), messages_in: 0, messages_out: 0 }
    }
}

/// How often changes go out.
const CHANGES_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

impl Gateway {
    /// Report each worker's changes since the last report. Reports go out in order, one task.
    async fn send_changes(&self) {
        for w in &self.workers {
            let changes = w.take_changes();
            for chunk in changes.chunks(CHANGES_PER_REPORT) {
                let r = Report::Changes { worker: w.id.clone(), changes: chunk.to_vec() };
                let _ = self.broker.publish(CLUSTER, encode(&r), None).await;
            }
        }
    }

    /// The latest changes, then a heartbeat that counts them.
    async fn report(&self, rates: &mut Rates) {
        self.send_changes().await;
        let hb = self.heartbeat(rates);
        let _ = self.broker.publish(CLUSTER, encode(&Report::Heartbeat(hb)), None).await;
    }

    fn heartbeat(&self, last: &mut Rates) -> Heartbeat {
        let (users, topics) = self.workers.iter().map(|w| w.counts()).fold((0, 0), |(u, t), (wu, wt)| (u + wu, t + wt));
        let (messages_in, messages_out) =
            (GLOBAL.broker_messages.load(Ordering::Relaxed), GLOBAL.deliveries.load(Ordering::Relaxed));
        let secs = last.at.elapsed().as_secs_f64().max(0.001);
        let hb = Heartbeat {
            node: self.node_id.clone(),
            workers: self.workers.len(),
            connections: self.connections() as u64,
            users: users as u64,
            topics: topics as u64,
            messages_in_per_s: (messages_in.saturating_sub(last.messages_in)) as f64 / secs,
            messages_out_per_s: (messages_out.saturating_sub(last.messages_out)) as f64 / secs,
            slow_consumer_cuts: GLOBAL.slow_consumer_disconnects.load(Ordering::Relaxed),
            lease_ms: self.cfg.lease.as_millis() as u64,
            workers_seq: self.workers.iter().map(|w| (w.id.clone(), w.reported())).collect(),
        };
        *last = Rates { at: Instant::now(), messages_in, messages_out };
        hb
    }

    /// This gateway's part of a presence answer.
    fn presence(self: &Arc<Self>, req: &Request) -> Answer {
        match req {
            Request::Online { uid } => {
                let n = self.workers.iter().map(|w| w.user_connections(uid)).sum::<usize>();
                Answer { ok: true, connections: n as u64, ..Answer::default() }
            }
            Request::Presence { channel } => {
                let mut uids = BTreeSet::new();
                let n: usize =
                    self.workers.iter().map(|w| w.topic_members(channel, &mut uids, MAX_PRESENCE_UIDS)).sum();
                Answer { ok: true, connections: n as u64, uids: uids.into_iter().collect(), ..Answer::default() }
            }
            Request::Channels { prefix } => {
                let mut channels = std::collections::BTreeMap::new();
                for w in &self.workers {
                    w.joined_channels(prefix, &mut channels, crate::cluster::MAX_CHANNELS);
                }
                Answer { ok: true, channels, ..Answer::default() }
            }
            Request::Members { channel } => {
                let mut members = std::collections::BTreeMap::new();
                for w in &self.workers {
                    w.local_members(channel, &mut members, crate::cluster::MAX_CHANNELS);
                }
                Answer { ok: true, members, ..Answer::default() }
            }
            _ => Answer::default(),
        }
    }
}
