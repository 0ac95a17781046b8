//! The results, printable for people and as JSON (written by hand: no serde dependency).

use std::fmt::Write as _;

pub struct Rss {
    pub pid: u32,
    pub before_kb: u64,
    pub after_kb: u64,
    pub per_connection_kb: f64,
}

/// The recoverers: how many, how many failed, the median of messages each recovered, and
/// the time from connecting to the `recovered` notice (p50, p90, p99, p99.9, max).
pub struct Recovery {
    pub clients: u64,
    pub failed: u64,
    pub messages: u64,
    pub ms: [f64; 5],
}

pub struct Summary {
    pub mode: String,
    pub clients: usize,
    pub connect_per_s: f64,
    pub published: u64,
    pub publish_errors: u64,
    pub publish_per_s: f64,
    pub deliveries: u64,
    pub deliveries_per_s: f64,
    /// Bytes read from the gateways per delivery (frames, pings and all).
    pub wire_bytes_per_delivery: f64,
    pub missing: u64,
    pub duplicates: u64,
    pub misdelivered: u64,
    /// p50, p90, p99, p99.9, max.
    pub latency_ms: [f64; 5],
    pub publish_latency_ms: [f64; 5],
    /// Broadcasts: send to arrival at the last client.
    pub fanout_ms: [f64; 5],
    pub rss: Vec<Rss>,
    /// CPU time of the `--pid` processes from the first publish until deliveries drained, in
    /// ms, and per delivery in µs.
    pub cpu_ms: f64,
    pub cpu_us_per_delivery: f64,
    pub recovery: Option<Recovery>,
}

impl Summary {
    pub fn human(&self) -> String {
        let pct = |a: &[f64; 5]| {
            format!("p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}", a[0], a[1], a[2], a[3], a[4])
        };
        let mut s = format!(
            "mode {}: {} clients (connected at {:.0}/s)\n\
             published {} ({:.0}/s, {} errors), deliveries {} ({:.0}/s, {:.1} bytes on the wire each)\n\
             missing {}, duplicates {}, misdelivered {}\n\
             delivery latency ms: {}\n\
             publish latency ms:  {}\n\
             fan-out complete ms: {}",
            self.mode,
            self.clients,
            self.connect_per_s,
            self.published,
            self.publish_per_s,
            self.publish_errors,
            self.deliveries,
            self.deliveries_per_s,
            self.wire_bytes_per_delivery,
            self.missing,
            self.duplicates,
            self.misdelivered,
            pct(&self.latency_ms),
            pct(&self.publish_latency_ms),
            pct(&self.fanout_ms),
        );
        if !self.rss.is_empty() && self.deliveries > 0 {
            let _ = write!(s, "\nserver CPU {:.0} ms, {:.2} µs per delivery", self.cpu_ms, self.cpu_us_per_delivery);
        }
        for r in &self.rss {
            let _ = write!(
                s,
                "\npid {}: RSS {} kB -> {} kB, {:.2} kB per connection",
                r.pid, r.before_kb, r.after_kb, r.per_connection_kb
            );
        }
        if let Some(r) = &self.recovery {
            let _ = write!(
                s,
                "\nrecoverers {} ({} failed, {} messages each): connect to notice ms: {}",
                r.clients,
                r.failed,
                r.messages,
                pct(&r.ms)
            );
        }
        s
    }

    pub fn json(&self) -> String {
        let arr = |a: &[f64; 5]| {
            format!("{{\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{},\"max\":{}}}", a[0], a[1], a[2], a[3], a[4])
        };
        let rss: Vec<String> = self
            .rss
            .iter()
            .map(|r| {
                format!(
                    "{{\"pid\":{},\"before_kb\":{},\"after_kb\":{},\"per_connection_kb\":{:.3}}}",
                    r.pid, r.before_kb, r.after_kb, r.per_connection_kb
                )
            })
            .collect();
        let recovery = self.recovery.as_ref().map_or(String::new(), |r| {
            format!(
                ",\"recovery\":{{\"clients\":{},\"failed\":{},\"messages\":{},\"ms\":{}}}",
                r.clients,
                r.failed,
                r.messages,
                arr(&r.ms)
            )
        });
        format!(
            "{{\"mode\":\"{}\",\"clients\":{},\"connect_per_s\":{:.1},\"published\":{},\"publish_errors\":{},\
             \"publish_per_s\":{:.1},\"deliveries\":{},\"deliveries_per_s\":{:.1},\"wire_bytes_per_delivery\":{:.1},\"missing\":{},\"duplicates\":{},\
             \"misdelivered\":{},\"latency_ms\":{},\"publish_latency_ms\":{},\"fanout_ms\":{},\"rss\":[{}],\
             \"cpu_ms\":{:.1},\"cpu_us_per_delivery\":{:.3}{}}}\n",
            self.mode,
            self.clients,
            self.connect_per_s,
            self.published,
            self.publish_errors,
            self.publish_per_s,
            self.deliveries,
            self.deliveries_per_s,
            self.wire_bytes_per_delivery,
            self.missing,
            self.duplicates,
            self.misdelivered,
            arr(&self.latency_ms),
            arr(&self.publish_latency_ms),
            arr(&self.fanout_ms),
            rss.join(","),
            self.cpu_ms,
            self.cpu_us_per_delivery,
            recovery
        )
    }
}
