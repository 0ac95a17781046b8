//! `pushwire status`: the live gateways as a publisher sees them (its `GET /cluster`), as a table.

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;

use crate::cluster::Heartbeat;

/// Ask the publisher at `base` (e.g. `http://127.0.0.1:4237`) and render its answer.
pub async fn status(base: &hyper::Uri, key: Option<&str>) -> anyhow::Result<String> {
    let url: hyper::Uri = format!("{}/cluster", base.to_string().trim_end_matches('/')).parse()?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let mut req = hyper::Request::get(url.clone());
    if let Some(k) = key {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let resp =
        tokio::time::timeout(std::time::Duration::from_secs(10), client.request(req.body(Empty::<Bytes>::new())?))
            .await
            .map_err(|_| anyhow::anyhow!("{url}: no answer within 10s"))??;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        anyhow::bail!("{url}: {status}: {}", String::from_utf8_lossy(&body).trim());
    }
    #[derive(serde::Deserialize)]
    struct Cluster {
        gateways: Vec<Heartbeat>,
    }
    let c: Cluster = serde_json::from_slice(&body)?;
    Ok(render(&c.gateways))
}

/// One line per gateway under a header.
pub fn render(gateways: &[Heartbeat]) -> String {
    let mut out = format!(
        "{:<28} {:>7} {:>11} {:>8} {:>8} {:>10} {:>10} {:>6}\n",
        "NODE", "WORKERS", "CONNECTIONS", "USERS", "TOPICS", "IN/S", "OUT/S", "SLOW"
    );
    for g in gateways {
        out.push_str(&format!(
            "{:<28} {:>7} {:>11} {:>8} {:>8} {:>10.1} {:>10.1} {:>6}\n",
            g.node,
            g.workers,
            g.connections,
            g.users,
            g.topics,
            g.messages_in_per_s,
            g.messages_out_per_s,
            g.slow_consumer_cuts
        ));
    }
    out.push_str(&format!("{} gateway(s) alive\n", gateways.len()));
    out
}
