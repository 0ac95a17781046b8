//! Clients that come back and recover what they missed (`--recoverers N`): before the clients
//! connect, `--backlog M` broadcasts are published and the position before them noted; halfway
//! through the run the recoverers connect at once with `format=json&recover=broadcast:EPOCH:OFFSET`
//! and read until their `recovered` notice, while the other clients' deliveries are measured as
//! usual. The nodes must keep at least M messages of history (`HISTORY_SIZE` in scripts/bench).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

use super::client::{client_frame, connect_one, frame};
use super::publish::Http;

/// Where the recoverers say they were: the last message before the backlog.
#[derive(Clone)]
pub struct Since {
    epoch: String,
    offset: u64,
}

/// Publish one marker and `n` broadcasts through `publisher`; the marker's position.
pub async fn backlog(publisher: &str, tls: Option<&TlsConnector>, key: &str, n: usize) -> anyhow::Result<Since> {
    let mut http = Http::open(publisher, tls).await?;
    if http.get(&format!("/?content=before-backlog{key}")).await? != 200 {
        bail!("publisher refused the backlog's first publish");
    }
    let (status, body) = http.get_body(&format!("/history?channel=broadcast&limit=1{key}")).await?;
    if status != 200 {
        bail!("/history answered {status}: the nodes keep no history (set HISTORY_SIZE)");
    }
    let page: serde_json::Value = serde_json::from_slice(&body).context("/history answer")?;
    let since = Since {
        epoch: page["epoch"].as_str().context("epoch")?.to_owned(),
        offset: page["offset"].as_u64().context("offset")?,
    };
    for _ in 0..n {
        if http.get(&format!("/?content=backlog{key}")).await? != 200 {
            bail!("publisher refused a backlog publish");
        }
    }
    Ok(since)
}

/// Connect to `gateway` asking to recover `broadcast` from `since`, and read until the notice:
/// how long that took from the connect, and how many messages came before it.
pub async fn recover(
    gateway: &str,
    tls: Option<&TlsConnector>,
    since: &Since,
    source: u8,
) -> anyhow::Result<(Duration, u64)> {
    let started = Instant::now();
    let path = format!("/?format=json&recover=broadcast:{}:{}", since.epoch, since.offset);
    let mut c = connect_one(gateway, &path, source, false, tls, None).await?;
    let mut messages = 0;
    loop {
        while let Some((op, payload)) = frame(&mut c.buf)? {
            match op {
                0x9 => c.stream.write_all(&client_frame(0xA, &payload)).await?,
                0x8 => bail!("closed by the gateway after {messages} messages"),
                0x1 => {
                    let text = std::str::from_utf8(&payload).unwrap_or_default();
                    if text.contains("\"recovered\":true") {
                        return Ok((started.elapsed(), messages));
                    }
                    if text.contains("\"recovered\":false") {
                        bail!("recovery refused: {text}");
                    }
                    messages += 1;
                }
                _ => {}
            }
        }
        if c.stream.read_buf(&mut c.buf).await? == 0 {
            bail!("connection closed after {messages} messages");
        }
    }
}
