//! L7: HTTP/1.1 and HTTP/2 (h2c) from the client, pooled HTTP/1.1 or
//! HTTP/2 to the instances, with one overall deadline, per-try timeouts
//! and retries to another instance within the service's budget. An
//! HTTP/1.1 request that switches protocols (a WebSocket) becomes a
//! tunnel between the client and the instance that accepted it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioExecutor;
use signpost_core::policy::Fallback;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod attempt;
mod headers;
mod prepare;
mod retry;
mod trace;
mod tunnel;

use self::retry::forward;
pub(crate) use self::tunnel::Tunnel;
use self::tunnel::run_tunnel;
use crate::accept::ClientStream;
use crate::backend::Backend;
use crate::error::ProxyError;
use crate::idle::Activity;
use crate::pool::Answer;

/// An answer body the proxy sends a client: its own (an error, an
/// operator's fallback) or the instance's, streamed.
pub(crate) type AnswerBody = Either<Full<Bytes>, Answer>;

/// Set on every request to an instance: the attempt's number. A request
/// that arrives with it was sent by another proxy that retries itself, so
/// this one does not (retries would multiply).
pub const ATTEMPT_HEADER: HeaderName = HeaderName::from_static("x-signpost-attempt");

/// Set on every answer the proxy makes itself: why it failed.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("x-signpost-error");

/// Serves one client connection until it closes or `drain` asks it to
/// finish its requests and close. Longer than most functions here on
/// purpose: it reads top to bottom as the connection's life (admission,
/// the wait for a first byte, HTTP/1.1 or h2, the drain, a tunnel), and
/// each step it takes is a function of its own (`first_bytes::sniff`,
/// `idle::watch`, `drive`, `handle`, `run_tunnel`).
pub(crate) async fn serve(
    backend: Arc<Backend>,
    stream: ClientStream,
    client: SocketAddr,
    drain: CancellationToken,
    stop: CancellationToken,
) {
    let admitted = backend.admit_connection();
    // What the connection's requests share. Cloning it per request only
    // touches this thread's cache, where cloning the backend would touch
    // a count every worker thread writes.
    let shared = Arc::new(ClientConnection {
        backend: backend.clone(),
        over_limit: admitted.is_err(),
        activity: Activity::default(),
        tunnel: Mutex::default(),
        draining: AtomicBool::new(false),
    });
    let state = shared.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        async move {
            let ClientConnection {
                backend,
                over_limit,
                activity,
                tunnel,
                draining,
            } = &*shared;
            activity.request();
            let http1 = req.version() < http::Version::HTTP_2;
            let mut response = if *over_limit {
                // Over max_connections: every request fails fast.
                let limit = ProxyError::Limit {
                    limit: "max_connections",
                    value: backend.snapshot().policy.limits.max_connections,
                };
                reject(backend, &req, limit, Instant::now())
            } else {
                handle(backend, req, client, tunnel, None).await
            };
            if http1 && draining.load(Ordering::Relaxed) {
                // The client's next request goes to a new connection.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response)
        }
    });
    let waker = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
    let watch = crate::idle::watch(state.clone(), waker, backend.shared.client_idle_timeout);
    // One wait, from the first byte to the last request, for a reason to
    // close: the listener drains, or the client left the connection idle.
    // Draining, HTTP/1.1 answers say `Connection: close` first, for a
    // while: a client sending its next request gets it answered, where
    // closing the connection under it would fail it.
    let drained = async {
        drain.cancelled().await;
        state.draining.store(true, Ordering::Relaxed);
        tokio::time::sleep(DRAIN_QUIET).await;
    };
    tokio::pin!(drained);
    let closing = std::future::poll_fn(|cx| {
        if state.activity.is_idle() {
            tracing::debug!(service = %backend.name, %client, "closing an idle client connection");
            return Poll::Ready(());
        }
        drained.as_mut().poll(cx)
    });
    tokio::pin!(closing);
    let first_bytes = backend.shared.client_first_byte_timeout;
    let silent = async {
        if first_bytes.is_zero() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(first_bytes).await;
    };
    // In this order: a request usually arrives with its connection, and
    // then the timer is never even made.
    let sniffed = tokio::select! {
        biased;
        sniffed = crate::first_bytes::sniff(stream) => sniffed,
        // Nothing asked yet: nothing to finish.
        () = closing.as_mut() => return,
        () = silent => {
            tracing::debug!(service = %backend.name, %client, "closing a client connection that sent nothing");
            backend.shared.metrics.error(&backend.name, "client_silent");
            return;
        }
    };
    let result = match sniffed {
        Ok((io, true)) => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, service);
            // Boxed: an HTTP/2 connection's state is twice an HTTP/1.1
            // one's, and every connection's task would be that large.
            Box::pin(drive(conn, |c| c.graceful_shutdown(), closing, &stop)).await
        }
        Ok((io, false)) => {
            // One flat write per answer rather than a vectored one: the
            // copy costs less than the kernel's handling of the pieces.
            // Half-closed clients get their answer (as from HAProxy): and
            // without it hyper reads the socket once more while each
            // request is in flight, to see an early end, into a new 8 KiB
            // buffer, the request still holding the last one.
            let conn = hyper::server::conn::http1::Builder::new()
                .writev(false)
                .half_close(true)
                .serve_connection(io, service)
                .with_upgrades();
            drive(conn, |c| c.graceful_shutdown(), closing, &stop).await
        }
        Err(error) => {
            tracing::debug!(service = %backend.name, %client, %error, "cannot read from a client");
            Ok(())
        }
    };
    if let Err(error) = result {
        tracing::debug!(service = %backend.name, %client, %error, "client connection ended with an error");
    }
    drop(watch);
    // A switched connection is still this one: it keeps its admission.
    let tunnel = crate::lock(&state.tunnel).take();
    if let Some(tunnel) = tunnel {
        run_tunnel(&backend, client, tunnel, &stop).await;
    }
    drop(admitted);
}

