//! The `redis://` backend: Redis pub/sub (RESP2) over two connections, because a subscribed
//! Redis connection accepts no `PUBLISH`.
//!
//! `SUBSCRIBE`/`UNSUBSCRIBE` go on the subscriber connection; `PUBLISH` and the liveness `PING` go
//! on the command connection, whose replies (`:receivers`, `+PONG`) arrive in order and confirm
//! them. Pub/sub in Redis is global to the server (the `/DB` in the URL does not scope it), so
//! channel names carry the configured prefix.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::link::{Incoming, Reader, Transport, Writer};
use super::Message;

/// Deepest RESP nesting parsed (pub/sub replies are one level).
const MAX_DEPTH: usize = 4;
/// Largest RESP bulk string accepted from the server.
const MAX_BULK: usize = 64 << 20;

/// Where and how to reach Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub addr: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: u32,
}

impl RedisUrl {
    /// Parse `redis://[[USER]:PASSWORD@]HOST:PORT[/DB]`.
    pub fn parse(url: &str) -> Result<RedisUrl, String> {
        let rest = url.strip_prefix("redis://").ok_or_else(|| format!("{url:?} is not a redis:// URL"))?;
        let (auth, hostpart) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (addr, db) = match hostpart.split_once('/') {
            Some((a, "")) => (a, 0),
            Some((a, d)) => (a, d.parse().map_err(|_| format!("{url:?}: database {d:?} is not a number"))?),
            None => (hostpart, 0),
        };
        if addr.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err()) {
            return Err(format!("{url:?}: expected redis://HOST:PORT"));
        }
        let (username, password) = match auth.map(|a| a.split_once(':')) {
            None => (None, None),
            Some(None) => (None, auth.map(str::to_owned)),
            Some(Some((u, p))) => ((!u.is_empty()).then(|| u.to_owned()), Some(p.to_owned())),
        };
        Ok(RedisUrl { addr: addr.to_owned(), username, password, db })
    }
}

/// A parsed RESP2 reply.
#[derive(Debug, PartialEq)]
enum Resp {
    Simple(Bytes),
    Error(Bytes),
    Int(i64),
    Bulk(Option<Bytes>),
    Array(Option<Vec<Resp>>),
}

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// Parse one reply at the front of `buf`: `Ok(None)` when incomplete.
fn parse(buf: &mut BytesMut) -> std::io::Result<Option<Resp>> {
    let mut pos = 0;
    match parse_at(buf, &mut pos, 0)? {
        Some(v) => {
            buf.advance(pos);
            Ok(Some(v))
        }
        None => Ok(None),
    }
}

fn line<'a>(buf: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let rest = buf.get(*pos..)?;
    let end = rest.windows(2).position(|w| w == b"\r\n")?;
    *pos += end + 2;
    Some(&rest[..end])
}

fn parse_at(buf: &[u8], pos: &mut usize, depth: usize) -> std::io::Result<Option<Resp>> {
    if depth > MAX_DEPTH {
        return Err(bad("RESP nested too deep"));
    }
    let Some(&tag) = buf.get(*pos) else { return Ok(None) };
    *pos += 1;
    let Some(l) = line(buf, pos) else { return Ok(None) };
    let num = || -> std::io::Result<i64> {
        std::str::from_utf8(l).ok().and_then(|s| s.parse().ok()).ok_or_else(|| bad("bad RESP number"))
    };
    Ok(Some(match tag {
        b'+' => Resp::Simple(Bytes::copy_from_slice(l)),
        b'-' => Resp::Error(Bytes::copy_from_slice(l)),
        b':' => Resp::Int(num()?),
        b'$' => {
            let n = num()?;
            if n < 0 {
                return Ok(Some(Resp::Bulk(None)));
            }
            let n = n as usize;
            if n > MAX_BULK {
                return Err(bad("RESP bulk string too large"));
            }
            let Some(body) = buf.get(*pos..*pos + n + 2) else { return Ok(None) };
            *pos += n + 2;
            Resp::Bulk(Some(Bytes::copy_from_slice(&body[..n])))
        }
        b'*' => {
            let n = num()?;
            if n < 0 {
                return Ok(Some(Resp::Array(None)));
            }
            let mut items = Vec::with_capacity((n as usize).min(16));
            for _ in 0..n {
                match parse_at(buf, pos, depth + 1)? {
                    Some(v) => items.push(v),
                    None => return Ok(None),
                }
            }
            Resp::Array(Some(items))
        }
        other => return Err(bad(format!("unexpected RESP type byte {other:#x}"))),
    }))
}

