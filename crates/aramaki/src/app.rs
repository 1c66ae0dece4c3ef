//! The running server: the HTTP listener and the timeline's subscribers.
//! `App::build` binds (port 0 in tests) so the address is known before
//! `run`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::context::Context;
use crate::timeline::subscribers::{self, LiveTail, Subscriber};

pub struct App {
    ctx: Arc<Context>,
    listener: TcpListener,
    addr: SocketAddr,
    /// The TLS listener for peers (`federation.listen`), bound with the
    /// main one so that a taken port fails the start.
    peers: Option<TcpListener>,
}

/// Stops a running [`App`] when dropped or told to.
#[derive(Clone)]
pub struct Shutdown(watch::Sender<bool>);

impl Shutdown {
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}

impl App {
    pub async fn build(ctx: Arc<Context>, listen: SocketAddr) -> std::io::Result<App> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let peers = match &ctx.config.federation.listen {
            Some(at) => Some(TcpListener::bind(at).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("federation.listen {at}: {e}"))
            })?),
            None => None,
        };
        Ok(App {
            ctx,
            listener,
            addr,
            peers,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn context(&self) -> Arc<Context> {
        self.ctx.clone()
    }

    /// Serves until `stop` turns true.
    pub async fn run(self, stop: watch::Receiver<bool>) -> std::io::Result<()> {
        let subs: Vec<Arc<dyn Subscriber>> = vec![
            Arc::new(LiveTail),
            Arc::new(crate::federation::uses::FederationOut),
        ];
        for sub in subs {
            tokio::spawn(subscribers::run(self.ctx.clone(), sub, stop.clone()));
        }
        crate::timeline::batch::Appender::spawn(self.ctx.clone(), stop.clone());
        crate::monitoring::ingest::Ingest::spawn(self.ctx.clone(), stop.clone());
        crate::monitoring::watch::spawn(self.ctx.clone(), stop.clone());
        crate::federation::link::spawn(self.ctx.clone(), stop.clone());
        let (ctx, mut stop_streams) = (self.ctx.clone(), stop.clone());
        tokio::spawn(async move {
            while !*stop_streams.borrow() {
                if stop_streams.changed().await.is_err() {
                    return;
                }
            }
            ctx.timeline.close();
        });
        let router = crate::web::app(self.ctx.clone());
        // One budget of connections for both listeners: they share the
        // process's file descriptors.
        let limit = connection_limit(&self.ctx);
        let web = &self.ctx.config.web;
        let long = web
            .max_long_lived_connections
            .unwrap_or(limit / 4 * 3)
            .clamp(1, limit.max(1));
        let slots = Arc::new(Slots::new(limit, long, web.max_long_lived_per_source));
        if let Some(tcp) = self.peers {
            serve_peers(
                self.ctx.clone(),
                tcp,
                router.clone(),
                slots.clone(),
                stop.clone(),
            )?;
        }
        serve(self.ctx.clone(), self.listener, router, slots, stop).await
    }

    /// Runs in the background; returns the address and a stop handle.
    pub fn spawn(
        self,
    ) -> (
        SocketAddr,
        Shutdown,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let (tx, rx) = watch::channel(false);
        let addr = self.addr;
        let handle = tokio::spawn(self.run(rx));
        (addr, Shutdown(tx), handle)
    }
}

/// The federation listener: the same routes, over TLS with a certificate
/// of the instance key, for peers that pin it.
fn serve_peers(
    ctx: Arc<Context>,
    tcp: TcpListener,
    router: axum::Router,
    slots: Arc<Slots>,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listen = tcp.local_addr()?.to_string();
    let config = crate::federation::tls::server_config(ctx.identity.clone())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    tracing::info!(%listen, "federation listener (TLS with the instance key)");
    let listener = crate::federation::tls::Listener::new(tcp, config);
    tokio::spawn(async move {
        if let Err(e) = serve(ctx, listener, router, slots, stop).await {
            tracing::error!(error = %e, "the federation listener stopped");
        }
    });
    Ok(())
}

/// Serves HTTP/1.1 on `listener` until `stop` turns true, then lets the
/// open requests finish. Each connection must send a request head within
/// `web.header_read_timeout_secs` (the body deadline is `web::app`'s);
/// at most `web.max_connections` are open at once — at the limit the
/// oldest connection with no request in flight is closed to make room,
/// and if every one is busy the new one is refused. A connection that
/// upgrades (an agent's or a peer's WebSocket) stays counted, and busy,
/// until it closes: an anonymous client cannot open sockets without bound
/// by asking for upgrades.
async fn serve<L>(
    ctx: Arc<Context>,
    mut listener: L,
    router: axum::Router,
    slots: Arc<Slots>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let header_timeout = Duration::from_secs(ctx.config.web.header_read_timeout_secs);
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped(&mut stop) => break,
        };
        // Reap finished connection tasks so the set does not grow.
        while tasks.try_join_next().is_some() {}
        let Some(slot) = slots.take(&ctx, peer.ip()) else {
            ctx.metrics.connection_refused(false);
            drop(io);
            continue;
        };
        let service = Tracked {
            inner: hyper_util::service::TowerToHyperService::new(router.clone()),
            slot: slot.clone(),
            peer,
        };
        // The slot is released when the socket closes: after the last
        // response, or, for a WebSocket, when the session ends.
        let io = Counted {
            io,
            slot: slot.clone(),
            ctx: ctx.clone(),
        };
        let (ctx, mut stop) = (ctx.clone(), stop.clone());
        tasks.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder
                .serve_connection(hyper_util::rt::TokioIo::new(io), service)
                .with_upgrades();
            tokio::pin!(conn);
            let done = tokio::select! {
                done = conn.as_mut() => Some(done),
                _ = slot.evict.notified() => None,
                _ = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    Some(conn.as_mut().await)
                }
            };
            if let Some(Err(e)) = done {
                if e.is_timeout() {
                    ctx.metrics.timeout(false);
                } else {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Resolves once `stop` is true (never, if its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// `web.max_connections`, lowered if the process may not open that many
/// files besides the database's and its own: the limit must refuse a
/// connection before `accept` runs out of descriptors.
fn connection_limit(ctx: &Context) -> usize {
    raise_open_files_limit();
    let configured = ctx.config.web.max_connections;
    let reserved = 64 + usize::try_from(ctx.config.database.max_connections).unwrap_or(64) * 2;
    let Some(files) = open_files_limit() else {
        return configured;
    };
    let room = files.saturating_sub(reserved).max(1);
    if room < configured {
        tracing::warn!(
            configured,
            used = room,
            open_files = files,
            "web.max_connections is more than the open-file limit allows; using less"
        );
        room
    } else {
        configured
    }
}

/// The most the soft limit on open files is raised to.
const MAX_OPEN_FILES: libc::rlim_t = 1 << 20;

/// Raises the soft limit on open files to the hard limit (at most
/// [`MAX_OPEN_FILES`]): many systems start services with a soft limit of
/// 1024, which would cut the connection budget far below what the hard
/// limit allows.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct passed, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let target = limit.rlim_max.min(MAX_OPEN_FILES);
    if limit.rlim_cur >= target {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: target,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit only reads the struct passed, which we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        tracing::warn!(
            soft = limit.rlim_cur,
            hard = limit.rlim_max,
            "could not raise the open-file limit"
        );
    }
}

/// The soft limit on open files (Linux: /proc/self/limits), if finite.
fn open_files_limit() -> Option<usize> {
    open_files_in(&std::fs::read_to_string("/proc/self/limits").ok()?)
}

fn open_files_in(limits: &str) -> Option<usize> {
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The open connections of the process's listeners, oldest first.
struct Slots {
    limit: usize,
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<Slot>>>,
    /// Long-lived connections (WebSockets, event streams) are never closed
    /// for a newcomer, so they have a smaller budget of their own, in all
    /// and per source: filling it leaves room for ordinary requests.
    long_limit: usize,
    long_per_source: usize,
    long: Mutex<LongLived>,
}

#[derive(Default)]
struct LongLived {
    total: usize,
    by_source: std::collections::HashMap<std::net::IpAddr, usize>,
}

/// The source a peer counts as: IPv4 (also IPv4-mapped) as itself, IPv6 by
/// its /64, which one host can fill with addresses of its own.
fn source_of(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip.to_canonical() {
        std::net::IpAddr::V6(v6) => {
            std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1)).into()
        }
        v4 => v4,
    }
}

struct Slot {
    id: u64,
    slots: std::sync::Weak<Slots>,
    /// Requests in flight on this connection (until their response ends).
    busy: AtomicUsize,
    /// Upgraded to a WebSocket: in use until it closes.
    upgraded: std::sync::atomic::AtomicBool,
    /// Counted as long-lived, against `source`, until it closes.
    long: std::sync::atomic::AtomicBool,
    source: std::net::IpAddr,
    evict: tokio::sync::Notify,
}

impl Slots {
    fn new(limit: usize, long_limit: usize, long_per_source: usize) -> Slots {
        Slots {
            limit,
            next: AtomicU64::new(0),
            open: Mutex::new(BTreeMap::new()),
            long_limit,
            long_per_source,
            long: Mutex::new(LongLived::default()),
        }
    }

    /// A slot for a new connection, closing the oldest idle one at the limit.
    fn take(self: &Arc<Self>, ctx: &Context, peer: std::net::IpAddr) -> Option<Arc<Slot>> {
        let mut open = self.open.lock().ok()?;
        if open.len() >= self.limit {
            let idle = open
                .values()
                .find(|s| s.busy.load(Ordering::SeqCst) == 0 && !s.upgraded.load(Ordering::SeqCst))
                .map(|s| s.id)?;
            if let Some(old) = open.remove(&idle) {
                old.evict.notify_one();
                ctx.metrics.connection_refused(true);
                ctx.metrics.connection_closed();
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot {
            id,
            slots: Arc::downgrade(self),
            busy: AtomicUsize::new(0),
            upgraded: std::sync::atomic::AtomicBool::new(false),
            long: std::sync::atomic::AtomicBool::new(false),
            source: source_of(peer),
            evict: tokio::sync::Notify::new(),
        });
        open.insert(id, slot.clone());
        ctx.metrics.connection_opened();
        Some(slot)
    }
}

impl Slot {
    /// Counts this connection as long-lived, if its source and the budget
    /// have room; false if it must be refused.
    fn admit_long(&self) -> bool {
        if self.long.load(Ordering::SeqCst) {
            return true;
        }
        let Some(slots) = self.slots.upgrade() else {
            return false;
        };
        let Ok(mut long) = slots.long.lock() else {
            return false;
        };
        let here = long.by_source.get(&self.source).copied().unwrap_or(0);
        if long.total >= slots.long_limit || here >= slots.long_per_source {
            return false;
        }
        long.total += 1;
        long.by_source.insert(self.source, here + 1);
        self.long.store(true, Ordering::SeqCst);
        true
    }

    fn release(&self, ctx: &Context) {
        if let Some(slots) = self.slots.upgrade() {
            if self.long.swap(false, Ordering::SeqCst) {
                if let Ok(mut long) = slots.long.lock() {
                    long.total = long.total.saturating_sub(1);
                    if let Some(n) = long.by_source.get_mut(&self.source) {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            long.by_source.remove(&self.source);
                        }
                    }
                }
            }
            if let Ok(mut open) = slots.open.lock() {
                if open.remove(&self.id).is_some() {
                    ctx.metrics.connection_closed();
                }
            }
        }
    }
}

/// Marks a connection busy from a request's arrival until its response
/// body has been sent (or dropped).
struct Busy(Arc<Slot>);

impl Busy {
    fn new(slot: Arc<Slot>) -> Busy {
        slot.busy.fetch_add(1, Ordering::SeqCst);
        Busy(slot)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The router as a hyper service that keeps its connection's slot busy.
struct Tracked<S> {
    inner: S,
    slot: Arc<Slot>,
    /// The peer address, for login throttling per source.
    peer: SocketAddr,
}

impl<S> hyper::service::Service<hyper::Request<hyper::body::Incoming>> for Tracked<S>
where
    S: hyper::service::Service<
        hyper::Request<hyper::body::Incoming>,
        Response = axum::response::Response,
        Error = std::convert::Infallible,
    >,
    S::Future: Send + 'static,
{
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn call(&self, mut req: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(self.peer));
        let busy = Busy::new(self.slot.clone());
        let slot = self.slot.clone();
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            let upgrade = response.status() == axum::http::StatusCode::SWITCHING_PROTOCOLS;
            let stream = response
                .headers()
                .get(axum::http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/event-stream"));
            if (upgrade || stream) && !slot.admit_long() {
                // Dropping the 101 or the stream ends the session before it starts.
                let mut refused = axum::response::IntoResponse::into_response(crate::web::Problem::new(
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "busy",
                    "too many WebSockets and event streams are open, from this source or in all; try again later",
                ));
                refused.headers_mut().insert(
                    axum::http::header::CONNECTION,
                    axum::http::HeaderValue::from_static("close"),
                );
                return Ok(refused);
            }
            if upgrade {
                slot.upgraded.store(true, Ordering::SeqCst);
            }
            Ok(response.map(|body| axum::body::Body::new(BusyBody { body, _busy: busy })))
        })
    }
}

/// A response body that holds its connection busy until it is done.
struct BusyBody {
    body: axum::body::Body,
    _busy: Busy,
}

impl http_body::Body for BusyBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A connection's socket, which gives its slot back when it is closed.
struct Counted<I> {
    io: I,
    slot: Arc<Slot>,
    ctx: Arc<Context>,
}

impl<I> Drop for Counted<I> {
    fn drop(&mut self) {
        self.slot.release(&self.ctx);
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::open_files_in;

    fn soft_and_hard() -> (libc::rlim_t, libc::rlim_t) {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into a struct we own.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        (limit.rlim_cur, limit.rlim_max)
    }

    #[test]
    fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
        let (soft, hard) = soft_and_hard();
        // One below what it is now: nothing else in the process notices.
        let lower = libc::rlimit {
            rlim_cur: soft.min(super::MAX_OPEN_FILES) - 1,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads a struct we own.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lower) }, 0);
        super::raise_open_files_limit();
        assert_eq!(soft_and_hard(), (hard.min(super::MAX_OPEN_FILES), hard));
    }

    #[test]
    fn the_open_file_limit_is_read_from_proc() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax processes             63371                63371                processes\nMax open files            1024                 524288               files\n";
        assert_eq!(open_files_in(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(open_files_in(unlimited), None);
        assert_eq!(open_files_in(""), None);
    }
}
