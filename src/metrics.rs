//! Process-wide counters, exposed as Prometheus text on `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one process. Gauges are computed when rendered.
#[derive(Debug, Default)]
pub struct Metrics {
    pub ws_connections_total: AtomicU64,
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
}

/// The counters of this process.
pub static GLOBAL: Metrics = Metrics {
    ws_connections_total: AtomicU64::new(0),
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
};

/// Render the counters plus `gauges` (name, help, value) as Prometheus text.
pub fn render(gauges: &[(&str, &str, u64)]) -> String {
    render_with(gauges, &[])
}

/// Render the counters plus extra `gauges` and `counters` (name, help, value) as Prometheus text.
pub fn render_with(gauges: &[(&str, &str, u64)], extra_counters: &[(&str, &str, u64)]) -> String {
    let m = &GLOBAL;
    let counters: [(&str, &str, &AtomicU64); 12] = [
        ("ws_connections_total", "WebSocket connections accepted", &m.ws_connections_total),
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
    ];
    let mut out = String::new();
    for (name, help, v) in counters {
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
