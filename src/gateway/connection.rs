//! One client connection's task: the welcome line, reading client frames (pings, closes, limits;
//! whole messages for a protocol that reads them), writing what the worker queued with vectored
//! writes, and closing cleanly.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::handshake::Opening;
use super::wire::Wire;
use super::{Conn, GatewayConfig, Worker};
use crate::history::Keep;
use crate::metrics::GLOBAL;
use crate::protocol::native::{self, Wants};
use crate::protocol::{BoxFuture, Engine, Held, Protocol};
use crate::ws::{self, close, ClientFrame};

/// Serve one WebSocket connection of protocol `P` until it closes or is closed; `head` (the
/// handshake's answer, when the fast path left it to this task) goes out in one write with the
/// welcome.
///
/// The session is the protocol's (for a seed client, nothing), and the worker's add and remove
/// and the handling of client messages are boxed: this future lives as long as the connection,
/// and every byte of it counts with a hundred thousand idle clients.
pub(super) async fn serve<P: Protocol>(
    mut wire: Wire,
    head: Option<Box<Opening>>,
    mut buf: BytesMut,
    worker: &Arc<Worker>,
    cfg: &GatewayConfig,
    (wants, mut session): (Option<Box<Wants>>, P::Session),
    deflate: bool,
) {
    let (id, conn, welcome) = match P::HELD {
        Held::Native => Box::pin(open(worker, wants, false, deflate)).await,
        Held::Joiner(encoding) => {
            let id = worker.next_id();
            (id, worker.add_joiner(id, encoding, deflate), Bytes::new())
        }
        Held::Unlisted => {
            let (id, conn) = worker.add_unlisted(deflate);
            (id, conn, Bytes::new())
        }
    };
    tracing::debug!(worker = %worker.id, connection = id, "client connected");
    let mut out = VecDeque::from([Opening::then(head, welcome)]);
    out.retain(|f| !f.is_empty());
    if P::HELD != Held::Native {
        let mut ctx = Session { worker, conn: &conn, id, out: &mut out, closing: None };
        P::welcome(&mut session, &mut ctx);
        // A refusal: what the protocol said goes out, then the close.
        if let Some((code, _)) = ctx.closing {
            conn.close(code);
        }
    }
    if let Wire::Tcp(s) = &wire {
        conn.attach(s.clone());
    }
    let mut reader = ws::Reader::new(deflate);
    if P::READS {
        reader = reader.keeping();
    }
    let closing: Option<(u16, Box<str>)> = 'conn: loop {
        if !out.is_empty() {
            if !wire.flush(&mut out, cfg.write_timeout).await {
                break None;
            }
            conn.written();
        }
        match on_frames(&mut reader, &mut buf, cfg.max_client_frame, &conn, &mut out) {
            Ok(None) => {}
            // One message at a time: the frames after it wait in `buf` until it is handled.
            Ok(Some((text, data))) => {
                if let Some(close) = Box::pin(handle::<P>(&mut session, worker, &conn, id, &mut out, text, data)).await
                {
                    break 'conn Some(close);
                }
                // Nothing more waiting: let the read buffer go rather than hold it while idle.
                if buf.is_empty() {
                    buf = BytesMut::new();
                }
                continue;
            }
            Err(Ok(code)) => break 'conn Some((code, "".into())),
            Err(Err(e)) => {
                GLOBAL.bad_client_frames.fetch_add(1, Ordering::Relaxed);
                tracing::info!(worker = %worker.id, connection = id, "closing: {e}");
                break 'conn Some((e.code(), "bad frame".into()));
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
                close::POLICY => break Some((close::POLICY, "slow consumer".into())),
                close::GOING_AWAY => break Some((close::GOING_AWAY, "going away".into())),
                code => break Some((code, "".into())),
            },
            r = wire.read(&mut buf) => match r {
                Ok(0) => break None,
                Ok(_) => conn.last_seen.store(worker.now(), Ordering::Relaxed),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => break None,
            },
        }
    };
    if P::HELD != Held::Native {
        Box::pin(async {
            let mut ctx = Session { worker, conn: &conn, id, out: &mut out, closing: None };
            P::on_close(&mut session, &mut ctx).await
        })
        .await;
    }
    Box::pin(worker.remove(id)).await;
    let remainder = conn.detach();
    if let Some((code, reason)) = closing {
        // Boxed: a future awaited once, at the end, need not take room in every idle connection.
        // What the protocol said last (a refusal's reason) goes out before the close.
        Box::pin(async move {
            if !out.is_empty() && remainder.is_none() {
                wire.flush(&mut out, cfg.write_timeout).await;
            }
            wire.close(remainder, ws::close_frame(code, &reason)).await
        })
        .await;
    }
    tracing::debug!(worker = %worker.id, connection = id, "client gone");
}

