//! The presence tracker behind webhooks (a publisher started with `--webhook`, or with
//! `--app-webhooks` for Pusher apps): it follows every gateway worker's users, topics, Pusher
//! channels and presence members from the changes the workers report on `pushwire:cluster` (see
//! [`crate::cluster`]), and turns cluster-wide transitions into events:
//!
//! - `user_online` / `channel_occupied` when the first connection of a user / topic appears
//!   anywhere; a Pusher app's `channel_occupied` / `member_added` likewise;
//! - `user_offline` / `channel_vacated` when the last one is gone and `--offline-delay` has passed
//!   with none anywhere: a page reload (gone, back within the delay) sends nothing; a Pusher
//!   app's `channel_vacated` / `member_removed` likewise, after at most [`PUSHER_DELAY`] (Pusher
//!   waits up to 3 s).
//!
//! A worker whose changes show a gap (lost on the way, or more than it keeps) is asked for all its
//! users and topics again, page by page, by a task of its own: a gateway that is slow to answer
//! (stopped, overloaded, cut off) delays only its own events, whose changes wait meanwhile. A
//! gateway whose lease runs out (killed with -9) loses all its users and topics at once. What the
//! gateways hold when the tracker starts is taken in without events.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::cluster::{Asker, Change, Kind, Report, Request};
use crate::protocol::pusher::{self, hooks};
use crate::webhook::{Event, Webhooks};

/// Reports buffered for the tracker before it counts as lagging (and resynchronises).
const REPORT_QUEUE: usize = 16_384;
/// Workers first seen this soon after the tracker starts are taken in without events.
const INITIAL_SYNC: Duration = Duration::from_secs(3);

/// A name and what it names.
type Key = (Kind, String);

/// The longest wait before a Pusher channel counts as vacated, or a member as removed.
pub const PUSHER_DELAY: Duration = Duration::from_secs(3);

/// Where events go.
#[derive(Default)]
pub struct Sinks {
    /// Users and topics (`--webhook`).
    pub native: Option<Arc<Webhooks>>,
    /// Pusher apps' channels and members.
    pub apps: Option<Arc<hooks::Hooks>>,
}

/// Changes held for a worker while it is asked for all it holds, before it is asked again
/// instead.
const MAX_HELD_CHANGES: usize = 65_536;

/// What a worker answered when asked for all its users and topics.
enum Dumped {
    /// Its users and topics, and the number of its latest change they include.
    Names { worker: String, names: HashSet<Key>, seq: u64 },
    /// Its gateway is gone.
    Gone(String),
    /// No whole answer (the broker, or a gateway alive but slow): asked again at its next sign.
    Failed(String),
}

#[derive(Default)]
struct WorkerView {
    seq: u64,
    names: HashSet<Key>,
}

struct Tracker {
    asker: Arc<Asker>,
    sinks: Sinks,
    delay: Duration,
    started: Instant,
    workers: HashMap<String, WorkerView>,
    /// How many workers hold each user and topic.
    holders: HashMap<Key, u32>,
    /// Users and topics nobody holds, and when they count as gone.
    pending: HashMap<Key, Instant>,
    /// Workers being asked for all they hold, and the changes they reported meanwhile (`None`:
    /// too many, ask again).
    resyncing: HashMap<String, Option<Vec<Change>>>,
    dumps: tokio::sync::mpsc::UnboundedSender<Dumped>,
}

/// Start tracking presence through `asker`, sending events to `hooks`.
pub fn spawn(asker: Arc<Asker>, sinks: Sinks, offline_delay: Duration) {
    let reports = asker.reports(REPORT_QUEUE);
    // Unbounded, but holds at most one answer per worker: one question per worker at a time.
    let (dumps, dumped) = tokio::sync::mpsc::unbounded_channel();
    let t = Tracker {
        resyncing: HashMap::new(),
        dumps,
        asker,
        sinks,
        delay: offline_delay,
        started: Instant::now(),
        workers: HashMap::new(),
        holders: HashMap::new(),
        pending: HashMap::new(),
    };
    tokio::spawn(t.run(reports, dumped));
}

