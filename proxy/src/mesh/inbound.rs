//! The inbound listener: one mutual-TLS port per host (the advertise
//! address, 8443 by default) through which other hosts' proxies reach
//! this host's meshed instances. A connection is accepted once its
//! certificate chains to the mesh's roots and names a service of this
//! trust domain; the server name says which local instance it wants;
//! the intentions decide per connection (L4) or per request (L7, with
//! their HTTP permissions). What they allow goes on to the instance
//! through a backend of its own, in plaintext on this host.
//!
//! When the intentions change, every open connection that a deny now
//! forbids outright is closed.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use signpost_core::identity::parse_server_name;
use signpost_core::intention::{Decision, Intentions};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{ALPN_TCP, MeshView, classify, identity_of};
use crate::Shared;
use crate::backend::Backend;
use crate::listeners::Tasks;
use crate::metrics::MeshCalls;

/// A client has this long to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What one local instance is reached as.
pub(crate) type Target = (String, u16);

/// The inbound side of the mesh: the local instances it serves and the
/// connections open on it.
#[derive(Default)]
pub(crate) struct Inbound {
    pub(crate) targets: ArcSwap<HashMap<Target, Arc<Backend>>>,
    open: Mutex<HashMap<u64, Open>>,
    next: AtomicU64,
}

/// An open connection, for closing it when a deny forbids it.
struct Open {
    source: Arc<str>,
    destination: String,
    l4: bool,
    close: CancellationToken,
}

/// Removes a connection from the open ones when it ends.
struct Registered<'a>(&'a Inbound, u64);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        crate::lock(&self.0.open).remove(&self.1);
    }
}

impl Inbound {
    fn register(&self, open: Open) -> Registered<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        crate::lock(&self.open).insert(id, open);
        Registered(self, id)
    }

    /// Closes the open connections that `intentions` now forbid
    /// outright; how many.
    pub(crate) fn recheck(&self, intentions: &Intentions) -> usize {
        let open = crate::lock(&self.open);
        let mut closed = 0;
        for conn in open.values() {
            let forbidden = intentions.closes_connection(&conn.source, &conn.destination)
                || (conn.l4
                    && !intentions
                        .connection(&conn.source, &conn.destination)
                        .allowed);
            if forbidden && !conn.close.is_cancelled() {
                tracing::info!(source = %conn.source, destination = %conn.destination, "closing a mesh connection an intention now denies");
                conn.close.cancel();
                closed += 1;
            }
        }
        closed
    }
}

/// Accepts on `listener` until the proxy shuts down; each connection is
/// served on a worker thread.
pub(crate) async fn accept(listener: TcpListener, shared: Arc<Shared>, tasks: Tasks) {
    let next = AtomicUsize::new(0);
    let mut failing = signpost_core::accept::AcceptBackoff::default();
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = tasks.drain.cancelled() => break,
        };
        match accepted {
            Ok((tcp, client)) => {
                failing.recovered(addr);
                crate::nodelay(&tcp);
                let shared = shared.clone();
                let (drain, stop) = (tasks.drain.clone(), tasks.stop.clone());
                let worker = next.fetch_add(1, Ordering::Relaxed);
                let task = tasks.tracker.track_future(async move {
                    connection(shared, tcp, client, drain, stop).await;
                });
                tasks.workers.spawn_on(worker, task);
            }
            Err(error) => {
                let wait = failing.failed(addr, &error);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = tasks.drain.cancelled() => break,
                }
            }
        }
    }
    tracing::debug!(%addr, "inbound listener closed");
}

