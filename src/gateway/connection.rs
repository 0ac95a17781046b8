//! One client connection's task: the welcome line, reading client frames (pings, closes, limits),
//! writing what the worker queued with vectored writes, and closing cleanly.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use std::sync::Arc;

use super::{format, Conn, GatewayConfig, Wants, Worker};
use crate::metrics::GLOBAL;
use crate::ws::{self, close, ClientFrame};

/// Serve one WebSocket connection until it closes or is closed.
///
/// `wants` is boxed (and absent for a seed client), and so are the worker's add and remove: this
/// future lives as long as the connection, and every byte of it counts with a hundred thousand
/// idle clients.
pub(super) async fn serve(
    mut stream: TcpStream,
    mut buf: BytesMut,
    worker: &Arc<Worker>,
    cfg: &GatewayConfig,
    wants: Option<Box<Wants>>,
    deflate: bool,
) {
    let (id, conn, welcome) = Box::pin(open(worker, wants, false, deflate)).await;
    tracing::debug!(worker = %worker.id, connection = id, "client connected");
    let mut out = VecDeque::from([welcome]);
    let mut reader = ws::Reader::new(deflate);
    let closing: Option<(u16, &str)> = 'conn: loop {
        if !out.is_empty() && !flush(&stream, &mut out, cfg.write_timeout).await {
            break None;
        }
        loop {
            match reader.parse(&mut buf, cfg.max_client_frame) {
                Ok(None) => break,
                Ok(Some(ClientFrame::Ping(p))) => out.push_back(ws::pong(&p)),
                Ok(Some(ClientFrame::Close(code))) => break 'conn Some((code.unwrap_or(close::NORMAL), "")),
                Ok(Some(ClientFrame::Data | ClientFrame::Pong)) => {}
                Err(e) => {
                    GLOBAL.bad_client_frames.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(worker = %worker.id, connection = id, "closing: {e}");
                    break 'conn Some((e.code(), "bad frame"));
                }
            }
        }
        if !out.is_empty() {
            continue;
        }
        // Not biased: a connection pushed to without pause must still be read (pongs, closes),
        // or the heartbeat would take a live client for a dead one.
        tokio::select! {
            () = conn.wake.notified() => match conn.close_code.load(Ordering::Acquire) {
                0 => conn.take(&mut out),
                close::POLICY => break Some((close::POLICY, "slow consumer")),
                close::GOING_AWAY => break Some((close::GOING_AWAY, "going away")),
                code => break Some((code, "")),
            },
            r = stream.readable() => {
                if r.is_err() {
                    break None;
                }
                match stream.try_read_buf(&mut buf) {
                    Ok(0) => break None,
                    Ok(_) => conn.last_seen.store(worker.now(), Ordering::Relaxed),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break None,
                }
            }
        }
    };
    Box::pin(worker.remove(id)).await;
    if let Some((code, reason)) = closing {
        let mut last = VecDeque::from([ws::close_frame(code, reason)]);
        if flush(&stream, &mut last, CLOSE_LINGER).await {
            linger(&mut stream).await;
        }
    }
    tracing::debug!(worker = %worker.id, connection = id, "client gone");
}

/// Serve one Server-Sent Events stream (its response head already written) until the client goes
/// or the stream is closed: the welcome line as the first event, then what the worker queues.
/// Whatever the client sends is read and ignored.
pub(super) async fn serve_sse(
    mut stream: TcpStream,
    worker: &Arc<Worker>,
    cfg: &GatewayConfig,
    wants: Option<Box<Wants>>,
) {
    let (id, conn, welcome) = Box::pin(open(worker, wants, true, false)).await;
    tracing::debug!(worker = %worker.id, connection = id, "event stream opened");
    let mut out = VecDeque::from([welcome]);
    loop {
        if !out.is_empty() && !flush(&stream, &mut out, cfg.write_timeout).await {
            break;
        }
        tokio::select! {
            () = conn.wake.notified() => match conn.close_code.load(Ordering::Acquire) {
                0 => conn.take(&mut out),
                _ => break,
            },
            r = stream.readable() => {
                if r.is_err() {
                    break;
                }
                let mut scratch = [0u8; 512];
                match stream.try_read(&mut scratch) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
        }
    }
    Box::pin(worker.remove(id)).await;
    let _ = stream.shutdown().await;
    tracing::debug!(worker = %worker.id, connection = id, "event stream closed");
}

/// Add a connection to `worker`: its id, its shared state, and its welcome (the seed's line, or
/// JSON with `format=json`) as its transport sends it.
async fn open(worker: &Arc<Worker>, wants: Option<Box<Wants>>, sse: bool, deflate: bool) -> (u64, Arc<Conn>, Bytes) {
    let wants = wants.map(|w| *w).unwrap_or_default();
    let json = wants.json.then(|| (wants.who.uid.clone(), wants.who.channels.clone()));
    let (id, conn) = worker.add(wants, sse, deflate).await;
    let text = match json {
        Some((uid, channels)) => format::welcome(&worker.id, id, uid.as_deref(), &channels),
        None => format!("workerID:{} connectionID:{id} connected\n", worker.id).into_bytes(),
    };
    let welcome = conn.encode(&text);
    (id, conn, welcome)
}

/// How long a closing connection waits for its close frame to go out and for the client to close.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// Most bytes read and thrown away from a client while waiting for it to close.
const LINGER_BYTES: usize = 64 * 1024;

/// After the close frame: send FIN, then read (and discard) until the client closes too, for at
/// most [`CLOSE_LINGER`]. Dropping a socket with unread input makes the kernel send a reset, which
/// can destroy the close frame before the client reads it.
async fn linger(stream: &mut TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut seen = 0;
        let mut scratch = [0u8; 512];
        while seen < LINGER_BYTES {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen += n,
            }
        }
    };
    let _ = Box::pin(tokio::time::timeout(CLOSE_LINGER, drain)).await;
}

/// Write every queued frame, several per system call, waiting (up to `limit` each time) while the
/// socket's buffer is full. Returns false when the socket failed or stayed full.
///
/// The system call is made synchronously (`try_write_vectored`) so that the slice array lives on
/// the thread's stack, never in the connection's future: an idle connection stays small.
async fn flush(stream: &TcpStream, out: &mut VecDeque<Bytes>, limit: Duration) -> bool {
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
