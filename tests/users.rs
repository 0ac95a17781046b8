//! Users and topics: connections identified by a JWT, pushes to every connection of a user and to
//! every member of a topic across two gateways, `exclude_uid`, routing by interest (a gateway with
//! no member of a topic gets none of its messages from the broker), on every broker.

mod common;

use std::collections::HashMap;

use common::*;
use jsonwebtoken::{encode, EncodingKey, Header};

const SECRET: &str = "users-test-secret";

fn token(sub: &str, channels: &[&str]) -> String {
    user_token(SECRET, sub, channels)
}

/// The status and body of a refused upgrade with `query`.
async fn refused(gw: &Addr, query: &str) -> (u16, String) {
    let url = format!("ws://{}/?{query}", gw.0);
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            let body = String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).into_owned();
            (r.status().as_u16(), body)
        }
        other => panic!("expected a refused upgrade for {query:?}, got {:?}", other.map(|_| ())),
    }
}

/// Who is connected where in [`users_and_topics`]: (name, gateway index, token).
fn people() -> Vec<(&'static str, usize, Option<String>)> {
    vec![
        ("alice-a", 0, Some(token("alice", &[]))),
        ("alice-b", 0, Some(token("alice", &["room"]))),
        ("alice-c", 1, Some(token("alice", &[]))),
        ("bob", 0, Some(token("bob", &["room"]))),
        ("carol", 1, Some(token("carol", &["room", "news"]))),
        ("erin", 1, Some(token("erin", &["other"]))),
        ("anon-0", 0, None),
        ("anon-1", 1, None),
    ]
}

