//! Certificates the tests make with openssl: a CA, and leaf certificates for 127.0.0.1 and
//! localhost signed by it, in a directory removed on drop.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new(find_program("openssl")).args(args).current_dir(dir).output();
    let out = out.expect("openssl runs (./scripts/test installs it)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

const EC: [&str; 5] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];

/// A test CA (`ca.pem`) in `dir`.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!("pushwire-tls-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("dir");
        let subject = ["-keyout", "ca.key", "-out", "ca.pem", "-days", "3", "-subj", "/CN=pushwire-test-ca"];
        openssl(&dir, &[&["req", "-x509"][..], &EC, &subject].concat());
        std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").expect("ext");
        Pki { dir }
    }

    /// A CA with leaves `first` and `second` (valid `first_days` and `second_days`), `first`
    /// installed where a server reads its certificate; and that certificate's and key's paths.
    pub fn rotating(first_days: u32, second_days: u32) -> (Pki, String, String) {
        let pki = Pki::new();
        pki.leaf("first", first_days);
        pki.leaf("second", second_days);
        pki.install("first");
        let (cert, key) = (pki.path("live.pem"), pki.path("live.key"));
        (pki, cert, key)
    }

    /// A leaf certificate `name.pem` with its key `name.key`, valid `days` days.
    pub fn leaf(&self, name: &str, days: u32) {
        let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
        openssl(
            &self.dir,
            &[&["req"][..], &EC, &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN={name}")]].concat(),
        );
        let days = days.to_string();
        let sign = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-extfile", "san.ext"];
        openssl(&self.dir, &[&["x509", "-req", "-in", &csr, "-out", &pem, "-days", &days][..], &sign].concat());
    }

    /// Put leaf `name` where a server reads its certificate (`live.pem`, `live.key`), each
    /// file replaced at once.
    pub fn install(&self, name: &str) {
        for ext in ["key", "pem"] {
            let tmp = self.dir.join(format!("next.{ext}"));
            std::fs::copy(self.dir.join(format!("{name}.{ext}")), &tmp).expect("copy");
            std::fs::rename(&tmp, self.dir.join(format!("live.{ext}"))).expect("rename");
        }
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }

    /// The base64 SHA-256 of leaf `name`'s public key, as Chromium's
    /// `--ignore-certificate-errors-spki-list` takes it.
    pub fn spki(&self, name: &str) -> String {
        let der = openssl(&self.dir, &["pkey", "-in", &format!("{name}.key"), "-pubout", "-outform", "der"]);
        use base64::Engine as _;
        use sha2::Digest as _;
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(der))
    }

    /// A TLS client that trusts this CA only.
    pub fn client(&self) -> tokio_rustls::TlsConnector {
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

    /// A TLS connection to 127.0.0.1:`port`, and the common name of the certificate it was shown.
    pub async fn connect(&self, port: u16) -> (Tls, String) {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let tls = tokio::time::timeout(WAIT, self.client().connect(name, tcp))
            .await
            .expect("handshake in time")
            .expect("handshake");
        let leaf = tls.get_ref().1.peer_certificates().expect("a certificate")[0].clone();
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf).expect("x509");
        let cn = cert.subject().iter_common_name().next().and_then(|c| c.as_str().ok()).unwrap_or_default().to_owned();
        (tls, cn)
    }

    /// Open new connections until one shows certificate `cn`.
    pub async fn wait_for_cert(&self, port: u16, cn: &str) {
        for _ in 0..100 {
            if self.connect(port).await.1 == cn {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("the server never showed certificate {cn}");
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One keep-alive GET on `tls`: (status, body).
pub async fn https_get(tls: &mut Tls, path: &str) -> (u16, String) {
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

/// A client's TLS connection.
pub type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;
