//! A connection's outbound queue as the worker and the connection's task share it: bounded
//! (frames and bytes), the worker's direct write to an idle socket, the rest of a frame written in
//! part, and the frame cache that encodes each push once per kind of connection.

use super::*;

/// What a worker and a connection's task share: the connection's outbound queue, and how to wake
/// the task (for queued frames, or to close with `close_code`).
pub struct Conn {
    queue: Mutex<Queue>,
    pub(in crate::gateway) wake: Notify,
    pub(in crate::gateway) close_code: AtomicU16,
    pub(in crate::gateway) last_seen: AtomicU64,
    /// A Server-Sent Events stream rather than a WebSocket: it gets events, not frames.
    pub(in crate::gateway) sse: bool,
    /// How pushes are encoded for it (its protocol's, and the options it chose).
    pub(in crate::gateway) encoding: Encoding,
    /// permessage-deflate was negotiated: pushes of at least the gateway's minimum size go
    /// compressed.
    pub(in crate::gateway) deflate: bool,
}

/// Kinds of connection a push may be encoded for: each encoding, transport and compression.
pub(super) const KINDS: usize = Encoding::COUNT * 4;

/// One push as each kind of connection gets it (each [`Encoding`], WebSocket or SSE, compressed or
/// not), each encoded on first use (once per message per worker), then shared by every
/// connection of that kind.
pub(in crate::gateway) struct Frames<'a> {
    pub(super) channel: &'a str,
    pub(super) position: Option<&'a Position>,
    content: &'a [u8],
    /// Compress for connections that negotiated it (the push is at least the minimum size).
    compress: bool,
    encoded: [std::cell::OnceCell<Bytes>; KINDS],
}

impl<'a> Frames<'a> {
    pub(super) fn new(
        channel: &'a str,
        position: Option<&'a Position>,
        content: &'a [u8],
        compress: bool,
    ) -> Frames<'a> {
        Frames { channel, position, content, compress, encoded: Default::default() }
    }

    #[inline]
    pub(super) fn for_conn(&self, c: &Conn) -> &Bytes {
        let compress = self.compress && c.deflate;
        self.encoded[c.kind(compress)]
            .get_or_init(|| c.encode_push(self.channel, self.position, self.content, compress))
    }
}

/// Frames waiting for the connection's task. Empty, it allocates nothing: most connections
/// mostly listen.
#[derive(Default)]
pub(super) struct Queue {
    pub(super) frames: VecDeque<Bytes>,
    pub(super) bytes: usize,
    /// The task has written everything it had: the worker may write to the socket itself.
    pub(super) idle: bool,
    /// The first frame is the rest of one the worker wrote in part.
    pub(super) partial: bool,
    /// The client's plain TCP socket, which the worker writes to itself while `idle` and nothing
    /// is queued; taken away when the task closes the connection.
    pub(super) direct: Option<Arc<tokio::net::TcpStream>>,
    /// Told when the task takes the queue: a recovery waiting for room to feed more.
    pub(super) drained: Option<Arc<Notify>>,
}

/// What became of a frame offered to a connection.
pub(super) enum Offer {
    Queued,
    /// Nothing is queued and the task is not writing: the worker writes the frame itself, once
    /// the connection table is unlocked ([`Conn::write`]).
    Direct,
    /// The queue is full (messages or bytes): the client is a slow consumer.
    Full,
}

impl Conn {
    /// A connection last heard from at `now` (the worker's clock), of a transport (`sse`), an
    /// encoding, compressed or not (`deflate`), with nothing queued.
    pub(super) fn new(now: u64, sse: bool, encoding: Encoding, deflate: bool) -> Conn {
        let (wake, close_code, last_seen) = (Notify::new(), AtomicU16::new(0), AtomicU64::new(now));
        Conn { queue: Mutex::default(), wake, close_code, last_seen, sse, encoding, deflate }
    }

    /// Which kind of connection this is for a push compressed or not (`compress`): a place in
    /// [`Frames`], below [`KINDS`].
    #[inline]
    pub(super) fn kind(&self, compress: bool) -> usize {
        self.encoding as usize * 4 + self.sse as usize * 2 + compress as usize
    }

    /// `text` as one frame (or event) of this connection's transport.
    pub(in crate::gateway) fn encode(&self, text: &[u8]) -> Bytes {
        self.encode_compressed(text, false)
    }

