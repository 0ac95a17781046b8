//! HTTP serving shared by the gateway, the publisher and the channel server's metrics endpoint:
//! an accept loop over hyper's HTTP/1 with a header timeout, a cap on connections (one over it is
//! answered 503 and closed), upgrades allowed, optional TLS (see [`crate::tls`]), and graceful
//! shutdown (requests in flight finish, idle keep-alive connections close, all within a deadline).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::LogEvery;
use crate::tls::Tls;

/// Warnings about connections over the cap: at most one line per interval.
static BUSY_LOG: LogEvery = LogEvery::new(Duration::from_secs(10));

/// How long a client may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for requests in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The response type of most handlers: a whole body.
pub type Reply = Response<Full<Bytes>>;

/// A response body streamed from a bounded channel until its sender goes (an event stream).
pub struct Streamed(pub tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Streamed {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|chunk| chunk.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// A response with a body and a content type.
pub fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    reply(status, "text/plain; charset=utf-8", body)
}

/// `/healthz` of a node whose work needs its broker: 200 while the link is up, 503 otherwise.
pub fn health(broker_up: bool) -> Reply {
    match broker_up {
        true => text(StatusCode::OK, "ok\n"),
        false => text(StatusCode::SERVICE_UNAVAILABLE, "broker unreachable\n"),
    }
}

/// `/metrics` of a node on a broker (`(connected, reconnects)`), serving `tls` if any: the
/// process's counters, the link's state, the certificate's expiry and the node's own `gauges`.
pub fn metrics(broker: (bool, u64), tls: Option<&crate::tls::Tls>, gauges: &[(&str, &str, u64)]) -> Reply {
    let mut all = gauges.to_vec();
    all.extend([
        ("broker_connected", "1 when the broker link is up", broker.0 as u64),
        ("broker_reconnects", "broker link re-establishments", broker.1),
        crate::tls::expiry_metric(tls),
    ]);
    reply(StatusCode::OK, "text/plain; version=0.0.4", crate::metrics::render(&all))
}

/// What a response body may be: whole ([`Reply`]) or [`Streamed`], or either of them.
pub trait Body:
    hyper::body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + 'static
{
}
impl<B> Body for B where
    B: hyper::body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + 'static
{
}

/// A connection's place under the cap, in each of its requests' extensions: a handler that turns
/// the connection into a long-lived stream gives it back ([`Slot::release`]), as an upgrade does.
#[derive(Clone)]
pub struct Slot(Arc<std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>>);

impl Slot {
    /// Stop counting the connection of `req` towards the cap.
    pub fn release<T>(req: &Request<T>) {
        if let Some(Slot(s)) = req.extensions().get::<Slot>() {
            crate::io::lock(s).take();
        }
    }
}

/// The answer to a connection over the cap, written without the HTTP stack.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 26\r\n\
Retry-After: 5\r\nConnection: close\r\n\r\ntoo many open connections\n";

/// Serve `handler` on `listener` (over TLS when `tls` is given: each new connection gets the
/// current certificate), at most `max_connections` at once, until `shutdown` resolves, then let
/// connections finish.
pub async fn serve<H, F, B>(
    what: &'static str,
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    max_connections: usize,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body,
{
    let intercept = |s| std::future::ready(Some(s));
    serve_with(what, listener, tls, max_connections, handler, intercept, shutdown).await
}

/// [`serve`], with `intercept` offered each new connection first: it takes the connection
/// (`None`) or hands it on to HTTP (`Some`). A connection counts towards the cap until it is
/// intercepted, upgraded, released ([`Slot::release`]) or closed.
pub async fn serve_with<H, F, B, I, IF>(
    what: &'static str,
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    max_connections: usize,
    handler: H,
    intercept: I,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body,
    I: Fn(TcpStream) -> IF + Clone + Send + Sync + 'static,
    IF: Future<Output = Option<TcpStream>> + Send + 'static,
{
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(listen = %addr, "{what} listening");
    let (stop, tasks) = (tokio_util::sync::CancellationToken::new(), tokio_util::task::TaskTracker::new());
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(max_connections));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors and the like: say so and back off instead of spinning.
                    crate::io::log_accept_error(what, &e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Some(held) = BUSY_LOG.ready() {
                tracing::warn!(max_connections, similar_since_last = held, "{what}: connection refused: too many open");
            }
            let _ = stream.try_write(BUSY);
            continue;
        };
        let (handler, intercept, stopped, tls) = (handler.clone(), intercept.clone(), stop.clone(), tls.clone());
        tasks.spawn(async move {
            let slot = Slot(Arc::new(std::sync::Mutex::new(Some(slot))));
            let Some(stream) = intercept(stream).await else { return };
            let Some(tls) = tls else { return connection(what, TokioIo::new(stream), handler, slot, stopped).await };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => connection(what, TokioIo::new(s), handler, slot, stopped).await,
                Ok(Err(e)) => tracing::debug!("{what}: TLS handshake failed: {e}"),
                Err(_) => tracing::debug!("{what}: TLS handshake timed out"),
            }
        });
    }
    stop.cancel();
    tasks.close();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait()).await;
}

/// Serve HTTP/1 requests on one connection until it ends, or `stopped` (then gracefully).
async fn connection<IO, H, F, B>(
    what: &str,
    io: IO,
    handler: H,
    slot: Slot,
    stopped: tokio_util::sync::CancellationToken,
) where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body,
{
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(slot.clone());
        let f = handler(req);
        async move { Ok::<_, std::convert::Infallible>(f.await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r { tracing::debug!("{what}: connection: {e}") },
        () = stopped.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        }
    }
}