/// The whole check on a cluster of two gateways (started with `--token-secret`).
async fn users_and_topics(cluster: Cluster) {
    let mut clients = Vec::new();
    for (name, gw, tok) in people() {
        let gw = &cluster.gateways[gw];
        let c = match tok {
            Some(t) => connect_with(gw, &t).await,
            None => connect(gw).await,
        };
        clients.push((name, c));
    }
    // Routing by interest: only gateway 1 has a member of "other"; gateway 0 gets none of it.
    let before = [
        metric(&cluster.gateways[0], "pushwire_broker_messages_total").await,
        metric(&cluster.gateways[1], "pushwire_broker_messages_total").await,
    ];
    for i in 0..5 {
        assert_eq!(cluster.publish(i, &format!("to_channel=other&content=other-{i}")).await.0, 200);
    }
    let erin = &mut clients.iter_mut().find(|(n, _)| *n == "erin").expect("erin").1;
    for i in 0..5 {
        assert_eq!(next_text(&mut erin.ws).await, Some(format!("other-{i}")));
    }
    let after = [
        metric(&cluster.gateways[0], "pushwire_broker_messages_total").await,
        metric(&cluster.gateways[1], "pushwire_broker_messages_total").await,
    ];
    assert_eq!(after[0], before[0], "gateway 0 has no member of topic other: the broker sends it nothing");
    assert_eq!(after[1], before[1] + 5, "gateway 1 gets each message once (one worker holds erin)");

    let pushes = [
        "to_uid=alice&content=for-alice",
        "to_channel=room&content=room-all",
        "to_channel=room&exclude_uid=bob&content=room-not-bob",
        "content=all-but-alice-and-carol&exclude_uid=alice,carol",
        "to_uid=nobody&content=for-nobody",
        "to_channel=news&content=news",
    ];
    for (i, p) in pushes.iter().enumerate() {
        assert_eq!(cluster.publish(i, p).await, (200, "ok".to_owned()), "{p}");
    }
    let expected: HashMap<&str, Vec<&str>> = HashMap::from([
        ("alice-a", vec!["for-alice"]),
        ("alice-b", vec!["for-alice", "room-all", "room-not-bob"]),
        ("alice-c", vec!["for-alice"]),
        ("bob", vec!["room-all", "all-but-alice-and-carol"]),
        ("carol", vec!["room-all", "room-not-bob", "news"]),
        ("erin", vec!["all-but-alice-and-carol"]),
        ("anon-0", vec!["all-but-alice-and-carol"]),
        ("anon-1", vec!["all-but-alice-and-carol"]),
    ]);
    // Pushes through two publishers on different channels have no order among them: each client
    // must get exactly its set (nothing missing, nothing twice, nothing else).
    for (name, c) in &mut clients {
        let mut want: Vec<&str> = expected[name].clone();
        let mut got = Vec::new();
        while got.len() < want.len() {
            got.push(next_text(&mut c.ws).await.unwrap_or_else(|| panic!("{name}: got only {got:?}")));
        }
        got.sort();
        want.sort();
        assert_eq!(got, want, "{name}");
    }
    // Then a broadcast is the next thing every client gets: nothing more came.
    assert_eq!(cluster.publish(0, "content=end").await, (200, "ok".to_owned()));
    for (name, c) in &mut clients {
        assert_eq!(next_text(&mut c.ws).await.as_deref(), Some("end"), "{name}: nothing more");
    }

    // A connection that goes away takes its interest with it.
    let mut bob = connect_with(&cluster.gateways[0], &token("bob", &["solo"])).await;
    assert_eq!(cluster.publish(0, "to_channel=solo&content=s1").await.0, 200);
    assert_eq!(next_text(&mut bob.ws).await.as_deref(), Some("s1"));
    close(bob.ws).await;
    // Once gateway 0 has left topic solo on the broker, a push to solo followed by one to the
    // connection alice-a (on gateway 0) brings gateway 0 that one message only.
    let alice = clients.iter_mut().find(|(n, _)| *n == "alice-a").map(|(_, c)| c).expect("alice-a");
    let to_alice = format!("to_worker_id={}&to_connection_id={}", alice.worker, alice.conn);
    let deadline = tokio::time::Instant::now() + WAIT;
    for i in 0.. {
        let before = metric(&cluster.gateways[0], "pushwire_broker_messages_total").await;
        assert_eq!(cluster.publish(0, &format!("to_channel=solo&content=s{i}")).await.0, 200);
        assert_eq!(cluster.publish(0, &format!("{to_alice}&content=sync{i}")).await.0, 200);
        assert_eq!(next_text(&mut alice.ws).await, Some(format!("sync{i}")));
        let after = metric(&cluster.gateways[0], "pushwire_broker_messages_total").await;
        if after == before + 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "gateway 0 still gets topic solo from the broker");
    }
}

/// Tokens are checked before the upgrade: refused with 401 and the reason.
async fn bad_tokens(gw: &Addr) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let expired = jwt(SECRET, serde_json::json!({"sub": "a", "exp": now - 600}));
    let (status, body) = refused(gw, &format!("token={expired}")).await;
    assert_eq!((status, body.trim()), (401, "token expired"));
    let forged = jwt("not-the-secret", serde_json::json!({"sub": "a"}));
    assert_eq!(refused(gw, &format!("token={forged}")).await.0, 401);
    let (status, body) = refused(gw, "token=garbage").await;
    assert!(status == 401 && body.contains("malformed"), "{status} {body}");
    let bad_name = jwt(SECRET, serde_json::json!({"sub": "a b"}));
    assert!(refused(gw, &format!("token={bad_name}")).await.1.contains("sub"));
}

