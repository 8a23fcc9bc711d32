//! The connections to instances, kept open between requests. There is one
//! pool per backend and worker thread, so a request only ever uses
//! connections its own thread made and the lock is never contended.
//!
//! HTTP/1.1: idle connections per instance, the most recently used first;
//! an answer gives its connection back when its body has been read to the
//! end (a connection whose answer was not read to the end is closed), and
//! one that switched protocols (101) not at all: it carries the tunnel. A
//! request that a pooled connection could not even start to send (the
//! instance had just closed it) goes on a new one.
//! HTTP/2 (h2c): one multiplexed connection per instance.
//!
//! A request that no connection could take comes back with the error, so
//! that another instance can have it, streamed body and all.
//!
//! Connections idle longer than the idle timeout are closed by a sweeper
//! that runs while the pool holds any.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use fnv::FnvHashMap;
use http::{Request, Response, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::Liveness;
use crate::body::ProxyBody;
use crate::endpoint::Stats;

/// Why a request could not be sent or answered.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PoolError {
    /// No connection to the instance: nothing was sent, and the request
    /// comes back for another instance.
    #[error("{reason}")]
    Connect {
        reason: String,
        request: Box<Request<ProxyBody>>,
    },
    /// The connection failed while the request was sent or answered.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// A meshed instance and the local service calling it.
type MeshKey = (SocketAddr, Arc<str>);

pub(crate) struct Pool {
    http2: bool,
    connect_timeout: Duration,
    liveness: Liveness,
    idle_timeout: Duration,
    idle: Arc<Mutex<Idle>>,
    /// One dial at a time per meshed instance and caller: requests that
    /// find no connection wait for the one being made (a handshake each
    /// would otherwise be made for a burst, and all but one thrown away).
    dialing: Mutex<FnvHashMap<MeshKey, Arc<tokio::sync::Mutex<()>>>>,
}

/// Keyed with FNV: two lookups per request, on addresses from the
/// catalog, where SipHash's defence against chosen keys buys nothing.
#[derive(Default)]
struct Idle {
    http1: FnvHashMap<SocketAddr, Vec<(http1::SendRequest<ProxyBody>, Instant)>>,
    http2: FnvHashMap<SocketAddr, (http2::SendRequest<ProxyBody>, Instant)>,
    /// HTTP/2 over mutual TLS to meshed instances, per calling service.
    mesh: FnvHashMap<MeshKey, (http2::SendRequest<ProxyBody>, Instant)>,
    /// A sweeper task is running.
    sweeping: bool,
}

impl Idle {
    fn is_empty(&self) -> bool {
        self.http1.is_empty() && self.http2.is_empty() && self.mesh.is_empty()
    }

    /// Drops connections closed or idle since before `oldest`.
    fn sweep(&mut self, oldest: Instant) {
        self.http1.retain(|_, list| {
            list.retain(|(sender, since)| *since >= oldest && !sender.is_closed());
            !list.is_empty()
        });
        self.http2
            .retain(|_, (sender, since)| *since >= oldest && !sender.is_closed());
        self.mesh
            .retain(|_, (sender, since)| *since >= oldest && !sender.is_closed());
    }
}

impl Pool {
    /// HTTP/2 with prior knowledge when `http2`, else HTTP/1.1.
    pub(crate) fn new(
        http2: bool,
        connect_timeout: Duration,
        liveness: Liveness,
        idle_timeout: Duration,
    ) -> Pool {
        Pool {
            http2,
            connect_timeout,
            liveness,
            idle_timeout,
            idle: Arc::default(),
            dialing: Mutex::default(),
        }
    }

    /// Sends `req` to `addr` on a pooled connection or a new one; a new
    /// connection closes when `stats` says the instance's host is gone.
    /// The request's URI must be in the form the protocol wants:
    /// origin-form with a `Host` header for HTTP/1.1, absolute for HTTP/2.
    /// With `via`, the instance is meshed: reached over HTTP/2 through its
    /// host's inbound listener, as the calling service.
    pub(crate) async fn request(
        &self,
        addr: SocketAddr,
        stats: &Stats,
        mut req: Request<ProxyBody>,
        via: Option<Via<'_>>,
    ) -> Result<Response<Answer>, PoolError> {
        // The paths that connect are boxed: their futures are large, and
        // this one is moved with every request.
        if let Some(via) = via {
            return Box::pin(self.request_mesh(addr, stats, req, via)).await;
        }
        if self.http2 {
            return Box::pin(self.request_http2(addr, stats, req)).await;
        }
        loop {
            let pooled = crate::lock(&self.idle)
                .http1
                .get_mut(&addr)
                .and_then(Vec::pop);
            let Some((mut sender, since)) = pooled else {
                break;
            };
            if since.elapsed() >= self.idle_timeout || sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(response) => return Ok(self.answer(addr, sender, response)),
                Err(mut error) => match error.take_message() {
                    // Not sent: the instance closed this connection first.
                    Some(back) => req = back,
                    None => return Err(PoolError::Http(error.into_error())),
                },
            }
        }
        Box::pin(self.request_new_http1(addr, stats, req)).await
    }

    async fn request_http2(
        &self,
        addr: SocketAddr,
        stats: &Stats,
        req: Request<ProxyBody>,
    ) -> Result<Response<Answer>, PoolError> {
        let sender = match self.http2_sender(addr, stats).await {
            Ok(sender) => sender,
            Err(reason) => return Err(not_sent(reason, req)),
        };
        send_http2(sender, req).await
    }

    async fn request_mesh(
        &self,
        addr: SocketAddr,
        stats: &Stats,
        req: Request<ProxyBody>,
        via: Via<'_>,
    ) -> Result<Response<Answer>, PoolError> {
        let key = (addr, via.caller.name.clone());
        if let Some(sender) = self.pooled_mesh(&key) {
            return send_http2(sender, req).await;
        }
        let dial = crate::lock(&self.dialing)
            .entry(key.clone())
            .or_default()
            .clone();
        let _dialing = dial.lock().await;
        // Made while this request waited its turn.
        if let Some(sender) = self.pooled_mesh(&key) {
            return send_http2(sender, req).await;
        }
        let dialed = crate::mesh::dial(
            via.hop,
            via.caller,
            false,
            self.connect_timeout,
            self.liveness,
            via.metrics,
        )
        .await;
        let tls = match dialed {
            Ok(tls) => tls,
            Err(reason) => return Err(not_sent(reason, req)),
        };
        let handshake = http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await;
        let (sender, conn) = match handshake {
            Ok(h) => h,
            Err(e) => return Err(not_sent(signpost_core::error_chain(&e), req)),
        };
        run_connection(addr, conn, stats.gone());
        {
            let mut idle = crate::lock(&self.idle);
            idle.mesh
                .insert(key.clone(), (sender.clone(), Instant::now()));
            start_sweeper(&self.idle, &mut idle, self.idle_timeout);
        }
        drop(_dialing);
        drop(dial);
        // Nobody else waiting: the entry goes.
        crate::lock(&self.dialing).retain(|_, lock| Arc::strong_count(lock) > 1);
        send_http2(sender, req).await
    }

    /// The open pooled connection to a meshed instance for its caller.
    fn pooled_mesh(&self, key: &MeshKey) -> Option<http2::SendRequest<ProxyBody>> {
        let mut idle = crate::lock(&self.idle);
        match idle.mesh.get_mut(key) {
            Some((sender, since)) if !sender.is_closed() => {
                *since = Instant::now();
                Some(sender.clone())
            }
            _ => None,
        }
    }

    /// Sends `req` on a new HTTP/1.1 connection, pooled afterwards.
    async fn request_new_http1(
        &self,
        addr: SocketAddr,
        stats: &Stats,
        req: Request<ProxyBody>,
    ) -> Result<Response<Answer>, PoolError> {
        let io = match self.connect(addr).await {
            Ok(io) => io,
            Err(reason) => return Err(not_sent(reason, req)),
        };
        // Flat writes, as to clients (see `http::serve`).
        let (mut sender, conn) = match http1::Builder::new().writev(false).handshake(io).await {
            Ok(handshake) => handshake,
            Err(e) => return Err(not_sent(signpost_core::error_chain(&e), req)),
        };
        // An answer that switches protocols (101) hands the connection
        // over to the proxy's tunnel.
        run_connection(addr, conn.with_upgrades(), stats.gone());
        let response = sender.send_request(req).await?;
        Ok(self.answer(addr, sender, response))
    }

    /// The answer, with what gives its connection back once read (unless
    /// it switched protocols: then the connection is the tunnel's).
    fn answer(
        &self,
        addr: SocketAddr,
        sender: http1::SendRequest<ProxyBody>,
        response: Response<Incoming>,
    ) -> Response<Answer> {
        let checkin = (response.status() != StatusCode::SWITCHING_PROTOCOLS).then(|| Checkin {
            pool: Arc::downgrade(&self.idle),
            idle_timeout: self.idle_timeout,
            addr,
            sender,
        });
        let mut answer = response.map(|body| Answer { body, checkin });
        answer.body_mut().finish_if_read();
        answer
    }

    async fn http2_sender(
        &self,
        addr: SocketAddr,
        stats: &Stats,
    ) -> Result<http2::SendRequest<ProxyBody>, String> {
        {
            let mut idle = crate::lock(&self.idle);
            if let Some((sender, since)) = idle.http2.get_mut(&addr)
                && !sender.is_closed()
            {
                *since = Instant::now();
                return Ok(sender.clone());
            }
        }
        let io = self.connect(addr).await?;
        let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| signpost_core::error_chain(&e))?;
        run_connection(addr, conn, stats.gone());
        let mut idle = crate::lock(&self.idle);
        idle.http2.insert(addr, (sender.clone(), Instant::now()));
        start_sweeper(&self.idle, &mut idle, self.idle_timeout);
        Ok(sender)
    }

    async fn connect(&self, addr: SocketAddr) -> Result<TokioIo<TcpStream>, String> {
        crate::connect(addr, self.connect_timeout, self.liveness)
            .await
            .map(TokioIo::new)
    }
}