/// Hand a whole client message to the protocol; whether it closes the connection (its code and
/// reason). What it sends goes after whatever the worker queued.
async fn handle<P: Protocol>(
    session: &mut P::Session,
    worker: &Arc<Worker>,
    conn: &Arc<Conn>,
    id: u64,
    out: &mut VecDeque<Bytes>,
    text: bool,
    data: Bytes,
) -> Option<(u16, Box<str>)> {
    conn.take(out);
    let mut ctx = Session { worker, conn, id, out, closing: None };
    P::on_message(session, &mut ctx, text, data).await;
    ctx.closing
}

/// Act on the whole frames in `buf` up to the first whole message, which is returned (for a
/// protocol that reads them): a ping is answered (after whatever the worker left queued: the
/// rest of a frame it wrote in part, above all, nothing may land inside it). Ends at a client's
/// close (its code) or a bad frame.
fn on_frames(
    reader: &mut ws::Reader,
    buf: &mut BytesMut,
    max_frame: usize,
    conn: &Conn,
    out: &mut VecDeque<Bytes>,
) -> Result<Option<(bool, Bytes)>, Result<u16, ws::WsError>> {
    loop {
        match reader.parse(buf, max_frame) {
            Ok(None) => return Ok(None),
            Ok(Some(ClientFrame::Ping(p))) => {
                conn.take(out);
                out.push_back(ws::pong(&p))
            }
            Ok(Some(ClientFrame::Message { text, data })) => return Ok(Some((text, data))),
            Ok(Some(ClientFrame::Close(code))) => return Err(Ok(code.unwrap_or(close::NORMAL))),
            Ok(Some(ClientFrame::Data | ClientFrame::Pong)) => {}
            Err(e) => return Err(Err(e)),
        }
    }
}

/// One connection as its protocol sees the engine while it handles a message: replies go out
/// compressed as the worker's pushes are (when negotiated), after what the worker queued.
struct Session<'a> {
    worker: &'a Arc<Worker>,
    conn: &'a Arc<Conn>,
    id: u64,
    out: &'a mut VecDeque<Bytes>,
    closing: Option<(u16, Box<str>)>,
}

impl Engine for Session<'_> {
    fn send(&mut self, text: bool, payload: &[u8]) {
        let opcode = if text { ws::TEXT } else { ws::BINARY };
        let compress = self.conn.deflate && self.worker.compresses(payload);
        self.out.push_back(self.conn.encode_message(opcode, payload, compress));
    }

    fn close(&mut self, code: u16, reason: &str) {
        self.closing = Some((code, reason.into()));
    }

    fn socket(&self) -> (&str, u64) {
        (&self.worker.id, self.id)
    }

    fn join<'a>(&'a mut self, channel: &'a str, member: Option<(&'a str, &'a str)>) -> BoxFuture<'a, bool> {
        Box::pin(self.worker.join(self.id, channel, member))
    }

    fn members<'a>(
        &'a mut self,
        channel: &'a str,
    ) -> BoxFuture<'a, Option<std::collections::BTreeMap<String, String>>> {
        Box::pin(self.worker.members(channel))
    }

    fn leave<'a>(&'a mut self, channel: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(self.worker.leave(self.id, channel))
    }

    fn publish<'a>(&'a mut self, channel: &'a str, data: Bytes, keep: Option<Keep>) -> BoxFuture<'a, bool> {
        Box::pin(async move { self.worker.publish(channel, data, keep).await })
    }

    fn last<'a>(&'a mut self, channel: &'a str) -> BoxFuture<'a, Option<Bytes>> {
        Box::pin(self.worker.last(channel))
    }

    fn cluster(&self) -> Arc<dyn crate::protocol::Cluster> {
        self.worker.clone()
    }
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
    let _ = conn.detach();
    wire.shutdown().await;
    tracing::debug!(worker = %worker.id, connection = id, "event stream closed");
}

