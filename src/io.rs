//! Small I/O helpers shared by every server: listeners on TCP or Unix sockets, vectored writes of
//! queued frames, and random identifiers.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::path::PathBuf;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};

/// `m` locked; a panic elsewhere while it was held does not make its data unusable here (every
/// lock of the crate guards data that stays consistent between statements).
#[inline]
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Most frames handed to the kernel in one vectored write.
pub const MAX_IOVECS: usize = 64;

/// Where a server listens: `HOST:PORT` or `unix:/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix://").or_else(|| s.strip_prefix("unix:")) {
            if path.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(ListenAddr::Unix(path.into()));
        }
        if s.rsplit_once(':').is_none_or(|(_, port)| port.parse::<u16>().is_err()) {
            return Err(format!("{s:?} is not HOST:PORT or unix:/path"));
        }
        Ok(ListenAddr::Tcp(s.to_owned()))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => f.write_str(a),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A bound listener of either kind.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A stream accepted from a [`Listener`].
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// Pending connections the kernel may queue before `accept` (capped by `net.core.somaxconn`).
/// The usual default of 128 overflows when thousands of clients connect at once.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Bind a TCP listener on `addr` (`HOST:PORT`) with [`LISTEN_BACKLOG`].
pub async fn bind_tcp(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let sock = if a.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        sock.set_reuseaddr(true)?;
        match sock.bind(a) {
            Ok(()) => return sock.listen(LISTEN_BACKLOG),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to bind")))
}

impl Listener {
    /// Bind `addr`. A stale Unix socket at the path (nobody accepts on it) is replaced; a live
    /// one, or any other kind of file, is left alone and binding fails.
    pub async fn bind(addr: &ListenAddr) -> std::io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(a) => Ok(Listener::Tcp(bind_tcp(a).await?)),
            ListenAddr::Unix(p) => {
                remove_stale_socket(p)?;
                Ok(Listener::Unix(UnixListener::bind(p)?, p.clone()))
            }
        }
    }

    /// Accept one connection, with a printable peer name.
    pub async fn accept(&self) -> std::io::Result<(Box<dyn Stream>, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Box::new(s), peer.to_string()))
            }
            Listener::Unix(l, p) => {
                let (s, _) = l.accept().await?;
                Ok((Box::new(s), format!("unix:{}", p.display())))
            }
        }
    }

    /// The bound address (port 0 resolved).
    pub fn local_addr(&self) -> ListenAddr {
        match self {
            Listener::Tcp(l) => ListenAddr::Tcp(l.local_addr().map(|a| a.to_string()).unwrap_or_default()),
            Listener::Unix(_, p) => ListenAddr::Unix(p.clone()),
        }
    }
}

/// Write every queued frame, several per system call; frames are popped as they are written.
pub async fn write_frames<W: AsyncWrite + Unpin>(w: &mut W, frames: &mut VecDeque<Bytes>) -> std::io::Result<()> {
    while !frames.is_empty() {
        let n = {
            let slices: Vec<IoSlice<'_>> = frames.iter().take(MAX_IOVECS).map(|b| IoSlice::new(b)).collect();
            w.write_vectored(&slices).await?
        };
        advance(frames, n)?;
    }
    w.flush().await
}

/// One non-blocking vectored write of the queued frames to a TCP socket; written frames are
/// popped. `WouldBlock` when the socket takes nothing now.
pub fn try_write_frames(stream: &tokio::net::TcpStream, frames: &mut VecDeque<Bytes>) -> std::io::Result<()> {
    let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
    let mut k = 0;
    for (slot, f) in slices.iter_mut().zip(frames.iter()) {
        *slot = IoSlice::new(f);
        k += 1;
    }
    let n = stream.try_write_vectored(&slices[..k])?;
    advance(frames, n)
}

/// Pop `n` written bytes off the front of `frames`.
fn advance(frames: &mut VecDeque<Bytes>, n: usize) -> std::io::Result<()> {
    if n == 0 {
        return Err(std::io::ErrorKind::WriteZero.into());
    }
    let mut left = n;
    while left > 0 {
        let Some(front) = frames.front_mut() else { break };
        if front.len() <= left {
            left -= front.len();
            frames.pop_front();
        } else {
            front.advance(left);
            left = 0;
        }
    }
    Ok(())
}

/// `n` random bytes as lowercase hex, from the operating system's generator.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    // Without a working system generator there is nothing sound to fall back on.
    getrandom::fill(&mut buf).expect("the operating system's random generator works");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Raise the soft open-file limit to the hard one: a gateway holds one descriptor per client.
pub fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
    }
}

/// Log an accept error; running out of descriptors gets a message that says what to do.
pub fn log_accept_error(what: &str, e: &std::io::Error) {
    if e.raw_os_error() == Some(24) || e.raw_os_error() == Some(23) {
        let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(0);
        tracing::error!(
            "{what}: out of file descriptors (limit {limit}): new connections wait; raise the hard limit \
             (ulimit -Hn, LimitNOFILE=) or lower --max-connections"
        );
    } else {
        tracing::error!("{what}: accept failed: {e}");
    }
}

/// Remove the Unix socket at `path` if nobody accepts on it; refuse to touch anything else.
fn remove_stale_socket(path: &std::path::Path) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if !m.file_type().is_socket() => Err(Error::new(
            ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket: not removed (choose another path)", path.display()),
        )),
        Ok(_) if std::os::unix::net::UnixStream::connect(path).is_ok() => {
            Err(Error::new(ErrorKind::AddrInUse, format!("{} is the socket of a running server", path.display())))
        }
        Ok(_) => std::fs::remove_file(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addrs() {
        assert_eq!("0.0.0.0:2206".parse(), Ok(ListenAddr::Tcp("0.0.0.0:2206".into())));
        assert_eq!("[::1]:0".parse(), Ok(ListenAddr::Tcp("[::1]:0".into())));
        assert_eq!("unix:/tmp/x.sock".parse(), Ok(ListenAddr::Unix("/tmp/x.sock".into())));
        assert!("nonsense".parse::<ListenAddr>().is_err());
        assert!("host:99999".parse::<ListenAddr>().is_err());
    }

    #[tokio::test]
    async fn binding_a_unix_path_replaces_only_a_stale_socket() {
        let dir = std::env::temp_dir().join(format!("pushwire-bind-{}", random_hex(6)));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("x.sock");
        let addr = ListenAddr::Unix(path.clone());
        std::fs::write(&path, b"precious").unwrap();
        let e = Listener::bind(&addr).await.err().expect("a regular file is not replaced");
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        std::fs::remove_file(&path).unwrap();
        // A socket left by a server that is gone is replaced; a live one is not.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let live = Listener::bind(&addr).await.expect("a stale socket is replaced");
        let e = Listener::bind(&addr).await.err().expect("a live socket is not replaced");
        assert!(e.to_string().contains("running server"), "{e}");
        drop(live);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn random_ids_differ() {
        let (a, b) = (random_hex(6), random_hex(6));
        assert_eq!(a.len(), 12);
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn vectored_writes_keep_order() {
        let mut out = Vec::new();
        let mut q: VecDeque<Bytes> = (0..200).map(|i| Bytes::from(format!("{i},"))).collect();
        write_frames(&mut out, &mut q).await.unwrap();
        let want: String = (0..200).map(|i| format!("{i},")).collect();
        assert_eq!(String::from_utf8(out).unwrap(), want);
    }
}
