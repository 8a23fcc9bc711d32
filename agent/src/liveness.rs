//! The peer liveness listener: a read-only HTTP endpoint on the advertise
//! address (`liveness_port`, 8301 by default) that other agents probe when
//! the control plane lost this host's stream. It answers who this node is
//! and nothing else, so the local API (which can register services and
//! run checks) never has to listen beyond loopback.
//!
//! `GET /v1/liveness` → `200 {"Node": "<name>", "ID": "<node id>"}`; the
//! prober checks the name, so an address taken over by another host does
//! not vouch for a dead one. Connections are bounded in number and time:
//! probes are one small request each.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use signpost_core::sockets::Sockets;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The path peers probe.
pub(crate) const PATH: &str = "/v1/liveness";

/// Probes served at once; more connections are closed at once.
const MAX_CONNECTIONS: usize = 64;

/// A connection's whole life: one probe takes milliseconds.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// The name the listener is handed over by.
const NAME: &str = signpost_core::sockets::LIVENESS;

/// Binds the listener on the advertise address, and says where peers
/// reach it (`port` 0: a free one). An advertise address that is not this
/// host's own (a NAT's public address) is listened for on every address
/// of its family instead: the listener answers nothing but the node's
/// name.
/// A previous process's listener, handed over, is served instead.
pub(crate) async fn bind(
    advertise: IpAddr,
    port: u16,
    sockets: &Sockets,
) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let at = SocketAddr::new(advertise, port);
    let any = match advertise {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    };
    let inherited = [at, SocketAddr::new(any, port)]
        .into_iter()
        .find_map(|addr| sockets.take_tcp(NAME, addr).into_iter().next());
    let listener = match inherited {
        Some(inherited) => TcpListener::from_std(inherited),
        None => match TcpListener::bind(at).await {
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                tracing::info!(%advertise, "the advertise address is not this host's: liveness listener on every address");
                TcpListener::bind((any, port)).await
            }
            bound => bound,
        },
    }
    .with_context(|| {
        format!("cannot listen for peer liveness probes on {at} (advertise_addr and liveness_port)")
    })?;
    sockets.serving(NAME, &[&listener])?;
    let probe_address = SocketAddr::new(advertise, listener.local_addr()?.port());
    tracing::info!(addr = %probe_address, "peer liveness listener");
    Ok((listener, probe_address))
}

/// Serves probes until `shutdown`, answering as node `name` with `id`.
pub(crate) async fn serve(
    listener: &TcpListener,
    name: String,
    id: String,
    shutdown: CancellationToken,
) {
    let body = Bytes::from(serde_json::json!({"Node": name, "ID": id}).to_string());
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut failing = signpost_core::accept::AcceptBackoff::default();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
            // Reap finished connections so the set stays small.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(error) => {
                // Out of file descriptors and the like: wait, do not spin.
                let wait = failing.failed(addr, &error);
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(wait) => continue,
                }
            }
        };
        failing.recovered(addr);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "liveness listener busy: connection closed");
            continue;
        };
        let body = body.clone();
        connections.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request: Request<_>| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(answer(&request, body)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "liveness probe connection failed")
                }
                Err(_) => tracing::debug!(%peer, "liveness probe connection timed out"),
            }
        });
    }
    connections.shutdown().await;
}

fn answer<B>(request: &Request<B>, body: Bytes) -> Response<Full<Bytes>> {
    let (status, body) = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, PATH) => (StatusCode::OK, body),
        (_, PATH) => (StatusCode::METHOD_NOT_ALLOWED, Bytes::new()),
        _ => (StatusCode::NOT_FOUND, Bytes::new()),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    if status == StatusCode::OK {
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
    }
    response
}