/// Add a connection to `worker`: its id, its shared state, and its welcome (the seed's line, or
/// JSON with `format=json`) as its transport sends it.
async fn open(worker: &Arc<Worker>, wants: Option<Box<Wants>>, sse: bool, deflate: bool) -> (u64, Arc<Conn>, Bytes) {
    let wants = wants.map(|w| *w).unwrap_or_default();
    let id = worker.next_id();
    let welcome = native::welcome(&worker.id, id, Some(&wants));
    let conn = worker.add(id, wants, sse, deflate).await;
    let welcome = conn.encode(&welcome);
    (id, conn, welcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Message;
    use crate::protocol::native::push::Push;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One server frame from `r`: (first byte, payload).
    async fn server_frame(r: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
        let mut head = [0u8; 2];
        r.read_exact(&mut head).await.expect("frame head");
        assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
        let len = match head[1] & 0x7f {
            126 => r.read_u16().await.expect("length") as usize,
            127 => r.read_u64().await.expect("length") as usize,
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await.expect("payload");
        (head[0], payload)
    }

    /// The worker writes a push to an idle socket, which takes only part of it; a client ping is
    /// then read before the task takes its queue. The pong must follow the whole push.
    #[tokio::test]
    async fn a_pong_goes_after_the_rest_of_a_push_the_worker_wrote_in_part() {
        let broker = Arc::new(crate::broker::memory::MemoryBroker::new(Arc::default(), ""));
        let worker = Arc::new(Worker::new("test-0".into(), (1024, usize::MAX), None, broker, 0).0);
        let conn = worker.add(worker.next_id(), Wants::default(), false, false).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let socket = Arc::new(listener.accept().await.expect("accept").0);
        conn.attach(socket.clone());
        conn.written();

        // A push larger than the socket's buffers: written directly, in part.
        let content = vec![b'x'; 16 << 20];
        let push = Push { to_connection_id: None, content: content.clone(), exclude_uid: Vec::new() };
        let m = Message { channel: Bytes::from_static(b"broadcast"), data: push.encode(), position: None };
        worker.handle(m);

        // The client pings; the task reads the ping first.
        client.write_all(&[0x89, 0x84, 1, 2, 3, 4, b'p' ^ 1, b'i' ^ 2, b'n' ^ 3, b'g' ^ 4]).await.expect("ping");
        let mut buf = BytesMut::new();
        while buf.len() < 10 {
            socket.readable().await.expect("readable");
            let _ = socket.try_read_buf(&mut buf);
        }
        let (mut reader, mut out) = (ws::Reader::new(false), VecDeque::new());
        on_frames(&mut reader, &mut buf, 1 << 20, &conn, &mut out).expect("a ping is no reason to close");

        let read = tokio::spawn(async move {
            let push = server_frame(&mut client).await;
            let pong = server_frame(&mut client).await;
            (push, pong)
        });
        let mut wire = Wire::Tcp(socket);
        assert!(wire.flush(&mut out, std::time::Duration::from_secs(10)).await, "written");
        let ((op, payload), pong) =
            tokio::time::timeout(std::time::Duration::from_secs(20), read).await.expect("in time").expect("read");
        assert_eq!((op, payload.len()), (0x81, content.len()), "the push, whole");
        assert!(payload == content, "the push's bytes, unbroken");
        assert_eq!(pong, (0x8a, b"ping".to_vec()), "then the pong");
    }
}