/// What a client connection's requests share.
struct ClientConnection {
    backend: Arc<Backend>,
    /// Over `max_connections`: every request fails fast.
    over_limit: bool,
    /// When it last started a request, for the idle sweeper.
    activity: Activity,
    /// Set by the request whose answer switched protocols.
    tunnel: Mutex<Option<Tunnel>>,
    /// The proxy drains: answers close their connection.
    draining: AtomicBool,
}

/// How long a draining HTTP/1.1 connection waits for its client's next
/// request (answered with `Connection: close`) before it is closed idle.
const DRAIN_QUIET: std::time::Duration = std::time::Duration::from_secs(1);

impl AsRef<Activity> for ClientConnection {
    fn as_ref(&self) -> &Activity {
        &self.activity
    }
}

/// Runs a client connection until it ends; once `closing`, lets it
/// finish its requests (`shutdown`) until `stop` fires.
async fn drive<C, F>(
    conn: C,
    shutdown: fn(Pin<&mut C>),
    closing: Pin<&mut F>,
    stop: &CancellationToken,
) -> hyper::Result<()>
where
    C: Future<Output = hyper::Result<()>>,
    F: Future<Output = ()>,
{
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => result,
        () = closing => {
            shutdown(conn.as_mut());
            tokio::select! {
                result = conn.as_mut() => result,
                () = stop.cancelled() => Ok(()),
            }
        }
    }
}

