//! The one HTTP server loop Signpost's HTTP APIs run on: the control
//! plane's and the agent's local API (which is why it is public).
//!
//! `axum::serve` has no timers and no limits, so a client that opens
//! connections and sends nothing holds them forever. This loop serves an
//! axum router over hyper's HTTP/1.1 (what Consul's API speaks) with:
//! - a header timeout that also closes idle keep-alive connections
//!   ([`HttpLimits::header_timeout`]); a request being answered, such as
//!   a blocking query, is not affected;
//! - a cap on open connections per client address
//!   ([`HttpLimits::max_connections_per_client`]); more are closed as they
//!   arrive, counted and logged once a period;
//! - accepts that back off when they fail (out of file descriptors);
//! - a graceful shutdown that gives requests in flight a bounded time.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use signpost_core::accept::{AcceptBackoff, Tally};
use signpost_core::config::HttpLimits;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long requests in flight may take to finish once the server stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// At shutdown, how long open connections wait for their client's next
/// request (answered with `Connection: close`) before idle ones close:
/// closing a keep-alive connection under a request on its way fails it,
/// and a new process may be serving the listener already (a handover).
const QUIET: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Connections the server closed on its own, by reason.
#[derive(Clone, Debug, Default)]
pub struct ServerMetrics {
    closed: Family<ReasonLabel, Counter>,
}

impl ServerMetrics {
    /// Registers `<prefix>_connections_closed_total{reason}` in `registry`.
    pub fn register(&self, registry: &mut Registry, prefix: &str) {
        registry.register(
            format!("{prefix}_connections_closed"),
            "Connections the HTTP API closed on its own (reason: per_client_limit, header_timeout, tls_handshake)",
            self.closed.clone(),
        );
    }

    fn closed(&self, reason: &'static str) {
        self.closed.get_or_create(&ReasonLabel { reason }).inc();
    }
}

/// Serves `router` on `listener` (over TLS with `tls`) until `shutdown`
/// is cancelled; then stops accepting and gives requests in flight
/// [`SHUTDOWN_GRACE`]. Returns only then: accept failures are waited
/// out, not returned. A TLS handshake has the header timeout to finish.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: &HttpLimits,
    metrics: ServerMetrics,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let handshake_timeout = limits.header_timeout;
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let clients = Clients::new(limits.max_connections_per_client);
    let graceful = GracefulShutdown::new();
    let mut failing = AcceptBackoff::default();
    let closing = shutdown.clone();
    let router = router.layer(axum::middleware::map_response(
        move |mut response: axum::response::Response| {
            let closing = closing.clone();
            async move {
                if closing.is_cancelled() {
                    response.headers_mut().insert(
                        hyper::header::CONNECTION,
                        hyper::header::HeaderValue::from_static("close"),
                    );
                }
                response
            }
        },
    ));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                let wait = failing.failed(addr, &error);
                tokio::select! {
                    () = tokio::time::sleep(wait) => continue,
                    () = shutdown.cancelled() => break,
                }
            }
        };
        failing.recovered(addr);
        let Some(slot) = clients.take(peer.ip()) else {
            metrics.closed("per_client_limit");
            drop(stream);
            continue;
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, %peer, "cannot set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(router.clone());
        let metrics = metrics.clone();
        let (http1, watcher, tls) = (http1.clone(), graceful.watcher(), tls.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let served =
                match tls {
                    None => {
                        watcher
                            .watch(http1.serve_connection(TokioIo::new(stream), service))
                            .await
                    }
                    Some(acceptor) => {
                        let stream =
                            match tokio::time::timeout(handshake_timeout, acceptor.accept(stream))
                                .await
                            {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(error)) => {
                                    metrics.closed("tls_handshake");
                                    tracing::debug!(%error, %peer, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    metrics.closed("header_timeout");
                                    return;
                                }
                            };
                        watcher
                            .watch(http1.serve_connection(TokioIo::new(stream), service))
                            .await
                    }
                };
            if let Err(error) = served {
                if error.is_timeout() {
                    metrics.closed("header_timeout");
                }
                tracing::debug!(%error, %peer, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    if graceful.count() > 0 {
        tokio::time::sleep(QUIET).await;
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(%addr, "requests still in flight after the shutdown grace; dropping them");
    }
}

/// Open connections by client address.
#[derive(Clone)]
struct Clients {
    inner: Arc<Mutex<ClientsInner>>,
    max: u32,
}

struct ClientsInner {
    open: HashMap<IpAddr, u32>,
    refused: Tally,
}

impl Clients {
    fn new(max: u32) -> Self {
        Clients {
            inner: Arc::new(Mutex::new(ClientsInner {
                open: HashMap::new(),
                refused: Tally::default(),
            })),
            max,
        }
    }

    /// A slot for one more connection from `ip`, if it has fewer than
    /// the maximum open; the slot is given back when dropped.
    fn take(&self, ip: IpAddr) -> Option<Slot> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let open = inner.open.entry(ip).or_default();
        if *open >= self.max {
            if let Some(count) = inner.refused.note() {
                tracing::warn!(client = %ip, max = self.max, refused = count,
                    "closing connections over the per-client limit (limits.max_connections_per_client)");
            }
            return None;
        }
        *open += 1;
        Some(Slot {
            clients: self.clone(),
            ip,
        })
    }
}

/// One open connection of a client.
struct Slot {
    clients: Clients,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self
            .clients
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(open) = inner.open.get_mut(&self.ip) {
            *open -= 1;
            if *open == 0 {
                inner.open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_at_most_its_slots_and_gets_them_back() {
        let clients = Clients::new(2);
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let first = clients.take(a).unwrap();
        let _second = clients.take(a).unwrap();
        assert!(clients.take(a).is_none(), "a third connection is refused");
        assert!(clients.take(b).is_some(), "another client is not affected");
        drop(first);
        assert!(
            clients.take(a).is_some(),
            "a closed connection frees its slot"
        );
    }
}