/// The gateway node a worker id belongs to (`NODE-N`).
fn node_of(worker: &str) -> &str {
    worker.rsplit_once('-').map_or(worker, |(n, _)| n)
}

impl Tracker {
    async fn run(
        mut self,
        mut reports: tokio::sync::mpsc::Receiver<Report>,
        mut dumped: tokio::sync::mpsc::UnboundedReceiver<Dumped>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Hear from every gateway at once rather than within a third of a lease.
        let asker = self.asker.clone();
        tokio::spawn(async move {
            while !asker.hello().await {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        loop {
            tokio::select! {
                r = reports.recv() => match r {
                    None => return,
                    Some(Report::Changes { worker, changes }) => self.changes(&worker, changes),
                    Some(Report::Heartbeat(hb)) => {
                        for (w, seq) in hb.workers_seq {
                            if self.workers.get(&w).is_none_or(|v| v.seq < seq) {
                                self.resync(&w);
                            }
                        }
                    }
                },
                Some(d) = dumped.recv() => self.dumped(d),
                _ = tick.tick() => self.tick(),
            }
        }
    }

    fn changes(&mut self, worker: &str, changes: Vec<Change>) {
        if let Some(held) = self.resyncing.get_mut(worker) {
            // Applied once its users and topics are in, after those they include.
            if let Some(h) = held {
                match h.len() + changes.len() > MAX_HELD_CHANGES {
                    true => *held = None,
                    false => h.extend(changes),
                }
            }
            return;
        }
        let Some(view) = self.workers.get_mut(worker) else {
            return self.resync(worker);
        };
        let (mut edits, mut gap) = (Vec::new(), false);
        for c in changes {
            if c.seq <= view.seq {
                continue;
            }
            if c.seq != view.seq + 1 {
                gap = true;
                break;
            }
            view.seq = c.seq;
            let key = (c.kind, c.name);
            let changed = if c.up { view.names.insert(key.clone()) } else { view.names.remove(&key) };
            if changed {
                edits.push((c.up, key));
            }
        }
        for (up, key) in edits {
            self.edit(up, key, true);
        }
        if gap {
            self.resync(worker);
        }
    }

    /// Ask a worker for all its users and topics again, unless that is under way; the answer
    /// comes back to [`Tracker::dumped`].
    fn resync(&mut self, worker: &str) {
        if self.resyncing.contains_key(worker) {
            return;
        }
        self.resyncing.insert(worker.to_owned(), Some(Vec::new()));
        let (asker, dumps, worker) = (self.asker.clone(), self.dumps.clone(), worker.to_owned());
        tokio::spawn(async move {
            let _ = dumps.send(dump(&asker, worker).await);
        });
    }

    /// Take in what a worker answered, then the changes it reported meanwhile.
    fn dumped(&mut self, d: Dumped) {
        let (worker, names, seq) = match d {
            Dumped::Names { worker, names, seq } => (worker, names, seq),
            Dumped::Gone(worker) => {
                self.resyncing.remove(&worker);
                return self.forget(&worker);
            }
            Dumped::Failed(worker) => {
                self.resyncing.remove(&worker);
                return;
            }
        };
        let held = self.resyncing.remove(&worker).flatten();
        let announce = self.workers.contains_key(&worker) || self.started.elapsed() > INITIAL_SYNC;
        let view = self.workers.entry(worker.clone()).or_default();
        view.seq = seq;
        let old = std::mem::replace(&mut view.names, names.clone());
        for key in old.difference(&names) {
            self.edit(false, key.clone(), announce);
        }
        for key in names.difference(&old) {
            self.edit(true, key.clone(), announce);
        }
        match held {
            Some(changes) => self.changes(&worker, changes),
            None => self.resync(&worker),
        }
    }

    /// A worker is gone: everything it held is gone with it.
    fn forget(&mut self, worker: &str) {
        if let Some(view) = self.workers.remove(worker) {
            for key in view.names {
                self.edit(false, key, true);
            }
        }
    }

    /// One worker more (`up`) or fewer holds `key`.
    fn edit(&mut self, up: bool, key: Key, announce: bool) {
        if up {
            let n = self.holders.entry(key.clone()).or_insert(0);
            *n += 1;
            // Back before its delay ran out: as if it had never gone.
            if *n == 1 && self.pending.remove(&key).is_none() && announce {
                self.announce(true, &key);
            }
        } else if let Some(n) = self.holders.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.holders.remove(&key);
                let delay = match key.0 {
                    Kind::User | Kind::Topic => self.delay,
                    Kind::Channel | Kind::Member => self.delay.min(PUSHER_DELAY),
                };
                self.pending.insert(key, Instant::now() + delay);
            }
        }
    }

    fn announce(&self, up: bool, (kind, name): &Key) {
        let (native, apps) = (&self.sinks.native, &self.sinks.apps);
        match (kind, up, native, apps) {
            (Kind::User, true, Some(h), _) => h.send(&Event::user("user_online", name)),
            (Kind::User, false, Some(h), _) => h.send(&Event::user("user_offline", name)),
            (Kind::Topic, true, Some(h), _) => h.send(&Event::channel("channel_occupied", name)),
            (Kind::Topic, false, Some(h), _) => h.send(&Event::channel("channel_vacated", name)),
            (Kind::Channel, up, _, Some(h)) => {
                let Some((app, channel)) = pusher::app_channel(name) else { return };
                let event = if up { "channel_occupied" } else { "channel_vacated" };
                h.send(app, &hooks::Event::new(event, channel));
            }
            (Kind::Member, up, _, Some(h)) => {
                let Some((channel, user)) = name.split_once('\n') else { return };
                let Some((app, channel)) = pusher::app_channel(channel) else { return };
                let event = if up { "member_added" } else { "member_removed" };
                h.send(app, &hooks::Event { user_id: Some(user), ..hooks::Event::new(event, channel) });
            }
            _ => {}
        }
    }

    fn tick(&mut self) {
        if self.asker.reports_lost.swap(false, Ordering::Relaxed) {
            let known: Vec<String> = self.workers.keys().cloned().collect();
            for w in known {
                self.resync(&w);
            }
        }
        let alive: HashSet<String> = self.asker.alive().into_iter().map(|hb| hb.node).collect();
        let dead: Vec<String> = self.workers.keys().filter(|w| !alive.contains(node_of(w))).cloned().collect();
        for w in dead {
            self.forget(&w);
        }
        let now = Instant::now();
        let due: Vec<Key> = self.pending.iter().filter(|(_, at)| **at <= now).map(|(k, _)| k.clone()).collect();
        for key in due {
            self.pending.remove(&key);
            self.announce(false, &key);
        }
    }
}

/// All of `worker`'s users and topics, page by page.
async fn dump(asker: &Asker, worker: String) -> Dumped {
    let mut names = HashSet::new();
    let mut seq = None;
    for kind in Kind::ALL {
        let mut after = String::new();
        loop {
            let req = Request::Dump { kind, after: after.clone() };
            let Ok(mut answers) = asker.ask(&crate::cluster::worker_channel(&worker), req, 1).await else {
                return Dumped::Failed(worker);
            };
            let Some(page) = answers.pop().filter(|a| a.ok) else {
                // Nobody answered: gone, unless its gateway is still alive (then only slow).
                let alive = asker.alive().iter().any(|hb| hb.node == node_of(&worker));
                return if alive { Dumped::Failed(worker) } else { Dumped::Gone(worker) };
            };
            seq = Some(seq.map_or(page.seq, |s: u64| s.min(page.seq)));
            let full = page.uids.len() >= crate::cluster::DUMP_PAGE;
            if let Some(last) = page.uids.last() {
                after = last.clone();
            }
            names.extend(page.uids.into_iter().map(|n| (kind, n)));
            if !full {
                break;
            }
        }
    }
    Dumped::Names { worker, names, seq: seq.unwrap_or(0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_nodes() {
        assert_eq!(node_of("web1.lx2k9a1b-12"), "web1.lx2k9a1b");
        assert_eq!(node_of("3f9a0c1b2d4e-0"), "3f9a0c1b2d4e");
    }
}
