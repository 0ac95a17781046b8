//! The `channel://` backend: a Workerman Channel server (ours or PHP's) as the broker.
//!
//! Publishes are confirmed without any protocol extension: the link subscribes to a private
//! channel of its own and, after each publish, publishes an empty marker there. The server handles
//! a connection's frames in order, so when the marker comes back the publish before it has been
//! routed to every subscriber. The same marker, sent when idle, proves the server still answers.

use bytes::{Buf, BytesMut};
use channel_proto::message::ServerKind;
use channel_proto::{frame, Name, Request, ServerMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};

use super::link::{Incoming, Reader, Transport, Writer};
use super::{Keep, Message, Position};
use crate::channel_ext::{ACK, HISTORY, POSITIONS};
use crate::io::{ListenAddr, Stream};

/// Connects to a channel server: the one it reached last, else the next of its addresses.
pub struct ChannelTransport {
    addrs: Vec<ListenAddr>,
    /// The address to try first.
    current: std::sync::atomic::AtomicUsize,
    secret: Option<String>,
    prefix: String,
    ack: Name,
}

impl ChannelTransport {
    pub fn new(addrs: Vec<ListenAddr>, secret: Option<String>, prefix: &str) -> ChannelTransport {
        let ack = Name::new(format!("{prefix}{ACK}{}", crate::io::random_hex(8)));
        let current = std::sync::atomic::AtomicUsize::new(0);
        ChannelTransport { addrs, current, secret, prefix: prefix.to_owned(), ack }
    }

    /// A stream to the first address that answers, from the current one on (each tried once);
    /// the one that answered is tried first next time.
    async fn reach(&self) -> std::io::Result<Box<dyn Stream>> {
        use std::sync::atomic::Ordering::Relaxed;
        let start = self.current.load(Relaxed);
        let mut last = std::io::Error::other("no address");
        for i in 0..self.addrs.len() {
            let at = (start + i) % self.addrs.len();
            // Moved on before trying: an attempt cut short (an address that never answers) makes
            // the next one start further along.
            self.current.store((at + 1) % self.addrs.len(), Relaxed);
            let stream: std::io::Result<Box<dyn Stream>> = match &self.addrs[at] {
                ListenAddr::Tcp(a) => match tokio::net::TcpStream::connect(a).await {
                    Ok(s) => s.set_nodelay(true).map(|()| Box::new(s) as Box<dyn Stream>),
                    Err(e) => Err(e),
                },
                ListenAddr::Unix(p) => tokio::net::UnixStream::connect(p).await.map(|s| Box::new(s) as Box<dyn Stream>),
            };
            match stream {
                Ok(s) => {
                    if at != start {
                        tracing::warn!(server = %self.addrs[at], "channel link moved to the next server");
                    }
                    self.current.store(at, Relaxed);
                    return Ok(s);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

pub struct ChannelReader {
    rd: ReadHalf<Box<dyn Stream>>,
    buf: BytesMut,
    prefix: String,
    ack: Name,
    /// The server's answer to the publish or history request before the next marker.
    answer: Option<bytes::Bytes>,
    /// The latest epoch seen, shared by the messages that carry it.
    epoch: Option<std::sync::Arc<str>>,
}

pub struct ChannelWriter {
    wr: WriteHalf<Box<dyn Stream>>,
    out: BytesMut,
    prefix: String,
    ack: Name,
}

impl Transport for ChannelTransport {
    type Reader = ChannelReader;
    type Writer = ChannelWriter;

    async fn connect(&self) -> std::io::Result<(ChannelReader, ChannelWriter)> {
        let stream = self.reach().await?;
        let (rd, wr) = tokio::io::split(stream);
        let prefix = self.prefix.clone();
        let mut w =
            ChannelWriter { wr, out: BytesMut::with_capacity(4096), prefix: prefix.clone(), ack: self.ack.clone() };
        if let Some(secret) = &self.secret {
            w.request(&Request::Auth(secret.clone().into_bytes().into()));
        }
        // Our own channel server then sends positions with events and answers publishes and
        // history requests; any other sees a subscription to a channel nobody publishes on.
        w.request(&Request::Subscribe(vec![self.ack.clone(), Name::new(POSITIONS)]));
        let reader = ChannelReader {
            rd,
            buf: BytesMut::with_capacity(8192),
            prefix,
            ack: self.ack.clone(),
            answer: None,
            epoch: None,
        };
        Ok((reader, w))
    }
}

impl ChannelWriter {
    fn request(&mut self, r: &Request) {
        frame::encode_into(&r.encode(), &mut self.out);
    }

    fn name(&self, channel: &str) -> Name {
        Name::new(format!("{}{channel}", self.prefix).into_bytes())
    }

    fn names(&self, channels: &[String]) -> Vec<Name> {
        channels.iter().map(|c| self.name(c)).collect()
    }
}

impl Writer for ChannelWriter {
    fn subscribe(&mut self, channels: &[String]) {
        self.request(&Request::Subscribe(self.names(channels)));
    }

    fn unsubscribe(&mut self, channels: &[String]) {
        self.request(&Request::Unsubscribe(self.names(channels)));
    }

    fn publish(&mut self, channel: &str, data: &[u8], keep: Option<Keep>) {
        let channels = vec![self.name(channel)];
        self.request(&Request::Publish { channels, data: bytes::Bytes::copy_from_slice(data), keep });
        self.probe();
    }

    fn probe(&mut self) {
        self.out.extend_from_slice(&frame::PING);
        let marker =
            Request::Publish { channels: vec![self.ack.clone()], data: bytes::Bytes::from_static(b"N;"), keep: None };
        self.request(&marker);
    }

    fn history(&mut self, data: &[u8]) {
        let channels = vec![Name::new(HISTORY)];
        self.request(&Request::Publish { channels, data: bytes::Bytes::copy_from_slice(data), keep: None });
        self.probe();
    }

    fn has_pending(&self) -> bool {
        !self.out.is_empty()
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        while self.out.has_remaining() {
            self.wr.write_buf(&mut self.out).await?;
        }
        self.wr.flush().await
    }
}

impl ChannelReader {
    fn epoch(&mut self, e: &[u8]) -> std::sync::Arc<str> {
        match &self.epoch {
            Some(last) if last.as_bytes() == e => last.clone(),
            _ => self.epoch.insert(String::from_utf8_lossy(e).into()).clone(),
        }
    }
}

impl Reader for ChannelReader {
    async fn next(&mut self) -> std::io::Result<Incoming> {
        loop {
            let payload = frame::take_payload(&mut self.buf, channel_proto::DEFAULT_MAX_FRAME * 16)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            if let Some(payload) = payload {
                if payload.is_empty() {
                    continue;
                }
                let m = ServerMessage::parse(&payload)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                return Ok(match m.kind {
                    ServerKind::Event if m.channel == self.ack => Incoming::Ack(self.answer.take()),
                    ServerKind::Event if m.channel.as_bytes() == POSITIONS.as_bytes() => {
                        self.answer = Some(m.data);
                        Incoming::Nothing
                    }
                    ServerKind::Event => match m.channel.as_bytes().strip_prefix(self.prefix.as_bytes()) {
                        Some(local) => Incoming::Message(Message {
                            channel: bytes::Bytes::copy_from_slice(local),
                            data: m.data,
                            position: m.position.map(|(offset, epoch)| Position { offset, epoch: self.epoch(&epoch) }),
                        }),
                        None => Incoming::Nothing,
                    },
                    ServerKind::Queue => Incoming::Nothing,
                });
            }
            if self.rd.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}