/// Append a command as a RESP array of bulk strings.
fn command(out: &mut BytesMut, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Connects to one Redis server.
pub struct RedisTransport {
    url: RedisUrl,
    prefix: String,
}

impl RedisTransport {
    pub fn new(url: RedisUrl, prefix: String) -> RedisTransport {
        RedisTransport { url, prefix }
    }

    async fn open(&self) -> std::io::Result<(OwnedReadHalf, OwnedWriteHalf, BytesMut)> {
        let s = TcpStream::connect(&self.url.addr).await?;
        s.set_nodelay(true)?;
        let (mut rd, mut wr) = s.into_split();
        let mut buf = BytesMut::with_capacity(4096);
        if let Some(pass) = &self.url.password {
            let mut out = BytesMut::new();
            match &self.url.username {
                Some(user) => command(&mut out, &[b"AUTH", user.as_bytes(), pass.as_bytes()]),
                None => command(&mut out, &[b"AUTH", pass.as_bytes()]),
            }
            wr.write_all(&out).await?;
            loop {
                if let Some(reply) = parse(&mut buf)? {
                    match reply {
                        Resp::Simple(_) => break,
                        Resp::Error(e) => return Err(bad(format!("redis AUTH: {}", String::from_utf8_lossy(&e)))),
                        other => return Err(bad(format!("redis AUTH: unexpected {other:?}"))),
                    }
                }
                if rd.read_buf(&mut buf).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
        Ok((rd, wr, buf))
    }
}

pub struct RedisReader {
    sub: OwnedReadHalf,
    sub_buf: BytesMut,
    cmd: OwnedReadHalf,
    cmd_buf: BytesMut,
    prefix: String,
}

pub struct RedisWriter {
    sub: OwnedWriteHalf,
    sub_out: BytesMut,
    cmd: OwnedWriteHalf,
    cmd_out: BytesMut,
    prefix: String,
}

impl Transport for RedisTransport {
    type Reader = RedisReader;
    type Writer = RedisWriter;

    async fn connect(&self) -> std::io::Result<(RedisReader, RedisWriter)> {
        let (sub_rd, sub_wr, sub_buf) = self.open().await?;
        let (cmd_rd, cmd_wr, cmd_buf) = self.open().await?;
        let p = self.prefix.clone();
        Ok((
            RedisReader { sub: sub_rd, sub_buf, cmd: cmd_rd, cmd_buf, prefix: p.clone() },
            RedisWriter { sub: sub_wr, sub_out: BytesMut::new(), cmd: cmd_wr, cmd_out: BytesMut::new(), prefix: p },
        ))
    }
}

impl RedisWriter {
    fn names(&self, verb: &[u8], channels: &[String]) -> Vec<Vec<u8>> {
        std::iter::once(verb.to_vec())
            .chain(channels.iter().map(|c| format!("{}{c}", self.prefix).into_bytes()))
            .collect()
    }
}

impl Writer for RedisWriter {
    fn subscribe(&mut self, channels: &[String]) {
        let args = self.names(b"SUBSCRIBE", channels);
        command(&mut self.sub_out, &args.iter().map(Vec::as_slice).collect::<Vec<_>>());
    }

    fn unsubscribe(&mut self, channels: &[String]) {
        let args = self.names(b"UNSUBSCRIBE", channels);
        command(&mut self.sub_out, &args.iter().map(Vec::as_slice).collect::<Vec<_>>());
    }

    fn publish(&mut self, channel: &str, data: &[u8]) {
        let name = format!("{}{channel}", self.prefix);
        command(&mut self.cmd_out, &[b"PUBLISH", name.as_bytes(), data]);
    }

    fn probe(&mut self) {
        command(&mut self.cmd_out, &[b"PING"]);
        // Keeps the subscriber connection's path warm; its answer is not tracked.
        command(&mut self.sub_out, &[b"PING"]);
    }

    fn has_pending(&self) -> bool {
        !self.sub_out.is_empty() || !self.cmd_out.is_empty()
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        while self.sub_out.has_remaining() {
            self.sub.write_buf(&mut self.sub_out).await?;
        }
        while self.cmd_out.has_remaining() {
            self.cmd.write_buf(&mut self.cmd_out).await?;
        }
        Ok(())
    }
}

impl RedisReader {
    fn subscriber_reply(&self, reply: Resp) -> std::io::Result<Incoming> {
        let Resp::Array(Some(items)) = reply else {
            return match reply {
                Resp::Error(e) => Err(bad(format!("redis: {}", String::from_utf8_lossy(&e)))),
                _ => Ok(Incoming::Nothing),
            };
        };
        match &items[..] {
            [Resp::Bulk(Some(kind)), Resp::Bulk(Some(ch)), Resp::Bulk(Some(data))] if &kind[..] == b"message" => {
                let Some(local) = ch.strip_prefix(self.prefix.as_bytes()) else { return Ok(Incoming::Nothing) };
                Ok(Incoming::Message(Message { channel: Bytes::copy_from_slice(local), data: data.clone() }))
            }
            _ => Ok(Incoming::Nothing), // subscribe/unsubscribe confirmations, pong
        }
    }
}

impl Reader for RedisReader {
    async fn next(&mut self) -> std::io::Result<Incoming> {
        loop {
            if let Some(reply) = parse(&mut self.sub_buf)? {
                return self.subscriber_reply(reply);
            }
            if let Some(reply) = parse(&mut self.cmd_buf)? {
                return match reply {
                    Resp::Int(_) | Resp::Simple(_) => Ok(Incoming::Ack),
                    Resp::Error(e) => Err(bad(format!("redis: {}", String::from_utf8_lossy(&e)))),
                    other => Err(bad(format!("redis: unexpected reply {other:?}"))),
                };
            }
            let n = tokio::select! {
                r = self.sub.read_buf(&mut self.sub_buf) => r?,
                r = self.cmd.read_buf(&mut self.cmd_buf) => r?,
            };
            if n == 0 {
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
        let u = RedisUrl::parse("redis://127.0.0.1:6379").unwrap();
        assert_eq!((u.addr.as_str(), u.password, u.db), ("127.0.0.1:6379", None, 0));
        let u = RedisUrl::parse("redis://:pw@h:1/3").unwrap();
        assert_eq!((u.username, u.password.as_deref(), u.db), (None, Some("pw"), 3));
        let u = RedisUrl::parse("redis://me:pw@h:1").unwrap();
        assert_eq!(u.username.as_deref(), Some("me"));
        assert!(RedisUrl::parse("redis://h").is_err());
        assert!(RedisUrl::parse("redis://h:1/x").is_err());
    }

    #[test]
    fn replies() {
        let mut b =
            BytesMut::from(&b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n:5\r\n+PONG\r\n$-1\r\n*2\r\n$1\r\n"[..]);
        let msg = Resp::Array(Some(vec![
            Resp::Bulk(Some(Bytes::from_static(b"message"))),
            Resp::Bulk(Some(Bytes::from_static(b"c"))),
            Resp::Bulk(Some(Bytes::from_static(b"hi"))),
        ]));
        assert_eq!(parse(&mut b).unwrap(), Some(msg));
        assert_eq!(parse(&mut b).unwrap(), Some(Resp::Int(5)));
        assert_eq!(parse(&mut b).unwrap(), Some(Resp::Simple(Bytes::from_static(b"PONG"))));
        assert_eq!(parse(&mut b).unwrap(), Some(Resp::Bulk(None)));
        assert_eq!(parse(&mut b).unwrap(), None, "incomplete array waits");
        assert!(parse(&mut BytesMut::from(&b"?x\r\n"[..])).is_err());
        assert!(parse(&mut BytesMut::from(&b"$99999999999\r\n"[..])).is_err());
    }
}
