//! A real Redis Cluster on loopback (three primaries with a replica each), for the tests of
//! every role on it.

use std::time::Duration;

use super::*;

/// `redis-cli -p PORT ARGS...`, its output.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new(find_program("redis-cli"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Six nodes with cluster mode on, made into three primaries with a replica each.
pub struct RedisCluster {
    pub nodes: Vec<(u16, Option<Proc>)>,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        let dir = std::env::temp_dir().join(format!("pushwire-rc-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let (port, bus) = (free_port(), free_port());
            let (p, b) = (port.to_string(), bus.to_string());
            let conf = dir.join(format!("nodes-{port}.conf"));
            let args = [
                "--port",
                &p,
                "--cluster-port",
                &b,
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                conf.to_str().expect("path"),
                "--cluster-node-timeout",
                "1000",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                dir.to_str().expect("path"),
                // Replicas sync at once and may always take over: the test kills a primary soon.
                "--repl-diskless-sync-delay",
                "0",
                "--cluster-replica-validity-factor",
                "0",
            ];
            nodes.push((port, Some(Proc::program(&find_program("redis-server"), &args, &[port]).await)));
        }
        let addrs: Vec<String> = nodes.iter().map(|(p, _)| format!("127.0.0.1:{p}")).collect();
        let mut create = std::process::Command::new(find_program("redis-cli"));
        create.args(["--cluster", "create"]).args(&addrs).args(["--cluster-replicas", "1", "--cluster-yes"]);
        let out = create.output().expect("redis-cli --cluster create");
        assert!(out.status.success(), "cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let cluster = RedisCluster { nodes, _dir: TempDir(dir) };
        cluster.wait_ok(true).await;
        cluster
    }

    /// Wait until every live node says the cluster is ok and, with `replicated`, every primary
    /// has a replica in sync.
    pub async fn wait_ok(&self, replicated: bool) {
        for _ in 0..200 {
            let live = self.nodes.iter().filter(|(_, p)| p.is_some());
            let ok = live.clone().all(|(port, _)| cli(*port, &["cluster", "info"]).contains("cluster_state:ok"));
            let synced = live.clone().all(|(port, _)| {
                let info = cli(*port, &["info", "replication"]);
                info.contains("role:slave") || (info.contains("connected_slaves:1") && info.contains("state=online"))
            });
            if ok && (synced || !replicated) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("redis cluster never became ok");
    }

    /// The broker URL naming the first `seeds` nodes.
    pub fn url(&self, seeds: usize) -> String {
        let seeds: Vec<String> = self.nodes.iter().take(seeds).map(|(p, _)| format!("127.0.0.1:{p}")).collect();
        format!("redis-cluster://{}", seeds.join(","))
    }

    pub fn live_port(&self) -> u16 {
        self.nodes.iter().find(|(_, p)| p.is_some()).map(|(port, _)| *port).expect("a live node")
    }

    /// The port of the primary that owns `channel`'s slot, as a live node sees it.
    pub fn owner(&self, channel: &str) -> u16 {
        let slot: u16 = cli(self.live_port(), &["cluster", "keyslot", channel]).trim().parse().expect("slot");
        for line in cli(self.live_port(), &["cluster", "nodes"]).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let owns = f[8..].iter().any(|r| match r.split_once('-') {
                Some((a, b)) => (a.parse().unwrap_or(u16::MAX)..=b.parse().unwrap_or(0)).contains(&slot),
                None => r.parse() == Ok(slot),
            });
            if owns {
                let addr = f[1].split('@').next().unwrap_or_default();
                return addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).expect("port");
            }
        }
        panic!("no primary owns slot {slot}");
    }

    pub fn kill(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|(p, _)| *p == port).expect("node");
        node.1.take().expect("running").kill();
    }
}
