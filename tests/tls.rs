//! HTTPS on the publisher with a certificate the test makes (openssl): requests over TLS, the
//! certificate's expiry in /metrics, and reloads (a changed file, SIGHUP, a broken file kept out)
//! while a connection opened before stays up.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new(find_program("openssl")).args(args).current_dir(dir).output();
    let out = out.expect("openssl runs");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A test CA in `dir`, and leaf certificates for 127.0.0.1 named `name`, valid `days` days.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!("pushwire-tls-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("dir");
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        openssl(
            &dir,
            &[
                &["req", "-x509"][..],
                &ec,
                &["-keyout", "ca.key", "-out", "ca.pem", "-days", "3", "-subj", "/CN=pushwire-test-ca"],
            ]
            .concat(),
        );
        std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
        Pki { dir }
    }

    fn leaf(&self, name: &str, days: u32) {
        let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        openssl(
            &self.dir,
            &[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN={name}")]].concat(),
        );
        let days = days.to_string();
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                &days,
                "-extfile",
                "san.ext",
            ],
        );
    }

    /// Put leaf `name` where the server reads its certificate (`live.pem`, `live.key`), each
    /// file replaced at once.
    fn install(&self, name: &str) {
        for ext in ["key", "pem"] {
            let tmp = self.dir.join(format!("next.{ext}"));
            std::fs::copy(self.dir.join(format!("{name}.{ext}")), &tmp).expect("copy");
            std::fs::rename(&tmp, self.dir.join(format!("live.{ext}"))).expect("rename");
        }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }

    fn client(&self) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(self.dir.join("ca.pem")).expect("ca") {
            roots.add(c.expect("ca cert")).expect("add ca");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to 127.0.0.1:`port`, and the common name of the certificate it was shown.
async fn connect(pki: &Pki, port: u16) -> (Tls, String) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let tls = tokio::time::timeout(WAIT, pki.client().connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake");
    let leaf = tls.get_ref().1.peer_certificates().expect("a certificate")[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).expect("x509");
    let cn = cert.subject().iter_common_name().next().and_then(|c| c.as_str().ok()).unwrap_or_default().to_owned();
    (tls, cn)
}

/// One keep-alive GET on `tls`: (status, body).
async fn get(tls: &mut Tls, path: &str) -> (u16, String) {
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, tls.read(&mut chunk)).await.expect("answer in time").expect("read");
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let Some(end) = text.find("\r\n\r\n") else { continue };
        let len: usize = text[..end]
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + len {
            let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            return (status, text[end + 4..end + 4 + len].to_owned());
        }
    }
}

/// Open new connections until one shows certificate `cn`.
async fn wait_for_cert(pki: &Pki, port: u16, cn: &str) {
    for _ in 0..100 {
        if connect(pki, port).await.1 == cn {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the server never showed certificate {cn}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_publisher_with_certificate_reloads() {
    if !have(&["openssl"], false) {
        return;
    }
    let pki = Pki::new();
    pki.leaf("first", 1);
    pki.leaf("second", 2);
    pki.install("first");
    let (cert, key) = (pki.path("live.pem"), pki.path("live.key"));
    let (p, _c, w, h) = standalone(&["--tls-cert", &cert, "--tls-key", &key]).await;

    let (mut kept, cn) = connect(&pki, h).await;
    assert_eq!(cn, "first");
    assert_eq!(get(&mut kept, "/healthz").await.0, 200);
    let mut ws = connect_ws(w).await;
    assert_eq!(get(&mut kept, "/?content=over-tls").await, (200, "ok".to_owned()));
    assert_eq!(next_text(&mut ws.ws).await.as_deref(), Some("over-tls"));
    let expiry = |text: &str| metric_in(text, "pushwire_tls_certificate_expiry_seconds");
    let first_expiry = expiry(&get(&mut kept, "/metrics").await.1);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    assert!((now + 23 * 3600..now + 25 * 3600).contains(&first_expiry), "one day ahead: {first_expiry} (now {now})");
    // Plain HTTP on the TLS port is not served.
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", h)).await.expect("connect");
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut answer)).await;
    assert!(!answer.starts_with(b"HTTP/1.1 200"), "plain HTTP answered on the TLS port");

    // The files change: new connections get the new certificate; the one opened before stays up.
    pki.install("second");
    wait_for_cert(&pki, h, "second").await;
    assert_eq!(get(&mut kept, "/healthz").await.0, 200, "the connection opened before is still served");
    let second_expiry = expiry(&get(&mut kept, "/metrics").await.1);
    assert!(second_expiry >= first_expiry + 23 * 3600, "{second_expiry} after {first_expiry}");

    // A broken file is not taken: new connections keep the certificate that works.
    std::fs::write(pki.dir.join("live.pem"), "not a certificate").expect("write");
    tokio::time::sleep(tls_watch() * 2).await;
    assert_eq!(connect(&pki, h).await.1, "second");

    // SIGHUP reloads at once.
    pki.install("first");
    let status = std::process::Command::new("kill").args(["-HUP", &p.pid().to_string()]).status().expect("kill");
    assert!(status.success());
    wait_for_cert(&pki, h, "first").await;
}

fn tls_watch() -> Duration {
    pushwire::tls::WATCH_EVERY
}

async fn connect_ws(w: u16) -> Client {
    common::connect(w).await
}
