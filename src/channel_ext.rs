//! pushwire's extension of the Channel protocol, which PHP's server and clients never see: a
//! pushwire node that subscribes to [`POSITIONS`] gets each event with its history offset and
//! epoch (two more keys of the event frame), an answer with the position of each of its
//! publishes, and history pages for the requests it publishes to [`HISTORY`]. The channel server
//! ([`crate::hub`]) and the link ([`crate::broker::link`]) both speak it; this is its wire form.

use bytes::Bytes;

use crate::history::{Page, Position};

/// Subscribing to this name asks for positions (it subscribes to nothing); answers to the
/// client's own publishes and history requests come as events on it.
pub const POSITIONS: &str = "pushwire:positions";
/// A publish here from a client that asked for positions is a history request, answered to it
/// alone (data: `channel`, `since`, `limit`).
pub const HISTORY: &str = "pushwire:history";

/// In the name of a node's private channel of confirmation markers (after any prefix, before a
/// random part): a federated server delivers a node's markers itself, in order with its answers.
pub const ACK: &str = "pushwire:ack:";

/// A history request as a PHP array, for [`HISTORY`].
pub fn encode_history_request(channel: &[u8], since: u64, limit: usize) -> Vec<u8> {
    use channel_proto::Value;
    Value::assoc([
        ("channel", Value::str(channel)),
        ("since", Value::Int(since.min(i64::MAX as u64) as i64)),
        ("limit", Value::Int(limit.min(i64::MAX as usize) as i64)),
    ])
    .encode()
}

/// Read what [`encode_history_request`] wrote: (channel, since, limit).
pub fn decode_history_request(data: &[u8]) -> Option<(Vec<u8>, u64, usize)> {
    let req = channel_proto::Value::parse(data).ok()?;
    let channel = req.get("channel")?.as_bytes()?.to_vec();
    let int = |k: &str| match req.get(k) {
        Some(channel_proto::Value::Int(i)) => Some((*i).max(0) as u64),
        _ => None,
    };
    Some((channel, int("since")?, usize::try_from(int("limit")?).unwrap_or(usize::MAX)))
}

/// A publish's position as a PHP array: `offset`, `epoch`.
pub fn encode_position(p: &Position) -> Vec<u8> {
    use channel_proto::Value;
    Value::assoc([("offset", Value::Int(p.offset as i64)), ("epoch", Value::str(&*p.epoch))]).encode()
}

/// Read what [`encode_position`] wrote.
pub fn decode_position(data: &[u8]) -> Option<Position> {
    let v = channel_proto::Value::parse(data).ok()?;
    let offset = match v.get("offset")? {
        channel_proto::Value::Int(o) if *o > 0 => *o as u64,
        _ => return None,
    };
    let epoch = std::str::from_utf8(v.get("epoch")?.as_bytes()?).ok()?;
    Some(Position { offset, epoch: epoch.into() })
}

/// A history page as a PHP array: `epoch`, `offset`, `first`, and `items`, a list of
/// `[offset, data]` with each message's data spliced in as the serialized value it is.
pub fn encode_page(p: &Page) -> Vec<u8> {
    use channel_proto::value::encode_str;
    let mut out = Vec::with_capacity(64 + p.items.iter().map(|(_, d)| d.len() + 24).sum::<usize>());
    out.extend_from_slice(b"a:4:{");
    encode_str(b"epoch", &mut out);
    encode_str(p.epoch.as_bytes(), &mut out);
    out.extend_from_slice(format!("s:6:\"offset\";i:{};s:5:\"first\";i:{};", p.offset, p.first).as_bytes());
    encode_str(b"items", &mut out);
    out.extend_from_slice(format!("a:{}:{{", p.items.len()).as_bytes());
    for (i, (offset, data)) in p.items.iter().enumerate() {
        out.extend_from_slice(format!("i:{i};a:2:{{i:0;i:{offset};i:1;").as_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(b"}");
    }
    out.extend_from_slice(b"}}");
    out
}

/// Read what [`encode_page`] wrote, keeping each message's bytes as they were.
pub fn decode_page(data: &Bytes) -> Option<Page> {
    use channel_proto::value::{array_spans, Key};
    use channel_proto::Value;
    let mut page = Page::default();
    for (k, range, v) in array_spans(data).ok()? {
        match (k, v) {
            (Key::Str(k), Value::Str(e)) if k == b"epoch" => page.epoch = String::from_utf8(e).ok()?,
            (Key::Str(k), Value::Int(o)) if k == b"offset" => page.offset = o.max(0) as u64,
            (Key::Str(k), Value::Int(f)) if k == b"first" => page.first = f.max(0) as u64,
            (Key::Str(k), Value::Array(_)) if k == b"items" => {
                let items = data.slice(range);
                for (_, r, _) in array_spans(&items).ok()? {
                    let item = items.slice(r);
                    let mut parts = array_spans(&item).ok()?.into_iter();
                    let offset = match parts.next()?.2 {
                        Value::Int(o) => o.max(0) as u64,
                        _ => return None,
                    };
                    page.items.push((offset, item.slice(parts.next()?.1)));
                }
            }
            _ => {}
        }
    }
    Some(page)
}