/// How a request reaches a meshed instance.
pub(crate) struct Via<'a> {
    pub(crate) hop: &'a crate::mesh::MeshHop,
    pub(crate) caller: &'a crate::mesh::Caller,
    pub(crate) metrics: &'a crate::ProxyMetrics,
}

/// Sends `req` on an HTTP/2 connection.
async fn send_http2(
    mut sender: http2::SendRequest<ProxyBody>,
    req: Request<ProxyBody>,
) -> Result<Response<Answer>, PoolError> {
    match sender.try_send_request(req).await {
        Ok(response) => Ok(response.map(|body| Answer {
            body,
            checkin: None,
        })),
        Err(mut error) => Err(match error.take_message() {
            // The instance closed the connection before the request
            // went out on it (it is going away).
            Some(back) => not_sent(signpost_core::error_chain(error.error()), back),
            None => PoolError::Http(error.into_error()),
        }),
    }
}

/// The error for a request that never went out, which comes back with it.
fn not_sent(reason: String, request: Request<ProxyBody>) -> PoolError {
    PoolError::Connect {
        reason,
        request: Box::new(request),
    }
}

/// Runs a connection to `addr` on its own task until it closes, or until
/// the instance's host is known to be gone (`gone`): then it is dropped,
/// and requests in flight on it fail at once (and may be retried).
fn run_connection<C>(addr: SocketAddr, conn: C, gone: CancellationToken)
where
    C: Future<Output = hyper::Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        tokio::select! {
            ended = conn => if let Err(error) = ended {
                tracing::debug!(%addr, %error, "connection to an instance ended with an error");
            },
            () = gone.cancelled() => {
                tracing::debug!(%addr, "instance's host is gone: connection closed");
            }
        }
    });
}

