//! TLS for the HTTP listeners (rustls, no OpenSSL): a certificate chain and key from PEM files,
//! reloaded on SIGHUP and when either file changes, without touching connections already open (a
//! new connection gets the newest certificate). A reload that fails keeps the previous
//! certificate and says why. The certificate's expiry is kept for `/metrics`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Where the certificate and key are.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "certificate valid until {}", self.not_after)
    }
}

/// How often the files are checked for changes.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

/// The current server configuration, replaced on reload.
#[derive(Debug)]
pub struct Tls {
    files: TlsFiles,
    current: RwLock<Loaded>,
}

struct Loaded {
    config: Arc<rustls::ServerConfig>,
    /// The leaf certificate's notAfter, in seconds since the Unix epoch.
    not_after: i64,
    /// When the files were last read (their latest modification time then).
    stamp: Option<SystemTime>,
}

impl Tls {
    /// Load the files once; fails (with the file and the reason) if they cannot be used.
    pub fn load(files: TlsFiles) -> Result<Arc<Tls>, String> {
        let loaded = read(&files)?;
        Ok(Arc::new(Tls { files, current: RwLock::new(loaded) }))
    }

    /// The configuration for a new connection.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).config.clone()
    }

    /// The certificate's expiry, in seconds since the Unix epoch.
    pub fn not_after(&self) -> i64 {
        self.current.read().unwrap_or_else(|e| e.into_inner()).not_after
    }

    /// Read the files again; on failure keep the current certificate.
    pub fn reload(&self) -> Result<(), String> {
        let loaded = read(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        Ok(())
    }

    /// Reload on SIGHUP and whenever the files' modification time changes, for as long as the
    /// process runs.
    pub fn watch(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(WATCH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let why = tokio::select! {
                    Some(()) = async { hup.as_mut()?.recv().await } => "SIGHUP",
                    _ = tick.tick() => {
                        let seen = me.current.read().unwrap_or_else(|e| e.into_inner()).stamp;
                        if stamp(&me.files) == seen {
                            continue;
                        }
                        "the files changed"
                    }
                };
                match me.reload() {
                    Ok(()) => tracing::info!(cert = %me.files.cert.display(), "TLS certificate reloaded ({why})"),
                    Err(e) => {
                        crate::metrics::GLOBAL.tls_reload_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!("TLS certificate not reloaded ({why}), keeping the previous one: {e}")
                    }
                }
            }
        });
    }
}

/// The `/metrics` line of a listener's certificate expiry (0 without TLS).
pub fn expiry_metric(tls: Option<&Tls>) -> (&'static str, &'static str, u64) {
    let expiry = tls.map_or(0, |t| t.not_after().max(0) as u64);
    ("tls_certificate_expiry_seconds", "notAfter of the TLS certificate (Unix time; 0 without TLS)", expiry)
}

/// The later modification time of the two files.
fn stamp(files: &TlsFiles) -> Option<SystemTime> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    m(&files.cert).max(m(&files.key))
}

fn read(files: &TlsFiles) -> Result<Loaded, String> {
    let stamp = stamp(files);
    let at = |p: &Path, e: &dyn std::fmt::Display| format!("{}: {e}", p.display());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| at(&files.cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| at(&files.cert, &e))?;
    let leaf = certs.first().ok_or_else(|| at(&files.cert, &"no certificate in the file"))?;
    let not_after =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| at(&files.cert, &e))?.1.validity().not_after.timestamp();
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| at(&files.key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| at(&files.key, &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Loaded { config: Arc::new(config), not_after, stamp })
}