/// One connection from another host's proxy.
async fn connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    client: SocketAddr,
    drain: CancellationToken,
    stop: CancellationToken,
) {
    let metrics = &shared.metrics;
    let view = shared.mesh.load_full();
    let Some(config) = view.server.clone() else {
        tracing::debug!(%client, "mesh connection refused: this host has no mesh certificate yet");
        metrics.mesh_handshake_failed("inbound", "not_ready");
        return;
    };
    let accepted = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(config).accept(tcp),
    )
    .await;
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            let reason = classify(&error);
            tracing::debug!(%client, reason, %error, "mesh handshake failed");
            metrics.mesh_handshake_failed("inbound", reason);
            return;
        }
        Err(_) => {
            metrics.mesh_handshake_failed("inbound", "timeout");
            return;
        }
    };
    let conn = tls.get_ref().1;
    metrics.mesh_handshake(
        "inbound",
        conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
    );
    let target = conn.server_name().and_then(parse_server_name);
    let source = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|cert| identity_of(cert.as_ref()))
        .filter(|id| id.trust_domain == view.trust_domain);
    let l4 = conn.alpn_protocol() == Some(ALPN_TCP);
    let Some(source) = source else {
        tracing::warn!(%client, "mesh connection refused: its certificate names no service of this trust domain");
        metrics.mesh_handshake_failed("inbound", "wrong_identity");
        return;
    };
    let Some((service, port)) = target else {
        tracing::warn!(%client, "mesh connection refused: it names no instance");
        return;
    };
    let Some(backend) = shared
        .inbound
        .targets
        .load()
        .get(&(service.clone(), port))
        .cloned()
    else {
        tracing::warn!(%client, service, port, "mesh connection refused: no meshed instance of that service on that port here");
        metrics.error(&format!("inbound/{service}"), "no_instance");
        return;
    };
    let source_name: Arc<str> = Arc::from(source.service.as_str());
    let destination = backend.service.clone();
    let uri = source.uri();
    let close = CancellationToken::new();
    let _open = shared.inbound.register(Open {
        source: source_name.clone(),
        destination: destination.clone(),
        l4,
        close: close.clone(),
    });
    let calls = shared.metrics.mesh_calls(&source_name, &destination);
    if l4 {
        let decision = view.intentions.connection(&source_name, &destination);
        record(&calls, &source_name, &destination, &decision, &uri, None);
        if !decision.allowed {
            return;
        }
        tokio::select! {
            () = crate::tcp::serve(backend, tls, client, stop, Some(&uri)) => {}
            () = close.cancelled() => {}
        }
        return;
    }
    let peer = Arc::new(Peer {
        shared: shared.clone(),
        calls,
        source: source_name,
        destination,
        uri,
        backend,
        client,
        tunnel: Mutex::new(None),
    });
    let service = service_fn(move |req: Request<Incoming>| {
        let peer = peer.clone();
        async move { Ok::<_, Infallible>(peer.request(req).await) }
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = close.cancelled() => Ok(()),
        () = drain.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                result = conn.as_mut() => result,
                () = stop.cancelled() => Ok(()),
                () = close.cancelled() => Ok(()),
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%client, %error, "mesh connection ended with an error");
    }
}

/// What the requests of one HTTP/2 connection share.
struct Peer {
    shared: Arc<Shared>,
    calls: MeshCalls,
    source: Arc<str>,
    destination: String,
    uri: String,
    backend: Arc<Backend>,
    client: SocketAddr,
    tunnel: Mutex<Option<crate::http::Tunnel>>,
}

impl Peer {
    async fn request(&self, req: Request<Incoming>) -> Response<crate::http::AnswerBody> {
        let view = self.shared.mesh.load();
        let decision = {
            let headers = req.headers();
            let lookup = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
            view.intentions.request(
                &self.source,
                &self.destination,
                &signpost_core::intention::Request {
                    method: req.method().as_str(),
                    path: req.uri().path(),
                    headers: &lookup,
                },
            )
        };
        record(
            &self.calls,
            &self.source,
            &self.destination,
            &decision,
            &self.uri,
            Some((req.method().as_str(), req.uri().path())),
        );
        if !decision.allowed {
            let body = format!(
                "signpost: {} may not call {}: {}\n",
                self.source, self.destination, decision.reason
            );
            let mut response = Response::new(Either::Left(Full::new(Bytes::from(body))));
            *response.status_mut() = StatusCode::FORBIDDEN;
            response.headers_mut().insert(
                crate::http::ERROR_HEADER,
                HeaderValue::from_static("intention_denied"),
            );
            return response;
        }
        drop(view);
        crate::http::handle(
            &self.backend,
            req,
            self.client,
            &self.tunnel,
            Some(&self.uri),
        )
        .await
    }
}

/// Counts a decision, and logs a deny (or what shadow mode let through).
fn record(
    calls: &MeshCalls,
    source: &str,
    destination: &str,
    decision: &Decision,
    uri: &str,
    request: Option<(&str, &str)>,
) {
    let (label, counter) = if decision.shadow_denied {
        ("shadow_deny", &calls.shadow_deny)
    } else if decision.allowed {
        ("allow", &calls.allow)
    } else {
        ("deny", &calls.deny)
    };
    counter.inc();
    if label != "allow" {
        let (method, path) = request.unwrap_or(("", ""));
        tracing::warn!(
            source_identity = uri,
            source,
            destination,
            decision = label,
            reason = %decision.reason,
            method,
            path,
            "mesh call denied{}",
            if decision.shadow_denied { " (shadow mode: let through)" } else { "" }
        );
    }
}

/// The view's intentions, for a recheck after [`crate::Proxy::set_mesh`].
pub(crate) fn recheck(inbound: &Inbound, view: &MeshView, shared: &Shared) {
    let closed = inbound.recheck(&view.intentions);
    if closed > 0 {
        shared.metrics.mesh_closed(closed as u64);
    }
}
