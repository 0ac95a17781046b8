//! The seed's cluster on a real Redis Cluster (three primaries, three replicas, on loopback):
//! sharded pub/sub, and the loss of the primary that owns the broadcast channel's slot, ridden out
//! by failover to its replica with no confirmed push lost; users, history, and the Pusher
//! protocol there.

mod common;

use std::time::Duration;

use common::redis_cluster::{cli, RedisCluster};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_cluster_on_redis_cluster_with_failover() {
    if !have(&["redis-server", "redis-cli"], false) {
        return;
    }
    let mut rc = RedisCluster::start().await;
    let cluster = Cluster::start(Some(rc.url(2))).await;
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
    let broker = rc.url(2);
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
    pusher_across_two_gateways(Some(rc.url(2))).await;
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
    let broker = rc.url(2);
    let cluster = Cluster::start_with(Some(broker), &["--token-secret", recovery::SECRET], &[]).await;
    recovery::recovery(&recovery::Nodes::of(&cluster)).await;
    let owner = rc.owner("pushwire.topic:news");
    assert_eq!(cli(owner, &["exists", "{pushwire.topic:news}.s"]).trim(), "1", "the stream is on the channel's shard");
}
