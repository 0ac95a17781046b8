//! TLS to the brokers: `rediss://` and NATS `tls://`, with a certificate authority and a server
//! certificate the test makes (openssl), trusted through `--broker-ca`. Without the CA the
//! certificate is refused and the node never becomes healthy.

mod common;

use std::time::Duration;

use common::pki::Pki;
use common::*;

/// A gateway and a publisher on `broker` (with `extra` flags): a push must go through.
async fn push_through(broker: &str, extra: &[&str]) {
    let (g, p) = (free_port(), free_port());
    let mut args_g = vec!["gateway", "--listen"];
    let (gl, pl) = (format!("127.0.0.1:{g}"), format!("127.0.0.1:{p}"));
    args_g.extend([gl.as_str(), "--broker", broker]);
    args_g.extend_from_slice(extra);
    let mut args_p = vec!["publisher", "--listen", pl.as_str(), "--broker", broker];
    args_p.extend_from_slice(extra);
    let _g = Proc::start(&args_g, &[g]).await;
    let _p = Proc::start(&args_p, &[p]).await;
    wait_healthy(g).await;
    wait_healthy(p).await;
    let mut c = connect(g).await;
    assert_eq!(http_get(p, "/?content=over-tls").await.0, 200);
    assert_eq!(next_text(&mut c.ws).await.as_deref(), Some("over-tls"));
}

/// A node on `broker` without the test's CA: the server's certificate is not trusted.
async fn refused_without_ca(broker: &str) {
    let g = free_port();
    let _g = Proc::start(&["gateway", "--listen", &format!("127.0.0.1:{g}"), "--broker", broker], &[g]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(http_get(g, "/healthz").await.0, 503, "an untrusted certificate is refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca() {
    if !have(&["openssl", "redis-server"], false) {
        return;
    }
    let certs = Pki::new();
    certs.leaf("server", 2);
    let port = free_port();
    let (p, cert, key, ca) =
        (port.to_string(), certs.path("server.pem"), certs.path("server.key"), certs.path("ca.pem"));
    let args = [
        "--port",
        "0",
        "--tls-port",
        &p,
        "--bind",
        "127.0.0.1",
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
    ];
    let _redis = Proc::program(&find_program("redis-server"), &args, &[port]).await;
    let url = format!("rediss://127.0.0.1:{port}");
    push_through(&url, &["--broker-ca", &ca]).await;
    refused_without_ca(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_tls_with_a_private_ca() {
    if !have(&["openssl", "nats-server"], false) {
        return;
    }
    let certs = Pki::new();
    certs.leaf("server", 2);
    let port = free_port();
    let (p, cert, key, ca) =
        (port.to_string(), certs.path("server.pem"), certs.path("server.key"), certs.path("ca.pem"));
    let args = ["-a", "127.0.0.1", "-p", &p, "--tls", "--tlscert", &cert, "--tlskey", &key];
    let _nats = Proc::program(&find_program("nats-server"), &args, &[port]).await;
    let url = format!("tls://127.0.0.1:{port}");
    push_through(&url, &["--broker-ca", &ca]).await;
    refused_without_ca(&url).await;
}
