//! One client connection's task: the welcome line, reading client frames (pings, closes, limits),
//! writing what the worker queued with vectored writes, and closing cleanly.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::handshake::Opening;
use super::wire::Wire;
use super::{format, Conn, GatewayConfig, Wants, Worker};
use crate::metrics::GLOBAL;
use crate::ws::{self, close, ClientFrame};

/// Serve one WebSocket connection until it closes or is closed; `head` (the handshake's answer,
/// when the fast path left it to this task) goes out in one write with the welcome.
///
/// `wants` is boxed (and absent for a seed client), and so are the worker's add and remove: this
/// future lives as long as the connection, and every byte of it counts with a hundred thousand
/// idle clients.
pub(super) async fn serve(
    mut wire: Wire,
    head: Option<Box<Opening>>,
    mut buf: BytesMut,
    worker: &Arc<Worker>,
    cfg: &GatewayConfig,
    wants: Option<Box<Wants>>,
    deflate: bool,
) {
    let (id, conn, welcome) = Box::pin(open(worker, wants, false, deflate)).await;
    tracing::debug!(worker = %worker.id, connection = id, "client connected");
    let mut out = VecDeque::from([Opening::then(head, welcome)]);
    if let Wire::Tcp(s) = &wire {
        conn.attach(s.clone());
    }
    let mut reader = ws::Reader::new(deflate);
    let closing: Option<(u16, &str)> = 'conn: loop {
        if !out.is_empty() {
            if !wire.flush(&mut out, cfg.write_timeout).await {
                break None;
            }
            conn.written();
        }
        loop {
            match reader.parse(&mut buf, cfg.max_client_frame) {
                Ok(None) => break,
                Ok(Some(ClientFrame::Ping(p))) => {
                    conn.hold();
                    out.push_back(ws::pong(&p))
                }
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
            r = wire.read(&mut buf) => match r {
                Ok(0) => break None,
                Ok(_) => conn.last_seen.store(worker.now(), Ordering::Relaxed),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => break None,
            },
        }
    };
    Box::pin(worker.remove(id)).await;
    let remainder = conn.detach();
    if let Some((code, reason)) = closing {
        // Boxed: a future awaited once, at the end, need not take room in every idle connection.
        Box::pin(wire.close(remainder, ws::close_frame(code, reason))).await;
    }
    tracing::debug!(worker = %worker.id, connection = id, "client gone");
}

/// Serve one Server-Sent Events stream (its response head in `head`, unless already written) until the client goes
/// or the stream is closed: the welcome line as the first event, then what the worker queues.
/// Whatever the client sends is read and ignored.
pub(super) async fn serve_sse(
    mut wire: Wire,
    head: Option<Box<Opening>>,
    worker: &Arc<Worker>,
    cfg: &GatewayConfig,
    wants: Option<Box<Wants>>,
) {
    let (id, conn, welcome) = Box::pin(open(worker, wants, true, false)).await;
    tracing::debug!(worker = %worker.id, connection = id, "event stream opened");
    let (mut out, mut ignored) = (VecDeque::from([Opening::then(head, welcome)]), BytesMut::new());
    loop {
        if !out.is_empty() && !wire.flush(&mut out, cfg.write_timeout).await {
            break;
        }
        tokio::select! {
            () = conn.wake.notified() => match conn.close_code.load(Ordering::Acquire) {
                0 => conn.take(&mut out),
                _ => break,
            },
            r = wire.read(&mut ignored) => match r {
                Ok(0) => break,
                Ok(_) => ignored.clear(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            },
        }
    }
    Box::pin(worker.remove(id)).await;
    wire.shutdown().await;
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
