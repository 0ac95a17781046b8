//! The publishers' side: HTTP requests to the publisher API (the seed's GET, or a signed Pusher
//! `POST /apps/ID/events`), and the content of each push (`SEQ:SENT_US:TARGET`, padded to
//! `--size`).

use super::*;

/// A keep-alive HTTP/1.1 client for one publisher (it connects again after an answer that says
/// `Connection: close`, as Sockudo's HTTP API does to every request).
pub(crate) struct Http {
    pub(crate) stream: Stream,
    pub(crate) host: String,
    pub(crate) buf: BytesMut,
    tls: Option<TlsConnector>,
    closed: bool,
}

impl Http {
    pub(crate) async fn open(host: &str, tls: Option<&TlsConnector>) -> anyhow::Result<Http> {
        let stream = Http::connect(host, tls).await?;
        let buf = BytesMut::with_capacity(1024);
        Ok(Http { stream, host: host.to_owned(), buf, tls: tls.cloned(), closed: false })
    }

    async fn connect(host: &str, tls: Option<&TlsConnector>) -> anyhow::Result<Stream> {
        let tcp = TcpStream::connect(host).await.with_context(|| format!("publisher {host}"))?;
        tcp.set_nodelay(true)?;
        Stream::over(tcp, host, tls).await.with_context(|| format!("publisher {host}"))
    }

    /// Write a request, on a new connection if the last answer closed the old one.
    async fn send(&mut self, req: &[u8]) -> anyhow::Result<()> {
        if self.closed {
            self.stream = Http::connect(&self.host, self.tls.as_ref()).await?;
            self.buf.clear();
            self.closed = false;
        }
        Ok(self.stream.write_all(req).await?)
    }

    /// GET `target`; returns the status.
    pub(crate) async fn get(&mut self, target: &str) -> anyhow::Result<u16> {
        Ok(self.get_body(target).await?.0)
    }

    /// GET `target`: the status and the body.
    pub(crate) async fn get_body(&mut self, target: &str) -> anyhow::Result<(u16, BytesMut)> {
        let req = format!("GET {target} HTTP/1.1\r\nHost: {}\r\n\r\n", self.host);
        self.send(req.as_bytes()).await?;
        self.answer().await
    }

    /// POST JSON `body` to `target`; returns the status.
    pub(crate) async fn post(&mut self, target: &str, body: &str) -> anyhow::Result<u16> {
        let req = format!(
            "POST {target} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.send(req.as_bytes()).await?;
        Ok(self.answer().await?.0)
    }

    /// The status and body of the answer to the request just sent.
    async fn answer(&mut self) -> anyhow::Result<(u16, BytesMut)> {
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..i]).to_ascii_lowercase();
                let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                self.closed = head.lines().any(|l| l.starts_with("connection:") && l.contains("close"));
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

/// One publish: the seed's query string, or a Pusher request's signed target and body.
pub(crate) enum Target {
    Get(String),
    Pusher((String, String)),
    /// A client event, sent on a sender connection.
    Client(String),
}

/// A Pusher app (`--app ID:KEY:SECRET`), to sign HTTP API requests.
#[derive(Debug, Clone)]
pub(crate) struct PusherApp {
    pub(crate) id: String,
    pub(crate) key: String,
    secret: String,
}

impl PusherApp {
    pub(crate) fn parse(s: &str) -> anyhow::Result<PusherApp> {
        let mut parts = s.splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(id), Some(key), Some(secret)) => {
                Ok(PusherApp { id: id.into(), key: key.into(), secret: secret.into() })
            }
            _ => bail!("--app is ID:KEY:SECRET"),
        }
    }

    /// The signed target and JSON body of an event `data` on `channel`
    /// (`POST /apps/ID/events`, auth_version 1.0).
    pub(crate) fn event(&self, channel: &str, data: &str, now_s: u64) -> (String, String) {
        let body = serde_json::json!({ "name": "e", "channel": channel, "data": data }).to_string();
        let path = format!("/apps/{}/events", self.id);
        let query =
            format!("auth_key={}&auth_timestamp={now_s}&auth_version=1.0&body_md5={}", self.key, md5_hex(&body));
        let signature = self.sign(&format!("POST\n{path}\n{query}"));
        (format!("{path}?{query}&auth_signature={signature}"), body)
    }

    /// The `auth` of a subscription of `socket_id` to private channel `channel`.
    pub(crate) fn auth(&self, socket_id: &str, channel: &str) -> String {
        format!("{}:{}", self.key, self.sign(&format!("{socket_id}:{channel}")))
    }

    fn sign(&self, string: &str) -> String {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(self.secret.as_bytes()).expect("any key length");
        mac.update(string.as_bytes());
        hex(&mac.finalize().into_bytes())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn md5_hex(body: &str) -> String {
    use md5::Digest;
    hex(&md5::Md5::digest(body.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pusher_signature_of_the_documented_request() {
        // Pusher's HTTP API documentation: this body's digest, and the signature of this string.
        let app = PusherApp::parse("3:278d425bdf160c739803:7ad3773142a6692b25b8").unwrap();
        let body = r#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        assert_eq!(md5_hex(body), "ec365a775a4cd0599faeb73354201b6f");
        let string = "POST\n/apps/3/events\nauth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0&body_md5=ec365a775a4cd0599faeb73354201b6f";
        assert_eq!(app.sign(string), "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c");
        let (target, _) = app.event("c", "d", 1);
        assert!(target
            .starts_with("/apps/3/events?auth_key=278d425bdf160c739803&auth_timestamp=1&auth_version=1.0&body_md5="));
    }
}