/// One request from a client, answered by an instance or by the proxy.
/// Not an `async fn`, for the reason `forward` is not.
/// `source`: the caller's verified mesh identity, for the access log.
#[allow(clippy::manual_async_fn)]
pub(crate) fn handle<'a>(
    backend: &'a Backend,
    mut req: Request<Incoming>,
    client: SocketAddr,
    tunnel: &'a Mutex<Option<Tunnel>>,
    source: Option<&'a str>,
) -> impl Future<Output = Response<AnswerBody>> + 'a {
    async move {
        // There when hyper saw an HTTP/1.1 request to switch protocols.
        let mut upgrade = req.extensions_mut().remove::<OnUpgrade>();
        let ids = trace::ensure(req.headers_mut());
        let started = Instant::now();
        backend.used(started);
        let snapshot = backend.snapshot_full();
        let method = req.method().clone();
        // For the logs (a cheap clone: it shares the request's buffer).
        let target = req.uri().path_and_query().cloned();
        let path = target.as_ref().map_or("/", PathAndQuery::path);
        let mut attempts = 0;
        let mut admitted = false;
        let mut result = forward(
            backend,
            &snapshot,
            req,
            client,
            started,
            upgrade.is_some(),
            (&mut attempts, &mut admitted),
        )
        .await;
        // An answer that switched protocols leaves a tunnel for `serve`.
        if let Ok((response, instance)) = &mut result
            && response.status() == StatusCode::SWITCHING_PROTOCOLS
        {
            let member = snapshot.members.iter().position(|m| m.label == *instance);
            let sides = upgrade
                .take()
                .zip(response.extensions_mut().remove::<OnUpgrade>())
                .zip(member);
            match sides {
                Some(((client, instance), member)) => {
                    *crate::lock(tunnel) = Some(Tunnel {
                        client,
                        instance,
                        snapshot: snapshot.clone(),
                        member,
                    });
                }
                None => {
                    let addr = instance.to_string();
                    result = Err(ProxyError::Upgrade { addr });
                }
            }
        }
        let finished = Instant::now();
        if admitted {
            let ok = match &result {
                Ok((response, _)) => !response.status().is_server_error(),
                Err(error) => {
                    error.origin() != crate::error::Origin::Upstream
                        && !matches!(error, ProxyError::NoInstance | ProxyError::Timeout(_))
                }
            };
            backend.circuit_outcome(&snapshot.policy, ok, finished);
        }
        let mut response = match result {
            Ok((response, instance)) => {
                access_log(
                    backend,
                    &method,
                    path,
                    response.status(),
                    instance,
                    attempts,
                    started,
                    (client, source, &ids),
                );
                response
            }
            Err(error) => {
                tracing::warn!(service = %backend.name, %client, %method, path, reason = error.reason(), %error, request_id = ?ids.request_id, "request failed");
                let response = error_response(backend, &error);
                access_log(
                    backend,
                    &method,
                    path,
                    response.status(),
                    "",
                    attempts,
                    started,
                    (client, source, &ids),
                );
                response
            }
        };
        backend.duration.observe((finished - started).as_secs_f64());
        if response.status().is_server_error() {
            backend.server_errors.inc();
        }
        // The caller can quote it, whoever answered.
        response
            .headers_mut()
            .insert(trace::REQUEST_ID.clone(), ids.request_id);
        response
    }
}

fn reject(
    backend: &Backend,
    req: &Request<Incoming>,
    error: ProxyError,
    started: Instant,
) -> Response<AnswerBody> {
    tracing::warn!(service = %backend.name, method = %req.method(), path = req.uri().path(), reason = error.reason(), %error, "request refused");
    let response = error_response(backend, &error);
    backend.duration.observe(started.elapsed().as_secs_f64());
    response
}

/// The answer an operator set for a degraded service.
fn fallback_response(backend: &Backend, fallback: &Fallback) -> Response<AnswerBody> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(fallback.body.clone()))));
    *response.status_mut() =
        StatusCode::from_u16(fallback.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    for (name, value) in &fallback.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    response
        .headers_mut()
        .insert(ERROR_HEADER, HeaderValue::from_static("degraded"));
    backend.own_status(response.status().as_u16());
    response
}

/// The proxy's own answer to a failure: its status, the reason in
/// `x-signpost-error`, the message in the body; counted.
fn error_response(backend: &Backend, error: &ProxyError) -> Response<AnswerBody> {
    let status = error.status();
    backend.own_status(status.as_u16());
    backend.shared.metrics.error(&backend.name, error.reason());
    let body = format!("signpost: {}: {error}\n", backend.name);
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(ERROR_HEADER, HeaderValue::from_static(error.reason()));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[allow(clippy::too_many_arguments)]
fn access_log(
    backend: &Backend,
    method: &Method,
    path: &str,
    status: StatusCode,
    instance: &str,
    attempts: u32,
    started: Instant,
    (client, source, ids): (SocketAddr, Option<&str>, &trace::Ids),
) {
    if backend.shared.access_log {
        tracing::info!(
            target: "signpost::access",
            service = %backend.name,
            %client,
            source_identity = source.unwrap_or(""),
            %method,
            path,
            status = status.as_u16(),
            instance,
            attempts,
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            trace_id = ids.trace_id.to_str().unwrap_or(""),
            request_id = ids.request_id.to_str().unwrap_or(""),
        );
    }
}