    /// `text` as one frame (compressed when `compress`; a text frame when it is UTF-8) or event.
    pub(super) fn encode_compressed(&self, text: &[u8], compress: bool) -> Bytes {
        let opcode = if std::str::from_utf8(text).is_ok() { ws::TEXT } else { ws::BINARY };
        self.encode_message(opcode, text, compress)
    }

    /// `payload` as one message of `opcode` (text or binary), compressed when `compress`, or as
    /// an event on an event stream.
    pub(in crate::gateway) fn encode_message(&self, opcode: u8, payload: &[u8], compress: bool) -> Bytes {
        match (self.sse, compress) {
            (true, _) => crate::sse::event(payload),
            (false, true) => ws::encode_compressed(opcode, payload),
            (false, false) => ws::encode(opcode, payload),
        }
    }

    /// A push on `channel` (at `position`) as this connection gets it, in its encoding,
    /// compressed when `compress`; on an event stream with the id the encoding gives it.
    pub(super) fn encode_push(
        &self,
        channel: &str,
        position: Option<&Position>,
        content: &[u8],
        compress: bool,
    ) -> Bytes {
        let (text, id) = self.encoding.push(channel, position, content);
        match (self.sse, id) {
            (true, Some(id)) => crate::sse::event_with_id(&text, Some(&id)),
            _ => self.encode_compressed(&text, compress),
        }
    }

