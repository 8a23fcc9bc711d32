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
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The path peers probe.
pub(crate) const PATH: &str = "/v1/liveness";

/// Probes served at once; more connections are closed at once.
const MAX_CONNECTIONS: usize = 64;

/// A connection's whole life: one probe takes milliseconds.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves probes until `shutdown`, answering as node `name` with `id`.
pub(crate) async fn serve(
    listener: TcpListener,
    name: String,
    id: String,
    shutdown: CancellationToken,
) {
    let body = Bytes::from(serde_json::json!({"Node": name, "ID": id}).to_string());
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
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
                tracing::warn!(%error, "liveness listener cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
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
