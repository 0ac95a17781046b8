//! TLS to the brokers: `rediss://` and NATS `tls://`, with a certificate authority and a server
//! certificate the test makes (openssl), trusted through `--broker-ca`. Without the CA the
//! certificate is refused and the node never becomes healthy.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

/// A CA and a server certificate for 127.0.0.1, in a directory removed on drop.
struct Certs(PathBuf);

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Certs {
    fn make() -> Certs {
        let dir = std::env::temp_dir().join(format!("pushwire-tls-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").expect("ext file");
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let steps: [&[&str]; 3] = [
            &[
                &["req", "-x509"],
                &ec[..],
                &["-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=pushwire test CA"],
            ]
            .concat(),
            &[&["req"], &ec[..], &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]].concat(),
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "ext",
            ],
        ];
        for args in steps {
            let out = std::process::Command::new(find_program("openssl"))
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl runs (./scripts/test installs it)");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Certs(dir)
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

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
    let certs = Certs::make();
    let port = free_port();
    let (p, cert, key, ca) =
        (port.to_string(), certs.path("server.crt"), certs.path("server.key"), certs.path("ca.crt"));
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
    let certs = Certs::make();
    let port = free_port();
    let (p, cert, key, ca) =
        (port.to_string(), certs.path("server.crt"), certs.path("server.key"), certs.path("ca.crt"));
    let args = ["-a", "127.0.0.1", "-p", &p, "--tls", "--tlscert", &cert, "--tlskey", &key];
    let _nats = Proc::program(&find_program("nats-server"), &args, &[port]).await;
    let url = format!("tls://127.0.0.1:{port}");
    push_through(&url, &["--broker-ca", &ca]).await;
    refused_without_ca(&url).await;
}