/// Starts the sweeper of `pool` unless it runs already; it stops when the
/// pool is empty or gone.
fn start_sweeper(pool: &Arc<Mutex<Idle>>, idle: &mut Idle, idle_timeout: Duration) {
    if idle.sweeping {
        return;
    }
    idle.sweeping = true;
    let pool = Arc::downgrade(pool);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(idle_timeout).await;
            let Some(pool) = pool.upgrade() else { return };
            let mut idle = crate::lock(&pool);
            idle.sweep(Instant::now() - idle_timeout);
            if idle.is_empty() {
                idle.sweeping = false;
                return;
            }
        }
    });
}

/// An HTTP/1.1 connection on its way back to its pool.
struct Checkin {
    pool: Weak<Mutex<Idle>>,
    idle_timeout: Duration,
    addr: SocketAddr,
    sender: http1::SendRequest<ProxyBody>,
}

/// An instance's answer body: gives its connection back to the pool once
/// read to the end.
pub(crate) struct Answer {
    body: Incoming,
    checkin: Option<Checkin>,
}

impl Checkin {
    fn give_back(self) {
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        let mut idle = crate::lock(&pool);
        idle.http1
            .entry(self.addr)
            .or_default()
            .push((self.sender, Instant::now()));
        start_sweeper(&pool, &mut idle, self.idle_timeout);
    }
}

impl Answer {
    fn finish_if_read(&mut self) {
        if self.body.is_end_stream()
            && let Some(checkin) = self.checkin.take()
        {
            checkin.give_back();
        }
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) => this.finish_if_read(),
            // The end of a body of unknown length.
            Poll::Ready(None) => {
                if let Some(checkin) = this.checkin.take() {
                    checkin.give_back();
                }
            }
            // A broken body: its connection is not reused.
            Poll::Ready(Some(Err(_))) => this.checkin = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
