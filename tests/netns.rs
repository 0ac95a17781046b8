//! The seed's deployment on five hosts: network namespaces that this test creates and removes,
//! joined by a bridge in a sixth "switch" namespace. Host 1 runs the channel server, hosts 2 and 3
//! the gateways, hosts 4 and 5 the publishers; the clients (the seed's browser) run in host 6.
//! Addresses are 10.231.N.0/24, which exists only inside these namespaces.
//!
//! The client side is the `#[ignore]`d test `netns_clients`, which this test re-runs inside host 6
//! with `ip netns exec`. It checks the seed's steps across hosts, then the faults: a black-holed
//! channel host and a killed and restarted channel server, while broadcasts keep coming. The rule:
//! every publish answered `ok` reaches every client; the others are answered 503.
//! Needs root (CI runs as root); without namespaces it fails with a clear message.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const SECRET: &str = "netns-secret";
const KEY: &str = "netns-key";
const SPEC_ENV: &str = "PUSHWIRE_NETNS_SPEC";

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// The namespaces of one run; all removed on drop (their veths go with them).
struct Net {
    tag: u32,
}

impl Net {
    fn ns(&self, host: usize) -> String {
        format!("pwt-{}-h{host}", self.tag)
    }
    fn switch(&self) -> String {
        format!("pwt-{}-sw", self.tag)
    }
    fn prefix(&self) -> String {
        format!("10.231.{}", self.tag % 250)
    }

