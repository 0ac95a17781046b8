//! The seed's cluster on a real Redis Cluster (three primaries, three replicas, on loopback):
//! sharded pub/sub, and the loss of the primary that owns the broadcast channel's slot, ridden out
//! by failover to its replica with no confirmed push lost; users, history, and the Pusher
//! protocol there.

mod common;

use std::time::Duration;

use common::*;

/// `redis-cli -p PORT ARGS...`, its output.
fn cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new(find_program("redis-cli"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Six nodes with cluster mode on, made into three primaries with a replica each.
struct RedisCluster {
    nodes: Vec<(u16, Option<Proc>)>,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl RedisCluster {
    async fn start() -> RedisCluster {
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
    async fn wait_ok(&self, replicated: bool) {
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

    fn live_port(&self) -> u16 {
        self.nodes.iter().find(|(_, p)| p.is_some()).map(|(port, _)| *port).expect("a live node")
    }

    /// The port of the primary that owns `channel`'s slot, as a live node sees it.
    fn owner(&self, channel: &str) -> u16 {
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

    fn kill(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|(p, _)| *p == port).expect("node");
        node.1.take().expect("running").kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_cluster_on_redis_cluster_with_failover() {
    if !have(&["redis-server", "redis-cli"], false) {
        return;
    }
    let mut rc = RedisCluster::start().await;
    let seeds: Vec<String> = rc.nodes.iter().take(2).map(|(p, _)| format!("127.0.0.1:{p}")).collect();
    let cluster = Cluster::start(Some(format!("redis-cluster://{}", seeds.join(",")))).await;
    let clients = check_seed_pushes(&cluster, cluster.clients(40).await, "before").await;

    // Sharded pub/sub: the broadcast channel lives on the shard that owns its slot, and nowhere as
    // a classic channel.
    let owner = rc.owner("pushwire.broadcast");
    assert!(cli(owner, &["pubsub", "shardchannels"]).contains("pushwire.broadcast"), "SSUBSCRIBE on the owner");
    for (port, _) in &rc.nodes {
        assert!(!cli(*port, &["pubsub", "channels"]).contains("pushwire."), "no classic SUBSCRIBE on {port}");
    }

    // Lose that primary under continuous publishing: its replica takes over.
    let failover = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        rc.kill(owner);
        *cluster.broker_killed_at.lock().expect("lock") = Some(tokio::time::Instant::now());
        tokio::time::sleep(Duration::from_millis(500)).await;
        rc.wait_ok(false).await;
        cluster.wait_healthy().await;
    };
    let (clients, confirmed, refused) = every_ok_arrives(&cluster, clients, "live", failover).await;
    assert!(confirmed > 10, "publishes confirmed around the failover ({confirmed}, {refused} refused)");
    let new_owner = rc.owner("pushwire.broadcast");
    assert_ne!(new_owner, owner, "the replica took over the slot");
    assert!(cli(new_owner, &["pubsub", "shardchannels"]).contains("pushwire.broadcast"), "resubscribed there");
    check_seed_pushes(&cluster, clients, "after").await;
}

/// Users on Redis Cluster: a user's channel is a sharded channel on the primary that owns its
/// slot while a gateway holds one of the user's connections, and is gone from it once the last
/// one closes; pushes to the user reach each of its connections once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_redis_cluster() {
    if !have(&["redis-server", "redis-cli"], false) {
        return;
    }
    const SECRET: &str = "rc-users";
    let rc = RedisCluster::start().await;
    let seeds: Vec<String> = rc.nodes.iter().take(2).map(|(p, _)| format!("127.0.0.1:{p}")).collect();
    let broker = format!("redis-cluster://{}", seeds.join(","));
    let cluster = Cluster::start_with(Some(broker), &["--token-secret", SECRET], &[]).await;
    let mut devices = Vec::new();
    for gw in [0, 1, 1] {
        devices.push(connect_with(&cluster.gateways[gw], &user_token(SECRET, "carla", &[])).await);
    }
    let owner = rc.owner("pushwire.user:carla");
    assert!(cli(owner, &["pubsub", "shardchannels"]).contains("pushwire.user:carla"), "SSUBSCRIBE on the owner");
    assert_eq!(cluster.publish(0, "to_uid=carla&content=c1").await.0, 200);
    // The marker on the same channel (and so the same shard): it comes after c1.
    assert_eq!(cluster.publish(1, "to_uid=carla&content=c-end").await.0, 200);
    for (_, msgs) in collect_until(devices, "c-end", WAIT).await {
        assert_eq!(msgs, ["c1", "c-end"]);
    }
    // All three closed (dropped): the shard channel goes away.
    let mut gone = false;
    for _ in 0..50 {
        if !cli(owner, &["pubsub", "shardchannels"]).contains("pushwire.user:carla") {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "no gateway holds carla: SUNSUBSCRIBEd");
}

/// The Pusher protocol on Redis Cluster: pusher-js, Laravel Echo and the Node SDK across two
/// gateways (channels by interest, presence, cache channels kept in their channel's slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_on_redis_cluster() {
    if !have(&["redis-server", "redis-cli"], false) {
        return;
    }
    let rc = RedisCluster::start().await;
    let seeds: Vec<String> = rc.nodes.iter().take(2).map(|(p, _)| format!("127.0.0.1:{p}")).collect();
    pusher_across_two_gateways(Some(format!("redis-cluster://{}", seeds.join(",")))).await;
}

/// History on Redis Cluster: each channel's stream and offset live in its sharded channel's slot
/// (the publish script runs there and publishes with `SPUBLISH`); recovery on reconnect, across
/// gateways, as on a single Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_on_redis_cluster() {
    if !have(&["redis-server", "redis-cli"], false) {
        return;
    }
    let rc = RedisCluster::start().await;
    let seeds: Vec<String> = rc.nodes.iter().take(2).map(|(p, _)| format!("127.0.0.1:{p}")).collect();
    let broker = format!("redis-cluster://{}", seeds.join(","));
    let cluster = Cluster::start_with(Some(broker), &["--token-secret", recovery::SECRET], &[]).await;
    recovery::recovery(&recovery::Nodes::of(&cluster)).await;
    let owner = rc.owner("pushwire.topic:news");
    assert_eq!(cli(owner, &["exists", "{pushwire.topic:news}.s"]).trim(), "1", "the stream is on the channel's shard");
}
