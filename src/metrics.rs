//! Process-wide counters, exposed as Prometheus text on `/metrics`, and [`LogEvery`], which keeps
//! a warning that repeats per message or per connection from flooding the log.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets a repeated log line through at most once per interval and counts the ones held back.
pub struct LogEvery {
    interval: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogEvery {
    pub const fn new(interval: Duration) -> LogEvery {
        LogEvery { interval, state: Mutex::new((None, 0)) }
    }

    /// `Some(n)` when a line may be logged now, `n` being how many were held back since the last.
    pub fn ready(&self) -> Option<u64> {
        let mut st = crate::io::lock(&self.state);
        let now = Instant::now();
        match st.0 {
            Some(last) if now.duration_since(last) < self.interval => {
                st.1 += 1;
                None
            }
            _ => {
                let held = std::mem::take(&mut st.1);
                st.0 = Some(now);
                Some(held)
            }
        }
    }
}

/// Counters of one process. Gauges are computed when rendered.
#[derive(Debug, Default)]
pub struct Metrics {
    pub ws_connections_total: AtomicU64,
    pub sse_connections_total: AtomicU64,
    pub ws_connections_refused: AtomicU64,
    pub deliveries: AtomicU64,
    pub undeliverable: AtomicU64,
    pub slow_consumer_disconnects: AtomicU64,
    pub bad_client_frames: AtomicU64,
    pub broker_messages: AtomicU64,
    pub bad_broker_messages: AtomicU64,
    pub subscriber_drops: AtomicU64,
    pub publish_requests: AtomicU64,
    pub publish_errors: AtomicU64,
    pub bad_requests: AtomicU64,
    pub broker_link_failures: AtomicU64,
    pub duplicates: AtomicU64,
    pub gaps: AtomicU64,
    pub gaps_unrepaired: AtomicU64,
    pub recoveries: AtomicU64,
    pub recoveries_failed: AtomicU64,
    pub tls_reload_failures: AtomicU64,
}

/// The counters of this process.
pub static GLOBAL: Metrics = Metrics {
    ws_connections_total: AtomicU64::new(0),
    sse_connections_total: AtomicU64::new(0),
    ws_connections_refused: AtomicU64::new(0),
    deliveries: AtomicU64::new(0),
    undeliverable: AtomicU64::new(0),
    slow_consumer_disconnects: AtomicU64::new(0),
    bad_client_frames: AtomicU64::new(0),
    broker_messages: AtomicU64::new(0),
    bad_broker_messages: AtomicU64::new(0),
    subscriber_drops: AtomicU64::new(0),
    publish_requests: AtomicU64::new(0),
    publish_errors: AtomicU64::new(0),
    bad_requests: AtomicU64::new(0),
    broker_link_failures: AtomicU64::new(0),
    duplicates: AtomicU64::new(0),
    gaps: AtomicU64::new(0),
    gaps_unrepaired: AtomicU64::new(0),
    recoveries: AtomicU64::new(0),
    recoveries_failed: AtomicU64::new(0),
    tls_reload_failures: AtomicU64::new(0),
};

/// Render the counters plus `gauges` (name, help, value) as Prometheus text.
pub fn render(gauges: &[(&str, &str, u64)]) -> String {
    render_with(gauges, &[])
}

/// Render the counters plus extra `gauges` and `counters` (name, help, value) as Prometheus text.
pub fn render_with(gauges: &[(&str, &str, u64)], extra_counters: &[(&str, &str, u64)]) -> String {
    let m = &GLOBAL;
    let counters: &[(&str, &str, &AtomicU64)] = &[
        ("ws_connections_total", "WebSocket connections accepted", &m.ws_connections_total),
        ("sse_connections_total", "Server-Sent Events streams accepted", &m.sse_connections_total),
        ("ws_connections_refused_total", "WebSocket connections refused at the limit", &m.ws_connections_refused),
        ("deliveries_total", "frames queued to WebSocket clients", &m.deliveries),
        ("undeliverable_total", "targeted pushes whose connection does not exist", &m.undeliverable),
        (
            "slow_consumer_disconnects_total",
            "clients cut off because their queue was full",
            &m.slow_consumer_disconnects,
        ),
        ("bad_client_frames_total", "connections closed for a bad WebSocket frame", &m.bad_client_frames),
        ("broker_messages_total", "messages received from the broker", &m.broker_messages),
        ("bad_broker_messages_total", "broker messages that were not valid pushes", &m.bad_broker_messages),
        ("subscriber_drops_total", "broker messages dropped because a subscriber was full", &m.subscriber_drops),
        ("publish_requests_total", "publish requests answered ok", &m.publish_requests),
        ("publish_errors_total", "publish requests the broker did not confirm", &m.publish_errors),
        ("bad_requests_total", "HTTP requests refused as invalid", &m.bad_requests),
        (
            "broker_link_failures_total",
            "broker connections that failed or were lost before or after working",
            &m.broker_link_failures,
        ),
        ("duplicates_total", "broker messages dropped as already delivered (offset seen)", &m.duplicates),
        ("gaps_total", "gaps in a channel's offsets found by a worker", &m.gaps),
        ("gaps_unrepaired_total", "gaps history could not fill (clients told recovered:false)", &m.gaps_unrepaired),
        ("recoveries_total", "channels recovered on reconnect (recover=)", &m.recoveries),
        ("recoveries_failed_total", "channels whose recovery the history could not serve", &m.recoveries_failed),
        (
            "tls_reload_failures_total",
            "TLS certificate reloads refused (the previous one kept)",
            &m.tls_reload_failures,
        ),
    ];
    let mut out = String::new();
    for &(name, help, v) in counters {
        let _ = write!(
            out,
            "# HELP pushwire_{name} {help}\n# TYPE pushwire_{name} counter\npushwire_{name} {}\n",
            v.load(Ordering::Relaxed)
        );
    }
    for (name, help, v) in extra_counters {
        let _ = write!(out, "# HELP pushwire_{name} {help}\n# TYPE pushwire_{name} counter\npushwire_{name} {v}\n");
    }
    for (name, help, v) in gauges {
        let _ = write!(out, "# HELP pushwire_{name} {help}\n# TYPE pushwire_{name} gauge\npushwire_{name} {v}\n");
    }
    out
}

#[cfg(test)]
mod log_tests {
    use super::*;

    #[test]
    fn log_every_holds_back_and_counts() {
        let l = LogEvery::new(Duration::from_millis(50));
        assert_eq!(l.ready(), Some(0));
        assert_eq!((l.ready(), l.ready()), (None, None));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(l.ready(), Some(2));
    }
}
