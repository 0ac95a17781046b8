//! More clients than one process may hold (`--processes N`): the first process re-runs itself
//! N-1 times as children (`--child K`), each connecting its share of the clients. A child reports
//! on its standard output (`connected N FAILED`, in targeted mode one `id I WORKER CONN` line per
//! client, then `ready`), waits for `drain EXPECTED` on its standard input, and answers with
//! `result JSON`: its counters, latencies and per-broadcast last arrivals, which the first process
//! merges into its own. Timestamps are wall-clock microseconds, the same in every process.

use std::ops::Range;
use std::process::Stdio;
use std::sync::atomic::Ordering::Relaxed;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::{Mode, Stats};

/// Clients `range` of `clients` split over `processes`: process `k`'s share.
pub fn share(clients: usize, processes: usize, k: usize) -> Range<usize> {
    k * clients / processes..(k + 1) * clients / processes
}

/// A child process and what it reported on connecting.
pub struct Helper {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    pub connected: u64,
    pub failed: u64,
}

/// Start children 1..`processes` with this process's own arguments.
pub fn spawn(processes: usize) -> anyhow::Result<Vec<Helper>> {
    let exe = std::env::current_exe()?;
    (1..processes)
        .map(|k| {
            let mut child = tokio::process::Command::new(&exe)
                .args(std::env::args_os().skip(1))
                .args(["--child", &k.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting load-tool process {k}"))?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                bail!("load-tool process {k}: no pipes");
            };
            Ok(Helper { child, stdin, lines: BufReader::new(stdout).lines(), connected: 0, failed: 0 })
        })
        .collect()
}

impl Helper {
    /// Read the child's connection report; targeted clients' ids go into `ids`.
    pub async fn connected(&mut self, ids: &mut [Option<(String, String)>]) -> anyhow::Result<()> {
        while let Some(line) = self.lines.next_line().await? {
            let mut w = line.split_whitespace();
            match (w.next(), w.next(), w.next(), w.next()) {
                (Some("connected"), Some(n), Some(f), None) => (self.connected, self.failed) = (n.parse()?, f.parse()?),
                (Some("id"), Some(i), Some(worker), Some(conn)) => {
                    if let Some(slot) = ids.get_mut(i.parse::<usize>()?) {
                        *slot = Some((worker.to_owned(), conn.to_owned()));
                    }
                }
                (Some("ready"), ..) => return Ok(()),
                _ => bail!("load-tool process said {line:?}"),
            }
        }
        bail!("a load-tool process ended before it was ready")
    }

    /// Ask the child to wait for `expected` pushes, and merge its results into `stats`.
    pub async fn finish(mut self, expected: u64, stats: &Stats) -> anyhow::Result<()> {
        self.stdin.write_all(format!("drain {expected}\n").as_bytes()).await?;
        while let Some(line) = self.lines.next_line().await? {
            if let Some(json) = line.strip_prefix("result ") {
                merge(stats, &serde_json::from_str(json)?);
                let _ = self.child.wait().await;
                return Ok(());
            }
        }
        bail!("a load-tool process ended without its results")
    }
}

/// A child's life: `connect` its clients (they start receiving), report, wait for the drain
/// request, drain, and print the results.
pub async fn child<F>(mode: Mode, stats: &Stats, connect: F) -> anyhow::Result<()>
where
    F: std::future::Future<Output = (Vec<(usize, String, String)>, u64, Vec<tokio::task::JoinHandle<()>>)>,
{
    let (ids, failed, receivers) = connect.await;
    let mut out = format!("connected {} {failed}\n", ids.len());
    if mode == Mode::Targeted {
        for (i, worker, conn) in &ids {
            out.push_str(&format!("id {i} {worker} {conn}\n"));
        }
    }
    out.push_str("ready\n");
    let mut stdout = tokio::io::stdout();
    stdout.write_all(out.as_bytes()).await?;
    stdout.flush().await?;
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let expected = loop {
        match stdin.next_line().await? {
            Some(l) => match l.strip_prefix("drain ").and_then(|n| n.trim().parse().ok()) {
                Some(n) => break n,
                None => continue,
            },
            None => return Ok(()),
        }
    };
    stats.drain(mode, expected).await;
    for r in &receivers {
        r.abort();
    }
    let hist: Vec<[u64; 2]> =
        stats.latencies().iter_recorded().map(|v| [v.value_iterated_to(), v.count_at_value()]).collect();
    let arrivals: Vec<[u64; 2]> = (stats.last_arrival.iter().enumerate())
        .filter_map(|(s, t)| Some([s as u64, t.load(Relaxed)]).filter(|p| p[1] > 0))
        .collect();
    let result = serde_json::json!({
        "deliveries": stats.deliveries.load(Relaxed),
        "wire_bytes": stats.wire_bytes.load(Relaxed),
        "broadcasts_seen": stats.broadcasts_seen.load(Relaxed),
        "duplicates": stats.duplicates.load(Relaxed),
        "misdelivered": stats.misdelivered.load(Relaxed),
        "targeted_received": stats.targeted_received.load(Relaxed),
        "last_receive": stats.last_receive.load(Relaxed),
        "hist": hist,
        "arrivals": arrivals,
    });
    stdout.write_all(format!("result {result}\n").as_bytes()).await?;
    stdout.flush().await?;
    Ok(())
}

/// Add a child's results to this process's.
fn merge(stats: &Stats, r: &serde_json::Value) {
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    stats.deliveries.fetch_add(n("deliveries"), Relaxed);
    stats.wire_bytes.fetch_add(n("wire_bytes"), Relaxed);
    stats.broadcasts_seen.fetch_add(n("broadcasts_seen"), Relaxed);
    stats.duplicates.fetch_add(n("duplicates"), Relaxed);
    stats.misdelivered.fetch_add(n("misdelivered"), Relaxed);
    stats.targeted_received.fetch_add(n("targeted_received"), Relaxed);
    stats.last_receive.fetch_max(n("last_receive"), Relaxed);
    let pairs = |k: &str| {
        r[k].as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p.get(0)?.as_u64()?, p.get(1)?.as_u64()?)))
            .collect::<Vec<_>>()
    };
    if let Ok(mut h) = stats.hist[0].lock() {
        for (v, count) in pairs("hist") {
            let _ = h.record_n(v.max(1), count);
        }
    }
    for (seq, t) in pairs("arrivals") {
        if let Some(a) = stats.last_arrival.get(seq as usize) {
            a.fetch_max(t, Relaxed);
        }
    }
}
