//! The `nats://` backend: NATS core publish/subscribe.
//!
//! `PUB` is followed by `PING`; the server answers `PONG` only after handling what came before it,
//! so each `PONG` confirms one publish (or one idle probe), in order. Every connect attempt moves
//! to the next server of the URL's list, so a gateway whose node dies reconnects to another node
//! of the NATS cluster. Channel names become subjects `PREFIX` + name, with bytes that are not
//! allowed or not safe in a subject token (space, `.`, `*`, `>`, `%`, non-ASCII) percent-encoded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::link::{Incoming, Reader, Transport, Writer};
use super::Message;

/// Longest protocol line accepted from the server (INFO lines included).
const MAX_LINE: usize = 64 * 1024;
/// Largest message payload accepted from the server.
const MAX_PAYLOAD: usize = 64 << 20;

/// Where and how to reach a NATS cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsUrl {
    pub servers: Vec<String>,
    pub user: Option<String>,
    pub pass: Option<String>,
    pub token: Option<String>,
}

impl NatsUrl {
    /// Parse `nats://[USER:PASS@|TOKEN@]HOST:PORT[,HOST:PORT...]`.
    pub fn parse(url: &str) -> Result<NatsUrl, String> {
        let rest = url.strip_prefix("nats://").ok_or_else(|| format!("{url:?} is not a nats:// URL"))?;
        let (auth, hosts) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let servers: Vec<String> =
            hosts.trim_end_matches('/').split(',').map(|s| s.trim().trim_start_matches("nats://").to_owned()).collect();
        for s in &servers {
            if s.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err()) {
                return Err(format!("{url:?}: {s:?} is not HOST:PORT"));
            }
        }
        let (user, pass, token) = match auth.map(|a| a.split_once(':')) {
            None => (None, None, None),
            Some(None) => (None, None, auth.map(str::to_owned)),
            Some(Some((u, p))) => (Some(u.to_owned()), Some(p.to_owned()), None),
        };
        Ok(NatsUrl { servers, user, pass, token })
    }
}

