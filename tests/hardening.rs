//! Hold up under strangers, bad input, slow and dead clients, and shutdown: protected mode, keys
//! and secrets, origins, limits, slow consumers, heartbeats, SIGTERM, metrics.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use channel_proto::Request;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pushwire"));
    cmd.args(args).env_remove("PUSHWIRE_PUBLISH_KEY").env_remove("PUSHWIRE_CHANNEL_SECRET");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run pushwire")
}

#[test]
fn protected_mode_refuses_open_listeners_without_auth() {
    // The check happens before binding: nothing listens beyond loopback during this test.
    for args in [
        &["publisher", "--listen", "0.0.0.0:1"][..],
        &["channel", "--listen", "0.0.0.0:1"][..],
        &["standalone", "--http-listen", "0.0.0.0:1", "--ws-listen", "127.0.0.1:1"][..],
        &["standalone", "--channel-listen", "0.0.0.0:1", "--ws-listen", "127.0.0.1:1", "--publish-key", "k"][..],
    ] {
        let out = run_to_exit(args, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must refuse to start");
        assert!(err.contains("refusing to start") && err.contains("--insecure"), "{args:?}: {err}");
        assert!(err.contains("--publish-key") || err.contains("--secret"), "{args:?} says how: {err}");
    }
}

#[tokio::test]
async fn publish_key_is_required_and_checked() {
    let (_p, _c, w, h) = standalone(&["--publish-key", "s3cret"]).await;
    let mut a = connect(w).await;
    assert_eq!(http_get(h, "/?content=x").await.0, 401);
    assert_eq!(http_get(h, "/?content=x&key=wrong").await.0, 401);
    let (status, body) = http(h, "GET", "/?content=x", &[("Authorization", "Bearer nope")], "").await;
    assert_eq!(status, 401);
    assert!(body.contains("publish key"), "{body}");
    // The first push that gets through is the first thing the client gets: refused ones reach
    // nobody.
    assert_eq!(http(h, "GET", "/?content=bearer", &[("Authorization", "Bearer s3cret")], "").await.0, 200);
    assert_eq!(next_text(&mut a.ws).await.as_deref(), Some("bearer"), "refused pushes reach nobody");
    assert_eq!(http_get(h, "/?content=param&key=s3cret").await.0, 200);
    assert_eq!(next_text(&mut a.ws).await.as_deref(), Some("param"));
}

#[tokio::test]
async fn channel_secret_guards_the_channel_server() {
    let c = free_port();
    let cl = format!("127.0.0.1:{c}");
    let _ch =
        Proc::program(env!("CARGO_BIN_EXE_pushwire"), &["channel", "--listen", &cl, "--secret", "hush"], &[c]).await;
    // A client that does not authenticate is closed at its first request.
    let mut stranger = ChannelClient::tcp(c).await;
    stranger.send(Request::Subscribe(names(&["broadcast"]))).await;
    assert!(stranger.closed_within(WAIT).await);
    // Nodes with the secret in the broker URL work end to end; a wrong secret never gets healthy.
    let (w, h, bad) = (free_port(), free_port(), free_port());
    let good_url = format!("channel://:hush@127.0.0.1:{c}");
    let bad_url = format!("channel://:wrong@127.0.0.1:{c}");
    let _g = Proc::start(&["gateway", "--listen", &format!("127.0.0.1:{w}"), "--broker", &good_url], &[w]).await;
    let _p = Proc::start(&["publisher", "--listen", &format!("127.0.0.1:{h}"), "--broker", &good_url], &[h]).await;
    let _b = Proc::start(&["gateway", "--listen", &format!("127.0.0.1:{bad}"), "--broker", &bad_url], &[bad]).await;
    wait_healthy(w).await;
    wait_healthy(h).await;
    let mut a = connect(w).await;
    assert_eq!(http_get(h, "/?content=guarded").await.0, 200);
    assert_eq!(next_text(&mut a.ws).await.as_deref(), Some("guarded"));
    assert_eq!(http_get(bad, "/healthz").await.0, 503, "wrong secret: link never verified");
}

#[tokio::test]
async fn origins_limits_and_oversized_frames() {
    let (_p, _c, w, h) = standalone(&[
        "--allowed-origins",
        "http://good.example",
        "--max-connections",
        "2",
        "--max-client-frame",
        "1024",
    ])
    .await;
    let url = format!("ws://127.0.0.1:{w}/");
    let with_origin = |o: &str| {
        let mut r = url.as_str().into_client_request().unwrap();
        r.headers_mut().insert("Origin", o.parse().unwrap());
        r
    };
    let refused = tokio_tungstenite::connect_async(with_origin("http://evil.example")).await;
    assert!(format!("{:?}", refused.expect_err("bad origin refused")).contains("403"));
    // A socket still in its HTTP stage does not take a WebSocket's place.
    let _idle = tokio::net::TcpStream::connect(("127.0.0.1", w)).await.unwrap();
    let (mut a, _) = tokio_tungstenite::connect_async(with_origin("http://good.example")).await.expect("good origin");
    let (mut b, _) = tokio_tungstenite::connect_async(with_origin("http://good.example")).await.expect("second");
    let full = tokio_tungstenite::connect_async(with_origin("http://good.example")).await;
    assert!(format!("{:?}", full.expect_err("over the limit")).contains("503"));
    for ws in [&mut a, &mut b] {
        next_text(ws).await.expect("welcome");
    }
    // A frame over the limit closes that connection with 1009; the other is unaffected.
    a.send(Message::Binary(vec![0u8; 4096].into())).await.unwrap();
    let mut code = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(WAIT, a.next()).await {
        if let Message::Close(Some(f)) = m {
            code = Some(u16::from(f.code));
            break;
        }
    }
    assert_eq!(code, Some(1009));
    assert_eq!(http_get(h, "/?content=still").await.0, 200);
    assert_eq!(next_text(&mut b).await.as_deref(), Some("still"));
}

#[tokio::test]
async fn sockets_in_their_http_stage_are_bounded_apart() {
    let (_p, _c, w, _h) = standalone(&["--max-handshakes", "1"]).await;
    // The readiness probe may still hold the slot for a moment: retry until the idle socket
    // is the one holding it (it was not answered 503).
    let mut tries = 0;
    let idle = loop {
        tries += 1;
        assert!(tries < 50, "an idle socket never got the handshake slot");
        let s = tokio::net::TcpStream::connect(("127.0.0.1", w)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut b = [0u8; 64];
        if matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
            break s;
        }
    };
    let busy = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{w}/")).await;
    assert!(format!("{:?}", busy.expect_err("no handshake slot")).contains("503"));
    drop(idle);
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{w}/")).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "the slot is given back once the idle socket closes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off_and_holds_back_nobody() {
    let (p, _c, w, h) = standalone(&["--outbound-queue-bytes", "524288"]).await;
    let mut readers = Vec::new();
    for _ in 0..3 {
        readers.push(connect(w).await);
    }
    let slow = connect(w).await; // never read from again
    let content = "x".repeat(8 * 1024);
    let n = 4000; // 32 MB: far more than the socket buffers and the 512 KiB queue hold

    // What each reader has got so far: the publisher never gets more than 32 pushes (256 KiB)
    // ahead of the slowest, so that the readers are never slow consumers themselves, however
    // this machine schedules them.
    let counts: Vec<_> = (0..readers.len()).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let collectors: Vec<_> = readers
        .into_iter()
        .zip(counts.clone())
        .map(|(mut c, count)| {
            tokio::spawn(async move {
                while let Some(m) = next_text(&mut c.ws).await {
                    count.fetch_add(1, Ordering::Relaxed);
                    if m.starts_with("end") {
                        break;
                    }
                }
                count.load(Ordering::Relaxed)
            })
        })
        .collect();
    let s = tokio::net::TcpStream::connect(("127.0.0.1", h)).await.unwrap();
    let mut s = tokio::io::BufReader::new(s);
    for i in 0..n {
        let deadline = tokio::time::Instant::now() + WAIT;
        while counts.iter().any(|c| c.load(Ordering::Relaxed) + 32 < i) {
            assert!(tokio::time::Instant::now() < deadline, "the readers stopped getting pushes");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Keep-alive requests on one connection; each answer is read before the next request.
        let req = format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\ncontent={content}", content.len() + 8);
        s.get_mut().write_all(req.as_bytes()).await.unwrap();
        let mut head = vec![0u8; 0];
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\nok") {
            s.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
    }
    assert_eq!(http_get(h, "/?content=end").await.0, 200);
    for c in collectors {
        assert_eq!(c.await.unwrap(), n + 1, "every reading client got every push");
    }
    let (_, metrics) = http_get(w, "/metrics").await;
    assert!(metrics.contains("pushwire_slow_consumer_disconnects_total 1"), "{metrics}");
    let rss = pushwire_bench::rss_kb(p.pid());
    assert!(rss < 150_000, "server memory stays bounded: {rss} kB");
    // The slow client's connection was closed: after what was buffered (whole frames, the last
    // one written in part by the worker completed before the close frame), the stream ends.
    let mut slow = slow.ws;
    let mut ended = false;
    for _ in 0..(n + 10) {
        match tokio::time::timeout(WAIT, slow.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(1008), "closed as a slow consumer");
                ended = true;
                break;
            }
            // The close frame may not fit a full socket buffer: then the connection is dropped.
            Ok(None) | Ok(Some(Err(tokio_tungstenite::tungstenite::Error::Io(_)))) => {
                ended = true;
                break;
            }
            Ok(Some(Err(e))) => panic!("the slow client's stream is broken: {e}"),
            Ok(Some(Ok(Message::Text(t)))) => assert!(t.as_str() == content, "a whole push"),
            Ok(Some(Ok(other))) => panic!("unexpected {other:?}"),
            Err(_) => break,
        }
    }
    assert!(ended, "slow client disconnected");
}

#[tokio::test]
async fn heartbeat_closes_dead_peers_and_keeps_live_ones() {
    let (_p, _c, w, h) = standalone(&["--heartbeat", "200ms"]).await;
    let mut live = connect(w).await;
    // A dead peer: completes the handshake, then never sends another byte (never answers pings).
    let mut dead = tokio::net::TcpStream::connect(("127.0.0.1", w)).await.unwrap();
    dead.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await.unwrap();
    // The live client keeps reading (and so answers pings) for a while.
    assert_eq!(next_text_within(&mut live.ws, Duration::from_millis(1500)).await, None);
    // The dead one has been closed: reading reaches EOF.
    let mut buf = vec![0u8; 4096];
    let mut closed = false;
    while let Ok(Ok(n)) = tokio::time::timeout(WAIT, dead.read(&mut buf)).await {
        if n == 0 {
            closed = true;
            break;
        }
    }
    assert!(closed, "dead peer closed");
    assert_eq!(http_get(h, "/?content=alive").await.0, 200);
    assert_eq!(next_text(&mut live.ws).await.as_deref(), Some("alive"), "live client kept");
}

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits() {
    let (mut p, _c, w, _h) = standalone(&[]).await;
    let mut a = connect(w).await;
    let term = Command::new("kill").args(["-TERM", &p.pid().to_string()]).status().expect("kill");
    assert!(term.success());
    let mut code = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(WAIT, a.ws.next()).await {
        if let Message::Close(Some(f)) = m {
            code = Some(u16::from(f.code));
            break;
        }
    }
    assert_eq!(code, Some(1001), "going away");
    let status = p.terminate().await.expect("exits within the deadline");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_server_cuts_off_a_subscriber_that_stops_reading_and_counts_it() {
    let (c, m) = (free_port(), free_port());
    let _ch = Proc::start(
        &["channel", "--listen", &format!("127.0.0.1:{c}"), "--metrics-listen", &format!("127.0.0.1:{m}")],
        &[c, m],
    )
    .await;
    let mut sleeper = ChannelClient::tcp(c).await;
    sleeper.send(Request::Subscribe(names(&["firehose"]))).await;
    sleeper.sync().await;
    let mut reader = ChannelClient::tcp(c).await;
    reader.send(Request::Subscribe(names(&["firehose"]))).await;
    reader.sync().await;
    let mut publisher = ChannelClient::tcp(c).await;
    let data = channel_proto::Value::Str(vec![b'y'; 1024]).encode();
    let frame = channel_proto::frame::encode(
        &Request::Publish { channels: names(&["firehose"]), data: data.into(), keep: None }.encode(),
    );
    let reading = tokio::spawn(async move {
        let mut n = 0;
        while reader.recv_within(WAIT).await.is_some() {
            n += 1;
            if n == 20_000 {
                break;
            }
        }
        n
    });
    for _ in 0..20_000 {
        publisher.raw(&frame).await;
    }
    assert_eq!(reading.await.unwrap(), 20_000, "the reading subscriber got everything");
    let (_, metrics) = http_get(m, "/metrics").await;
    assert!(metrics.contains("pushwire_channel_slow_consumers_total 1"), "{metrics}");
    let clients: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pushwire_channel_clients "))
        .and_then(|v| v.parse().ok())
        .expect("clients gauge");
    assert!(clients <= 2, "the sleeper is gone: {metrics}");
    assert_eq!(http_get(m, "/healthz").await.0, 200);
}

#[tokio::test]
async fn config_file_under_environment_under_flags() {
    let dir = std::env::temp_dir().join(format!("pushwire-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pushwire.toml");
    std::fs::write(
        &file,
        "# test\n[standalone]\npublish-key = \"from-file\" # a comment\nheartbeat = \"30s\"\n\
         allowed-origins = [\"http://a.example\", \"http://b.example\"]\n[gateway]\nworkers = 9\n",
    )
    .unwrap();
    let config = file.to_string_lossy().into_owned();
    let bin = env!("CARGO_BIN_EXE_pushwire");
    let ports = || (free_port(), free_port(), free_port());
    let args = |(c, w, h): (u16, u16, u16)| {
        [
            "standalone",
            "--channel-listen",
            &format!("127.0.0.1:{c}"),
            "--ws-listen",
            &format!("127.0.0.1:{w}"),
            "--http-listen",
            &format!("127.0.0.1:{h}"),
            "--config",
            &config,
        ]
        .map(String::from)
    };
    let accepts = |h: u16, key: &'static str| async move { http_get(h, &format!("/?content=x&key={key}")).await.0 };

    // The file's key applies.
    let p = ports();
    let a = args(p);
    let _s = Proc::program(bin, &a.each_ref().map(String::as_str), &[p.0, p.1, p.2]).await;
    assert_eq!(accepts(p.2, "from-file").await, 200);
    assert_eq!(accepts(p.2, "other").await, 401);

    // The environment overrides the file.
    let p = ports();
    let a = args(p);
    let _s = Proc::program_env(
        bin,
        &a.each_ref().map(String::as_str),
        &[("PUSHWIRE_PUBLISH_KEY", "from-env")],
        &[p.0, p.1, p.2],
    )
    .await;
    assert_eq!(accepts(p.2, "from-env").await, 200);
    assert_eq!(accepts(p.2, "from-file").await, 401);

    // A flag overrides both.
    let p = ports();
    let mut a = args(p).to_vec();
    a.extend(["--publish-key".to_string(), "from-flag".to_string()]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let _s = Proc::program_env(bin, &a, &[("PUSHWIRE_PUBLISH_KEY", "from-env")], &[p.0, p.1, p.2]).await;
    assert_eq!(accepts(p.2, "from-flag").await, 200);
    assert_eq!(accepts(p.2, "from-env").await, 401);

    // The array of origins applies: an origin outside it is refused.
    let p = ports();
    let a = args(p);
    let _s = Proc::program(bin, &a.each_ref().map(String::as_str), &[p.0, p.1, p.2]).await;
    for (origin, status) in [("http://b.example", "101"), ("http://c.example", "403")] {
        let mut ws = tokio::net::TcpStream::connect(("127.0.0.1", p.1)).await.unwrap();
        let req = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nOrigin: {origin}\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        ws.write_all(req.as_bytes()).await.unwrap();
        let mut head = [0u8; 12];
        tokio::time::timeout(WAIT, ws.read_exact(&mut head)).await.expect("answer").expect("read");
        assert_eq!(&head[9..12], status.as_bytes(), "{origin}");
    }

    // check-config: the effective settings of each role, secrets masked, sources named.
    let out = run_to_exit(&["check-config", &config], &[("PUSHWIRE_PUBLISH_KEY", "from-env")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("[gateway]\n") && text.contains("workers = 9  # file"), "{text}");
    assert!(text.contains("heartbeat = \"30s\"  # file"), "{text}");
    assert!(text.contains("publish-key = \"***\"  # environment") && !text.contains("from-"), "{text}");

    // A setting the command does not have, or a value of the wrong type, stops it with the file
    // and line.
    for (role, bad, line, what) in [
        ("standalone", "[standalone]\npublish-key = \"k\"\nbogus = 1\n", 3, "bogus"),
        ("gateway", "[gateway]\n\nworkers = \"many\"\n", 3, "workers"),
        ("gateway", "[gateway]\nworkers = [1, 2]\n", 2, "one value"),
        ("standalone", "[standalone]\ninsecure = \"yes\"\n", 2, "true or false"),
        ("gateway", "[gatway]\nworkers = 1\n", 1, "unknown section"),
        ("gateway", "[gateway]\nworkers = \n", 2, ""),
    ] {
        std::fs::write(&file, bad).unwrap();
        for argv in [vec![role, "--config", &config], vec!["check-config", &config]] {
            let out = run_to_exit(&argv, &[]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{bad}");
            assert!(err.contains(&format!("pushwire.toml:{line}:")) && err.contains(what), "{bad}: {err}");
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