    fn create() -> Net {
        remove_stale();
        let net = Net { tag: std::process::id() };
        let sw = net.switch();
        let setup = || -> Result<(), String> {
            ip(&["netns", "add", &sw])?;
            ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
            ip(&["-n", &sw, "link", "set", "br0", "up"])?;
            for h in 1..=6 {
                let ns = net.ns(h);
                let port = format!("h{h}");
                ip(&["netns", "add", &ns])?;
                ip(&["-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
                ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
                ip(&["-n", &ns, "addr", "add", &format!("{}.{h}/24", net.prefix()), "dev", "eth0"])?;
                ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
                ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            }
            Ok(())
        };
        if let Err(e) = setup() {
            drop(net);
            panic!("cannot build the five-host network with network namespaces (needs root and iproute2): {e}");
        }
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in 1..=6 {
            let _ = ip(&["netns", "del", &self.ns(h)]);
        }
        let _ = ip(&["netns", "del", &self.switch()]);
    }
}

/// Remove namespaces left by an earlier run that was killed (its process is gone).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name.strip_prefix("pwt-").and_then(|r| r.split('-').next()) else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

#[test]
fn five_hosts_over_network_namespaces() {
    if !have(&["ip"], true) {
        return;
    }
    let net = Net::create();
    let exe = std::env::current_exe().expect("test executable");
    let out = Command::new("ip")
        .args(["netns", "exec", &net.ns(6)])
        .arg(exe)
        .args(["netns_clients", "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
        .env(SPEC_ENV, format!("{} {}", net.tag, net.prefix()))
        .output()
        .expect("run the client side in host 6");
    let report = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{report}");
    assert!(out.status.success(), "client side failed:\n{report}");
    assert!(report.contains("1 passed"), "the client side ran:\n{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by five_hosts_over_network_namespaces inside host 6"]
async fn netns_clients() {
    let Ok(spec) = std::env::var(SPEC_ENV) else {
        panic!("{SPEC_ENV} is not set: this test runs inside host 6 of five_hosts_over_network_namespaces");
    };
    let (tag, prefix) = spec.split_once(' ').expect("spec");
    let net = Net { tag: tag.parse().expect("tag") };
    let bin = env!("CARGO_BIN_EXE_pushwire");
    let on = |host: usize, args: &[&str]| -> Vec<String> {
        let mut v = vec!["ip".into(), "netns".into(), "exec".into(), net.ns(host), bin.into()];
        v.extend(args.iter().map(|a| a.to_string()));
        v
    };
    let addr = |host: usize, port: u16| format!("{prefix}.{host}:{port}");
    let broker = format!("channel://:{SECRET}@{}", addr(1, 2206));
    let channel_cmd = on(1, &["channel", "--listen", &addr(1, 2206), "--secret", SECRET]);
    let mut procs = vec![Proc::command(&channel_cmd, &[addr(1, 2206).into()]).await];
    for h in [2, 3] {
        let cmd = on(h, &["gateway", "--listen", &addr(h, 4236), "--broker", &broker]);
        procs.push(Proc::command(&cmd, &[addr(h, 4236).into()]).await);
    }
    for h in [4, 5] {
        let cmd = on(h, &["publisher", "--listen", &addr(h, 4237), "--broker", &broker, "--publish-key", KEY]);
        procs.push(Proc::command(&cmd, &[addr(h, 4237).into()]).await);
    }
    let cluster = Cluster {
        procs,
        channel_port: 2206,
        gateways: [addr(2, 4236).into(), addr(3, 4236).into()],
        publishers: [addr(4, 4237).into(), addr(5, 4237).into()],
        key_query: format!("&key={KEY}"),
        paused: Default::default(),
        broker_killed_at: Default::default(),
    };
    cluster.wait_healthy().await;

    // The seed's test, across hosts.
    let clients = check_seed_pushes(&cluster, cluster.clients(100).await, "seed").await;
    assert_eq!(cluster.publish(0, "content=nokey").await.0, 200);
    assert_eq!(http_get(&cluster.publishers[0], "/?content=nokey").await.0, 401, "publishers need the key");
    let clients = collect_until(clients, "nokey", WAIT).await.into_iter().map(|(c, _)| c).collect::<Vec<_>>();

    // Faults while broadcasts keep coming.
    let cluster = Arc::new(cluster);
    let receivers = tokio::spawn(collect_until(clients, "end", Duration::from_secs(120)));
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (cluster, stop) = (cluster.clone(), stop.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let (status, _) = cluster.publish(i, &format!("content=f-{i}")).await;
                answers.push((i, status, Instant::now()));
                i += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            answers
        })
    };
    let wait_ok_again = || async {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            assert!(Instant::now() < deadline, "publishing never recovered");
            if cluster.publish(0, "content=probe").await.0 == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A black hole: host 1's port leaves the bridge; no reset, no error, just silence.
    let sw = net.switch();
    let hole = Instant::now();
    ip(&["-n", &sw, "link", "set", "h1", "nomaster"]).expect("black-hole host 1");
    tokio::time::sleep(Duration::from_secs(4)).await;
    ip(&["-n", &sw, "link", "set", "h1", "master", "br0"]).expect("reconnect host 1");
    let hole_end = Instant::now();
    wait_ok_again().await;
    // Kill and restart the channel server (the only process in host 1).
    let killed = Instant::now();
    Command::new("kill").args(["-9", &channel_pid(&net)]).status().expect("kill channel server");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _restarted = Proc::command(&channel_cmd, &[addr(1, 2206).into()]).await;
    wait_ok_again().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let answers = publisher.await.expect("publisher task");
    assert_eq!(cluster.publish(1, "content=end").await, (200, "ok".into()));
    let results = receivers.await.expect("receivers");

    let ok: HashSet<String> = answers.iter().filter(|a| a.1 == 200).map(|a| format!("f-{}", a.0)).collect();
    let refused = answers.iter().filter(|a| a.1 == 503).count();
    let in_hole = answers.iter().filter(|a| a.2 > hole && a.2 < hole_end && a.1 == 503).count();
    let after_kill = answers.iter().filter(|a| a.2 > killed && a.1 == 503).count();
    println!(
        "faults: {} publishes, {} ok, {refused} answered 503 ({in_hole} in the black hole, {after_kill} after the kill)",
        answers.len(),
        ok.len()
    );
    assert!(answers.iter().all(|a| a.1 == 200 || a.1 == 503), "only ok or 503: {answers:?}");
    assert!(in_hole > 0 && after_kill > 0, "the faults were felt");
    assert!(ok.len() > 20, "publishing worked around the faults");
    let mut back = Vec::new();
    for (c, got) in results {
        assert_eq!(got.last().map(String::as_str), Some("end"), "client {} {} recovered", c.worker, c.conn);
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for m in got.iter().filter(|m| m.starts_with("f-")) {
            *seen.entry(m).or_default() += 1;
        }
        assert!(seen.values().all(|n| *n == 1), "no duplicates for {} {}", c.worker, c.conn);
        let missing: Vec<_> = ok.iter().filter(|m| !seen.contains_key(m.as_str())).collect();
        assert!(missing.is_empty(), "client {} {} lost publishes answered ok: {missing:?}", c.worker, c.conn);
        back.push(c);
    }
    // After recovery, the seed's test passes again, targeted pushes included.
    check_seed_pushes(&cluster, back, "after").await;
}

/// The pid of the channel server running in host 1.
fn channel_pid(net: &Net) -> String {
    let out = Command::new("ip").args(["netns", "pids", &net.ns(1)]).output().expect("ip netns pids");
    let pids = String::from_utf8_lossy(&out.stdout);
    pids.split_whitespace().next().expect("a process in host 1").to_owned()
}