/// A channel name as a subject token.
fn encode_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b':' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode_name(token: &[u8]) -> Option<Bytes> {
    let mut out = Vec::with_capacity(token.len());
    let mut i = 0;
    while let Some(&b) = token.get(i) {
        if b == b'%' {
            let hex = std::str::from_utf8(token.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Some(out.into())
}

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// Connects to one of the servers of a NATS cluster, rotating on every attempt.
pub struct NatsTransport {
    url: NatsUrl,
    prefix: String,
    next: AtomicUsize,
}

impl NatsTransport {
    pub fn new(url: NatsUrl, prefix: String) -> NatsTransport {
        NatsTransport { url, prefix, next: AtomicUsize::new(0) }
    }
}

pub struct NatsReader {
    rd: OwnedReadHalf,
    buf: BytesMut,
    prefix: String,
}

pub struct NatsWriter {
    wr: OwnedWriteHalf,
    out: BytesMut,
    prefix: String,
    sids: HashMap<String, u64>,
    next_sid: u64,
}

/// Where the first protocol line in `buf` ends (before its CRLF), if it is whole.
fn line_end(buf: &[u8]) -> std::io::Result<Option<usize>> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        None if buf.len() > MAX_LINE => Err(bad("NATS protocol line too long")),
        end => Ok(end),
    }
}

/// Take one protocol line (without CRLF) off `buf`.
fn take_line(buf: &mut BytesMut) -> std::io::Result<Option<Bytes>> {
    Ok(line_end(buf)?.map(|n| {
        let l = buf.split_to(n).freeze();
        buf.advance(2);
        l
    }))
}

impl Transport for NatsTransport {
    type Reader = NatsReader;
    type Writer = NatsWriter;

    async fn connect(&self) -> std::io::Result<(NatsReader, NatsWriter)> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.url.servers.len().max(1);
        let server = self.url.servers.get(i).ok_or_else(|| bad("no NATS server"))?;
        let s =
            TcpStream::connect(server).await.map_err(|e| std::io::Error::new(e.kind(), format!("{server}: {e}")))?;
        s.set_nodelay(true)?;
        let (mut rd, mut wr) = s.into_split();
        let mut buf = BytesMut::with_capacity(4096);
        // The server speaks first: INFO {...}.
        let info = loop {
            if let Some(l) = take_line(&mut buf)? {
                break l;
            }
            if rd.read_buf(&mut buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        };
        if !info.starts_with(b"INFO ") {
            return Err(bad(format!("{server} is not a NATS server")));
        }
        let mut connect = String::from(
            r#"{"verbose":false,"pedantic":false,"lang":"rust","name":"pushwire","protocol":1,"echo":true"#,
        );
        let quote = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        if let (Some(u), Some(p)) = (&self.url.user, &self.url.pass) {
            connect.push_str(&format!(r#","user":"{}","pass":"{}""#, quote(u), quote(p)));
        }
        if let Some(t) = &self.url.token {
            connect.push_str(&format!(r#","auth_token":"{}""#, quote(t)));
        }
        connect.push('}');
        wr.write_all(format!("CONNECT {connect}\r\nPING\r\n").as_bytes()).await?;
        // The first PONG proves the CONNECT was accepted; -ERR says why not.
        loop {
            match take_line(&mut buf)? {
                Some(l) if &l[..] == b"PONG" => break,
                Some(l) if l.starts_with(b"-ERR") => {
                    return Err(bad(format!("{server}: {}", String::from_utf8_lossy(&l))));
                }
                Some(_) => continue,
                None => {
                    if rd.read_buf(&mut buf).await? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                }
            }
        }
        let p = self.prefix.clone();
        Ok((
            NatsReader { rd, buf, prefix: p.clone() },
            NatsWriter { wr, out: BytesMut::with_capacity(4096), prefix: p, sids: HashMap::new(), next_sid: 0 },
        ))
    }
}

impl Writer for NatsWriter {
    fn subscribe(&mut self, channels: &[String]) {
        for c in channels {
            if self.sids.contains_key(c) {
                continue;
            }
            self.next_sid += 1;
            self.sids.insert(c.clone(), self.next_sid);
            self.out
                .extend_from_slice(format!("SUB {}{} {}\r\n", self.prefix, encode_name(c), self.next_sid).as_bytes());
        }
    }

    fn unsubscribe(&mut self, channels: &[String]) {
        for c in channels {
            if let Some(sid) = self.sids.remove(c) {
                self.out.extend_from_slice(format!("UNSUB {sid}\r\n").as_bytes());
            }
        }
    }

    fn publish(&mut self, channel: &str, data: &[u8]) {
        self.out
            .extend_from_slice(format!("PUB {}{} {}\r\n", self.prefix, encode_name(channel), data.len()).as_bytes());
        self.out.extend_from_slice(data);
        self.out.extend_from_slice(b"\r\nPING\r\n");
    }

    fn probe(&mut self) {
        self.out.extend_from_slice(b"PING\r\n");
    }

    fn answer_ping(&mut self) {
        self.out.extend_from_slice(b"PONG\r\n");
    }

    fn has_pending(&self) -> bool {
        !self.out.is_empty()
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        while self.out.has_remaining() {
            self.wr.write_buf(&mut self.out).await?;
        }
        Ok(())
    }
}

impl NatsReader {
    /// Parse one whole protocol message at the front of the buffer, if it is there.
    fn parse(&mut self) -> std::io::Result<Option<Incoming>> {
        let Some(end) = line_end(&self.buf)? else { return Ok(None) };
        let line = &self.buf[..end];
        if line.starts_with(b"MSG ") {
            // MSG <subject> <sid> [reply-to] <#bytes>
            let parts: Vec<&[u8]> = line.split(|b| *b == b' ').filter(|p| !p.is_empty()).collect();
            let (Some(subject), Some(len)) = (parts.get(1), parts.last()) else { return Err(bad("bad MSG line")) };
            let len: usize =
                std::str::from_utf8(len).ok().and_then(|l| l.parse().ok()).ok_or_else(|| bad("bad MSG size"))?;
            if len > MAX_PAYLOAD {
                return Err(bad("NATS message too large"));
            }
            if self.buf.len() < end + 2 + len + 2 {
                return Ok(None);
            }
            let channel = subject.strip_prefix(self.prefix.as_bytes()).and_then(decode_name);
            let mut whole = self.buf.split_to(end + 2 + len + 2).freeze();
            whole.advance(end + 2);
            whole.truncate(len);
            return Ok(Some(match channel {
                Some(channel) => Incoming::Message(Message { channel, data: whole }),
                None => Incoming::Nothing,
            }));
        }
        let line = self.buf.split_to(end).freeze();
        self.buf.advance(2);
        Ok(Some(match &line[..] {
            b"PONG" => Incoming::Ack,
            b"PING" => Incoming::Ping,
            l if l.starts_with(b"-ERR") => return Err(bad(format!("nats: {}", String::from_utf8_lossy(l)))),
            _ => Incoming::Nothing, // +OK, INFO updates
        }))
    }
}

impl Reader for NatsReader {
    async fn next(&mut self) -> std::io::Result<Incoming> {
        loop {
            if let Some(m) = self.parse()? {
                return Ok(m);
            }
            if self.rd.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = NatsUrl::parse("nats://127.0.0.1:4222,127.0.0.1:4223").unwrap();
        assert_eq!(u.servers, ["127.0.0.1:4222", "127.0.0.1:4223"]);
        let u = NatsUrl::parse("nats://me:pw@h:1").unwrap();
        assert_eq!((u.user.as_deref(), u.pass.as_deref()), (Some("me"), Some("pw")));
        assert_eq!(NatsUrl::parse("nats://tok@h:1").unwrap().token.as_deref(), Some("tok"));
        assert!(NatsUrl::parse("nats://h:1,nope").is_err());
    }

    #[test]
    fn names_round_trip() {
        for n in ["broadcast", "3f9a-0", "a b.c*>%", "ünï"] {
            let e = encode_name(n);
            assert!(!e.contains(['.', ' ', '*', '>']), "{e}");
            assert_eq!(decode_name(e.as_bytes()).unwrap(), n.as_bytes());
        }
    }
}
