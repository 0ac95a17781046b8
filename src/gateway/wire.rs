//! What a client connection is written to and read from: a plain TCP socket (system calls made
//! directly, so that an idle connection's task stays small), TLS over TCP (rustls, through
//! tokio's async I/O), or the body of an event stream that hyper serves (an HTTP request the fast
//! handshake did not take, such as any request over TLS).

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// A client's transport.
pub(super) enum Wire {
    Tcp(std::sync::Arc<TcpStream>),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Chunks of a streamed response body; the receiver goes when the client does.
    Body(mpsc::Sender<Bytes>),
}

impl Wire {
    /// Wait for input and append it to `buf`: `Ok(0)` once the client is gone, `WouldBlock` when
    /// a wake-up found nothing. Safe to cancel (it is one branch of a `select!`).
    pub(super) async fn read(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            Wire::Tcp(s) => {
                s.readable().await?;
                s.try_read_buf(buf)
            }
            // Boxed, like every future below that only TLS and event bodies need: an idle plain
            // connection's task holds the largest future it may await.
            Wire::Tls(s) => Box::pin(s.read_buf(buf)).await,
            Wire::Body(tx) => {
                Box::pin(tx.closed()).await;
                Ok(0)
            }
        }
    }

    /// Write every queued frame, waiting (up to `limit`) while the client takes nothing. Returns
    /// false when the connection failed or stayed full.
    pub(super) async fn flush(&mut self, out: &mut VecDeque<Bytes>, limit: Duration) -> bool {
        match self {
            Wire::Tcp(s) => flush_tcp(s, out, limit).await,
            Wire::Tls(s) => {
                matches!(Box::pin(tokio::time::timeout(limit, crate::io::write_frames(s, out))).await, Ok(Ok(())))
            }
            Wire::Body(tx) => {
                while let Some(frame) = out.pop_front() {
                    if !matches!(Box::pin(tokio::time::timeout(limit, tx.send(frame))).await, Ok(Ok(()))) {
                        return false;
                    }
                }
                true
            }
        }
    }

    /// Close the sending side (FIN; for TLS a close_notify first). A body ends when the sender
    /// is dropped.
    pub(super) async fn shutdown(&mut self) -> bool {
        match self {
            // Shared with the worker until the task detaches the connection (`Conn::detach`).
            Wire::Tcp(s) => match std::sync::Arc::get_mut(s) {
                Some(s) => s.shutdown().await.is_ok(),
                None => false,
            },
            Wire::Tls(s) => Box::pin(tokio::time::timeout(LINGER, s.shutdown())).await.is_ok_and(|r| r.is_ok()),
            Wire::Body(_) => false,
        }
    }

    /// Send `frame` (a WebSocket close), then FIN, then read (and discard) until the client
    /// closes too, for at most [`LINGER`] each. Dropping a socket with unread input makes the
    /// kernel send a reset, which can destroy the close frame before the client reads it.
    /// `before`: the rest of a frame written in part, which must go first.
    pub(super) async fn close(&mut self, before: Option<Bytes>, frame: Bytes) {
        let mut out: VecDeque<Bytes> = before.into_iter().chain([frame]).collect();
        if !self.flush(&mut out, LINGER).await || !self.shutdown().await {
            return;
        }
        let drain = async {
            let (mut seen, mut scratch) = (0, BytesMut::new());
            while seen < LINGER_BYTES {
                scratch.clear();
                scratch.reserve(512);
                match self.read(&mut scratch).await {
                    Ok(0) => return,
                    Ok(n) => seen += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    }
}

/// How long a closing connection waits for its close frame to go out and for the client to close.
const LINGER: Duration = Duration::from_secs(1);
/// Most bytes read and thrown away from a client while waiting for it to close.
const LINGER_BYTES: usize = 64 * 1024;

/// Write every queued frame, several per system call, waiting (up to `limit` each time) while the
/// socket's buffer is full.
///
/// The system call is made synchronously (`try_write_vectored`) so that the slice array lives on
/// the thread's stack, never in the connection's future: an idle connection stays small.
async fn flush_tcp(stream: &TcpStream, out: &mut VecDeque<Bytes>, limit: Duration) -> bool {
    while !out.is_empty() {
        match crate::io::try_write_frames(stream, out) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Boxed: the timer exists only while a socket is full, not in every idle connection.
                if !matches!(Box::pin(tokio::time::timeout(limit, stream.writable())).await, Ok(Ok(()))) {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}
