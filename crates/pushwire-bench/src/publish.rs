//! The publishers' side: HTTP requests to the publisher API, and the content of each push
//! (`SEQ:SENT_US:TARGET`, padded to `--size`).

use super::*;

/// A keep-alive HTTP/1.1 client for one publisher.
pub(crate) struct Http {
    pub(crate) stream: Stream,
    pub(crate) host: String,
    pub(crate) buf: BytesMut,
}

impl Http {
    pub(crate) async fn open(host: &str, tls: Option<&TlsConnector>) -> anyhow::Result<Http> {
        let tcp = TcpStream::connect(host).await.with_context(|| format!("publisher {host}"))?;
        tcp.set_nodelay(true)?;
        let stream = Stream::over(tcp, host, tls).await.with_context(|| format!("publisher {host}"))?;
        Ok(Http { stream, host: host.to_owned(), buf: BytesMut::with_capacity(1024) })
    }

    /// GET `target`; returns the status.
    pub(crate) async fn get(&mut self, target: &str) -> anyhow::Result<u16> {
        Ok(self.get_body(target).await?.0)
    }

    /// GET `target`: the status and the body.
    pub(crate) async fn get_body(&mut self, target: &str) -> anyhow::Result<(u16, BytesMut)> {
        let req = format!("GET {target} HTTP/1.1\r\nHost: {}\r\n\r\n", self.host);
        self.stream.write_all(req.as_bytes()).await?;
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..i]).to_ascii_lowercase();
                let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while self.buf.len() < i + 4 + len {
                    if self.stream.read_buf(&mut self.buf).await? == 0 {
                        bail!("publisher closed the connection");
                    }
                }
                self.buf.advance(i + 4);
                return Ok((status, self.buf.split_to(len)));
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                bail!("publisher closed the connection");
            }
        }
    }
}

/// `s` percent-encoded for a query string (all but unreserved characters).
pub(crate) fn form(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

pub(crate) fn content(seq: u64, sent_us: u64, target: &str, size: usize, payload: Payload) -> String {
    let mut c = format!("{seq}:{sent_us}:{target}:");
    let prefix = c.len();
    let mut i = 0u64;
    while c.len() < size {
        match payload {
            Payload::X => c.push('x'),
            Payload::Json => {
                i += 1;
                let n = seq.wrapping_mul(31).wrapping_add(i * 7919);
                c.push_str(&format!(
                    "{{\"id\":{n},\"user\":\"user-{}\",\"score\":{},\"ok\":true}},",
                    n % 9973,
                    n % 1000
                ));
            }
        }
    }
    c.truncate(size.max(prefix));
    c
}