fn gateway_args() -> Vec<&'static str> {
    vec!["--token-secret", SECRET]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_channel_server() {
    let cluster = Cluster::start_with(None, &gateway_args(), &[]).await;
    bad_tokens(&cluster.gateways[0]).await;
    users_and_topics(cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis() {
    let Some((_redis, url)) = redis_broker().await else { return };
    users_and_topics(Cluster::start_with(Some(url), &gateway_args(), &[]).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_nats() {
    let Some((_nats, url)) = nats_broker().await else { return };
    users_and_topics(Cluster::start_with(Some(url), &gateway_args(), &[]).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_with_required_tokens() {
    let (_p, _c, w, h) = standalone(&["--token-secret", SECRET, "--require-token", "--workers", "3"]).await;
    let gw = Addr::from(w);
    let (status, body) = refused(&gw, "").await;
    assert_eq!((status, body.trim()), (401, "a token is required (?token=JWT)"));
    let mut a = Vec::new();
    for _ in 0..3 {
        a.push(connect_with(&gw, &token("u1", &["t"])).await); // one per worker
    }
    let mut other = connect_with(&gw, &token("u2", &[])).await;
    assert_eq!(http_get(h, "/?to_uid=u1&content=x").await.0, 200);
    assert_eq!(http_get(h, "/?to_channel=t&content=y").await.0, 200);
    assert_eq!(http_get(h, "/?to_uid=u2&content=z").await.0, 200);
    for c in &mut a {
        assert_eq!(next_text(&mut c.ws).await.as_deref(), Some("x"));
        assert_eq!(next_text(&mut c.ws).await.as_deref(), Some("y"));
    }
    assert_eq!(next_text(&mut other.ws).await.as_deref(), Some("z"));
    let (status, body) = http(h, "GET", "/?to_uid=bad%20name&content=x", &[("Accept", "application/json")], "").await;
    assert_eq!(status, 400);
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON error");
    assert_eq!(v["ok"], false);
    assert!(v["error"].as_str().unwrap().contains("to_uid"));
    let (status, body) = http(h, "GET", "/?to_uid=u2&content=j", &[("Accept", "application/json")], "").await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON answer");
    assert_eq!((status, &v["ok"]), (200, &serde_json::json!(true)));
    assert!(v["offset"].is_u64() && v["epoch"].is_string(), "the push's place in user:u2's history: {v}");
}

/// RS256 and ES256 tokens checked with a public key the test makes; a token that claims HS256
/// with the public key as its secret (algorithm confusion) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_key_tokens() {
    if !have(&["openssl"], false) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("pushwire-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("key dir");
    let openssl = |args: &[&str]| {
        let ok = std::process::Command::new(find_program("openssl")).args(args).current_dir(&dir).status();
        assert!(ok.expect("openssl runs").success(), "openssl {args:?}");
    };
    for (alg, genpkey) in [
        (jsonwebtoken::Algorithm::ES256, ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]),
        (jsonwebtoken::Algorithm::RS256, ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]),
    ] {
        let (private, public) = (format!("{alg:?}.pem"), format!("{alg:?}.pub"));
        openssl(&[&["genpkey"][..], &genpkey, &["-out", &private]].concat());
        openssl(&["pkey", "-in", &private, "-pubout", "-out", &public]);
        let (pem, pubpem) =
            (std::fs::read(dir.join(&private)).expect("key"), std::fs::read(dir.join(&public)).expect("key"));
        let key = match alg {
            jsonwebtoken::Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            _ => EncodingKey::from_rsa_pem(&pem),
        }
        .expect("private key");
        let pubfile = dir.join(&public).to_string_lossy().into_owned();
        let (_p, _c, w, h) = standalone(&["--token-public-key", &pubfile, "--require-token"]).await;
        let gw = Addr::from(w);
        let good = encode(&Header::new(alg), &serde_json::json!({"sub": "k1"}), &key).expect("token");
        let mut c = connect_with(&gw, &good).await;
        assert_eq!(http_get(h, "/?to_uid=k1&content=signed").await.0, 200);
        assert_eq!(next_text(&mut c.ws).await.as_deref(), Some("signed"), "{alg:?}");
        let confused = jwt(&String::from_utf8_lossy(&pubpem), serde_json::json!({"sub": "k1"}));
        let (status, body) = refused(&gw, &format!("token={confused}")).await;
        assert_eq!(status, 401, "{alg:?}: HS256 with the public key as secret: {body}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