    #[inline]
    pub(super) fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        crate::io::lock(&self.queue)
    }

    /// Queue `frame` without waiting, within `max_frames` and `max_bytes`; with `direct`, leave
    /// it to the worker ([`Offer::Direct`]) when the connection is idle.
    #[inline]
    pub(super) fn offer(&self, frame: &Bytes, max_frames: usize, max_bytes: usize, direct: bool) -> Offer {
        let mut q = self.queue();
        if q.frames.len() >= max_frames || q.bytes + frame.len() > max_bytes {
            return Offer::Full;
        }
        let was_empty = q.frames.is_empty();
        if direct && was_empty && q.idle && q.direct.is_some() {
            return Offer::Direct;
        }
        q.bytes += frame.len();
        q.frames.push_back(frame.clone());
        drop(q);
        if was_empty {
            self.wake.notify_one();
        }
        Offer::Queued
    }

    /// Write `frame` to the socket now if nothing is queued and the task is not writing (no task
    /// wake-up, no second system call); otherwise, or for what the socket did not take, queue it
    /// for the task.
    #[inline]
    pub(super) fn write(&self, mut frame: Bytes) {
        let mut q = self.queue();
        if q.frames.is_empty() && q.idle {
            if let Some(s) = &q.direct {
                match s.try_write(&frame) {
                    Ok(n) if n == frame.len() => return,
                    Ok(n) => {
                        frame.advance(n);
                        q.partial = true;
                    }
                    Err(_) => {}
                }
            }
        }
        let was_empty = q.frames.is_empty();
        q.idle = false;
        q.bytes += frame.len();
        q.frames.push_back(frame);
        drop(q);
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// Let the worker write to `socket` itself (once the task has written what it has).
    pub(in crate::gateway) fn attach(&self, socket: Arc<tokio::net::TcpStream>) {
        self.queue().direct = Some(socket);
    }

    /// The task closes the connection: the worker writes to it no more and lets go of the socket.
    /// Returns what is left of a frame the worker wrote in part, which must go out before the
    /// close frame.
    pub(in crate::gateway) fn detach(&self) -> Option<Bytes> {
        let mut q = self.queue();
        q.idle = false;
        q.direct = None;
        if let Some(drained) = q.drained.take() {
            drained.notify_one();
        }
        match std::mem::take(&mut q.partial) {
            true => q.frames.pop_front(),
            false => None,
        }
    }

    /// The task wrote everything: the worker may write directly again, unless more is queued.
    #[inline]
    pub(in crate::gateway) fn written(&self) {
        let mut q = self.queue();
        q.idle = q.frames.is_empty();
        let more = !q.idle;
        drop(q);
        if more {
            self.wake.notify_one();
        }
    }

    /// Whether the queue has room for `n` more frames, keeping it at most half full (`max`:
    /// frames and bytes); if not, `drained` is told when the task next takes the queue.
    pub(super) fn has_room(&self, n: usize, (max_frames, max_bytes): (usize, usize), drained: &Arc<Notify>) -> bool {
        let mut q = self.queue();
        let room = q.frames.is_empty() || (q.frames.len() + n <= max_frames / 2 && q.bytes <= max_bytes / 2);
        if !room {
            q.drained = Some(drained.clone());
        }
        room
    }

    /// Move everything queued into `out`.
    #[inline]
    pub(in crate::gateway) fn take(&self, out: &mut VecDeque<Bytes>) {
        let mut q = self.queue();
        q.idle = false;
        q.partial = false;
        q.bytes = 0;
        if out.is_empty() {
            std::mem::swap(out, &mut q.frames);
        } else {
            out.extend(q.frames.drain(..));
        }
        if let Some(drained) = q.drained.take() {
            drained.notify_one();
        }
    }

    /// Ask the connection's task to close with `code`.
    pub(in crate::gateway) fn close(&self, code: u16) {
        self.close_code.store(code, Ordering::Release);
        self.wake.notify_one();
    }

    /// For benchmarks: drop whatever is queued.
    #[doc(hidden)]
    pub fn drain(&self) {
        *self.queue() = Queue::default();
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use tokio::io::AsyncReadExt;

    /// A worker's connection on a real socket whose peer (returned) reads only when told.
    async fn connection() -> (Arc<Conn>, tokio::net::TcpStream) {
        let broker = Arc::new(crate::broker::memory::MemoryBroker::new(Arc::default(), ""));
        let w = Arc::new(Worker::new("test-0".into(), (1024, usize::MAX), None, broker, 0).0);
        let conn = w.add(w.next_id(), Wants::default(), false, false).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let peer = tokio::net::TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        conn.attach(Arc::new(listener.accept().await.expect("accept").0));
        (conn, peer)
    }

    /// Read exactly `n` bytes, then check that nothing more came (the socket may be closed: once
    /// detached, only the task holds it, and here there is none).
    async fn read_exactly(peer: &mut tokio::net::TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0u8; n];
        tokio::time::timeout(Duration::from_secs(10), peer.read_exact(&mut got)).await.expect("in time").expect("read");
        let mut more = [0u8; 1];
        let extra = tokio::time::timeout(Duration::from_millis(100), peer.read(&mut more)).await;
        assert!(!matches!(extra, Ok(Ok(k)) if k > 0), "nothing after the {n} bytes");
        got
    }

    #[tokio::test]
    async fn the_worker_writes_to_an_idle_socket_and_the_task_gets_the_rest_of_a_frame() {
        let (conn, mut peer) = connection().await;
        let (small, max) = (Bytes::from_static(b"\x81\x02hi"), usize::MAX);
        // Until the task has written its opening, pushes wait in the queue.
        assert!(matches!(conn.offer(&small, 1024, max, true), Offer::Queued));
        let mut out = VecDeque::new();
        conn.take(&mut out);
        assert_eq!(out, std::slice::from_ref(&small));
        conn.written();
        // Idle: the worker writes, and the frame goes out once.
        assert!(matches!(conn.offer(&small, 1024, max, true), Offer::Direct));
        conn.write(small.clone());
        assert_eq!(read_exactly(&mut peer, small.len()).await, &small[..]);
        // With a backlog the worker queues even to an idle connection.
        assert!(matches!(conn.offer(&small, 1024, max, false), Offer::Queued));
        conn.take(&mut out);
        conn.written();
        // A frame larger than the socket's buffers goes out in part; what follows waits behind
        // its rest, which the task gets back when it closes, to write before the close frame.
        let big = Bytes::from(vec![b'x'; 32 << 20]);
        assert!(matches!(conn.offer(&big, 1024, max, true), Offer::Direct));
        conn.write(big.clone());
        assert!(matches!(conn.offer(&small, 1024, max, true), Offer::Queued));
        let rest = conn.detach().expect("the rest of the big frame");
        assert!(!rest.is_empty() && rest.len() < big.len(), "written in part: {} left", rest.len());
        assert_eq!(rest, big.slice(big.len() - rest.len()..));
        let sent = read_exactly(&mut peer, big.len() - rest.len()).await;
        assert!(sent.iter().all(|&b| b == b'x'));
        // Detached: nothing more is written by the worker.
        conn.written();
        assert!(matches!(conn.offer(&small, 1024, max, true), Offer::Queued));
    }
}
