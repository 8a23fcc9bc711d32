//! L7: HTTP/1.1 and HTTP/2 (h2c) from the client, pooled HTTP/1.1 or
//! HTTP/2 to the instances, with one overall deadline, per-try timeouts
//! and retries to another instance within the service's budget. An
//! HTTP/1.1 request that switches protocols (a WebSocket) becomes a
//! tunnel between the client and the instance that accepted it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{self, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo};
use signpost_core::model::Protocol;
use signpost_core::policy::{Balancer, Degraded, Fallback, HashKey, Policy};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::accept::ClientStream;
use crate::backend::{Backend, Snapshot};
use crate::balance::{hash_ip, hash_key};
use crate::body::{MAX_KEPT, Payload};
use crate::error::ProxyError;
use crate::idle::Activity;
use crate::pool::{Answer, PoolError};

/// An answer body the proxy sends a client: its own (an error, an
/// operator's fallback) or the instance's, streamed.
type AnswerBody = Either<Full<Bytes>, Answer>;

/// Set on every request to an instance: the attempt's number. A request
/// that arrives with it was sent by another proxy that retries itself, so
/// this one does not (retries would multiply).
pub const ATTEMPT_HEADER: HeaderName = HeaderName::from_static("x-signpost-attempt");

/// Set on every answer the proxy makes itself: why it failed.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("x-signpost-error");

/// Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1).
static HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// Serves one client connection until it closes or `drain` asks it to
/// finish its requests and close.
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
            } = &*shared;
            activity.request();
            let response = if *over_limit {
                // Over max_connections: every request fails fast.
                let limit = ProxyError::Limit {
                    limit: "max_connections",
                    value: backend.snapshot().policy.max_connections,
                };
                reject(backend, &req, limit, Instant::now())
            } else {
                handle(backend, req, client, tunnel).await
            };
            Ok::<_, Infallible>(response)
        }
    });
    let waker = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
    let watch = crate::idle::watch(state.clone(), waker, backend.shared.client_idle_timeout);
    // One wait, from the first byte to the last request, for a reason to
    // close: the listener drains, or the client left the connection idle.
    let drained = drain.cancelled();
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
}

impl AsRef<Activity> for ClientConnection {
    fn as_ref(&self) -> &Activity {
        &self.activity
    }
}

/// A connection an instance switched to another protocol (a WebSocket):
/// the client's side and the instance's, each handed over by hyper once
/// the 101 has gone through.
struct Tunnel {
    client: OnUpgrade,
    instance: OnUpgrade,
    /// The instance: `snapshot.members[member]`, counted in flight (as
    /// its requests are, for the balancer) while the tunnel lasts.
    snapshot: Arc<Snapshot>,
    member: usize,
}

/// Joins the two sides of a switched connection; bytes flow both ways
/// until either side closes it or `stop` fires, as on an L4 listener.
async fn run_tunnel(
    backend: &Backend,
    client: SocketAddr,
    tunnel: Tunnel,
    stop: &CancellationToken,
) {
    let member = &tunnel.snapshot.members[tunnel.member];
    let _in_flight = member.stats.in_flight();
    let instance = &member.label;
    let sides = async { Ok::<_, hyper::Error>((tunnel.client.await?, tunnel.instance.await?)) };
    let joined = tokio::select! {
        sides = sides => sides,
        () = stop.cancelled() => return,
    };
    let (client_side, instance_side) = match joined {
        Ok(sides) => sides,
        Err(error) => {
            tracing::debug!(service = %backend.name, %client, %instance, %error, "a switched connection closed before it started");
            return;
        }
    };
    let (mut client_side, mut instance_side) =
        (TokioIo::new(client_side), TokioIo::new(instance_side));
    let copied = tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client_side, &mut instance_side) => Some(copied),
        () = stop.cancelled() => None,
    };
    match copied {
        Some(Ok((up, down))) => {
            tracing::debug!(service = %backend.name, %client, %instance, bytes_sent = up, bytes_received = down, "switched connection closed");
        }
        Some(Err(error)) => {
            tracing::debug!(service = %backend.name, %client, %instance, %error, "switched connection ended with an error");
        }
        None => {
            tracing::debug!(service = %backend.name, %client, %instance, "switched connection closed at shutdown");
        }
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
/// Not an `async fn`, for the reason [`forward`] is not.
#[allow(clippy::manual_async_fn)]
fn handle<'a>(
    backend: &'a Backend,
    mut req: Request<Incoming>,
    client: SocketAddr,
    tunnel: &'a Mutex<Option<Tunnel>>,
) -> impl Future<Output = Response<AnswerBody>> + 'a {
    async move {
        // There when hyper saw an HTTP/1.1 request to switch protocols.
        let mut upgrade = req.extensions_mut().remove::<OnUpgrade>();
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
        let response = match result {
            Ok((response, instance)) => {
                access_log(
                    backend,
                    &method,
                    path,
                    response.status(),
                    instance,
                    attempts,
                    started,
                    client,
                );
                response
            }
            Err(error) => {
                tracing::warn!(service = %backend.name, %client, %method, path, reason = error.reason(), %error, "request failed");
                let response = error_response(backend, &error);
                access_log(
                    backend,
                    &method,
                    path,
                    response.status(),
                    "",
                    attempts,
                    started,
                    client,
                );
                response
            }
        };
        backend.duration.observe((finished - started).as_secs_f64());
        response
    }
}

/// Not an `async fn`: one of those keeps each argument twice in its
/// state (the argument, and the local it is moved to), and this state is
/// moved with every request.
#[allow(clippy::manual_async_fn)]
fn forward<'s: 'f, 'f>(
    backend: &'f Backend,
    snapshot: &'s Snapshot,
    req: Request<Incoming>,
    client: SocketAddr,
    started: Instant,
    can_upgrade: bool,
    (attempts, admitted): (&'f mut u32, &'f mut bool),
) -> impl Future<Output = Result<(Response<AnswerBody>, &'s str), ProxyError>> + 'f {
    async move {
        let policy = &snapshot.policy;
        let deadline = started + policy.timeout;
        let Some(pool) = snapshot.pool() else {
            return Err(ProxyError::NoInstance);
        };
        if let Some(fallback) =
            backend.route_check(policy, req.method().as_str(), req.uri().path())?
        {
            return Ok((fallback_response(backend, &fallback), ""));
        }
        match &policy.degraded {
            Degraded::No => {}
            Degraded::FailFast => return Err(ProxyError::Degraded),
            Degraded::Fallback(fallback) => return Ok((fallback_response(backend, fallback), "")),
        }
        backend.within_rate(policy, started)?;
        backend.through_circuit(policy, started)?;
        *admitted = true;
        let _permit = backend.admit_request(policy, deadline).await?;
        let idempotent = policy.retry_non_idempotent || is_idempotent(req.method());
        let (parts, body) = req.into_parts();
        let mut headers = parts.headers;
        let key =
            (policy.balancer == Balancer::Hash).then(|| balance_key(policy, &headers, client));
        let http2 = matches!(snapshot.protocol, Protocol::Http2 | Protocol::Grpc);
        // A switch of protocols (a WebSocket) goes on to an HTTP/1.1
        // instance, with this hop's own two headers.
        let upgrade = strip_hop_by_hop(&mut headers)
            .filter(|protocols| can_upgrade && !http2 && !names_h2c(protocols));
        let upgrading = upgrade.is_some();
        if let Some(protocols) = upgrade {
            set_upgrade(&mut headers, protocols);
        }
        // The header goes in the map every attempt clones, so that a clone
        // (made to its length) never grows: later attempts only replace
        // its value. What it replaces says whether a proxy before this
        // one retries already.
        let marked = headers.insert(ATTEMPT_HEADER, attempt_value(1)).is_some();
        let retry_here = policy.retries > 0 && !marked;
        let mut has_host = headers.contains_key(header::HOST);
        if !has_host
            && let Some(authority) = parts.uri.authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            headers.insert(header::HOST, host);
            has_host = true;
        }
        // Only an answer to a request safe to repeat is retried once the
        // body went out: other bodies need no copy (a connect failure
        // hands the body back unsent).
        let resend = retry_here && idempotent;
        let mut payload = if body.is_end_stream() {
            // Nothing to read (a GET): nothing to wait for.
            Payload::Kept(Bytes::new())
        } else if resend && body.size_hint().upper().is_some_and(|n| n <= MAX_KEPT) {
            // A length known to be small: read whole before the first try.
            let kept = Limited::new(body, MAX_KEPT as usize)
                .collect()
                .await
                .map_err(|e| ProxyError::ClientBody(e.to_string()))?;
            Payload::Kept(kept.to_bytes())
        } else {
            // Streamed (chunked, HTTP/2 without a length, or a request
            // not to repeat): copied as it goes when it may be resent.
            Payload::streamed(body, resend)
        };
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));

        backend.deposit();
        // The first try starts now, with the body read and a slot taken.
        let ready = Instant::now();
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last: Option<ProxyError> = None;
        for attempt in 0..=policy.retries {
            if attempt > 0 {
                if !backend.withdraw() {
                    break;
                }
                backoff(policy, attempt, deadline).await;
            }
            let Some(body) = payload.next() else { break };
            let try_started = if attempt == 0 { ready } else { Instant::now() };
            let Some(pick) = backend.pick(snapshot, &tried, key, try_started) else {
                return Err(last.unwrap_or(ProxyError::NoInstance));
            };
            let member = &snapshot.members[pick.index];
            let addr = member.endpoint.addr;
            if let Some(scoped) = policy.instances.get(&addr) {
                match &scoped.degraded {
                    Degraded::No => {}
                    Degraded::FailFast => return Err(ProxyError::Degraded),
                    Degraded::Fallback(fallback) => {
                        return Ok((fallback_response(backend, fallback), &member.label));
                    }
                }
                if !member.stats.limiter.allow(scoped.rate_limit, try_started) {
                    return Err(ProxyError::RateLimited);
                }
            }
            *attempts = attempt + 1;
            let mut request = Request::new(body);
            *request.method_mut() = parts.method.clone();
            *request.headers_mut() = headers.clone();
            let request_headers = request.headers_mut();
            if attempt > 0 {
                request_headers.insert(ATTEMPT_HEADER, attempt_value(attempt + 1));
            }
            // HTTP/2 names the instance in the URI (`:authority`); HTTP/1.1
            // sends the origin-form and a Host header.
            let mut target = uri::Parts::default();
            if http2 {
                *request.version_mut() = Version::HTTP_2;
                target.scheme = Some(Scheme::HTTP);
                target.authority = Some(member.authority.clone());
            } else if !has_host && let Ok(host) = HeaderValue::from_str(member.authority.as_str()) {
                request_headers.insert(header::HOST, host);
            }
            target.path_and_query = Some(path.clone());
            *request.uri_mut() = Uri::from_parts(target)
                .map_err(|e| ProxyError::ClientBody(format!("bad request target: {e}")))?;

            let limit = match policy.try_timeout {
                Some(t) => (try_started + t).min(deadline),
                None => deadline,
            };
            let in_flight = member.stats.in_flight();
            let answered =
                tokio::time::timeout_at(limit, pool.request(addr, &member.stats, request)).await;
            drop(in_flight);
            let answered_at = Instant::now();
            let rtt = answered_at - try_started;
            let error = match answered {
                Ok(Ok(response)) => {
                    let status = response.status();
                    let retry_503 = status == StatusCode::SERVICE_UNAVAILABLE
                        && idempotent
                        && retry_here
                        && attempt < policy.retries
                        && payload.can_resend();
                    if status.is_server_error() {
                        backend.failed(snapshot, member, rtt);
                    } else {
                        backend.succeeded(member, rtt, answered_at);
                    }
                    member.stats.statuses.count(status.as_u16());
                    if !retry_503 {
                        let mut response = response.map(Either::Right);
                        let switched = strip_hop_by_hop(response.headers_mut());
                        if status == StatusCode::SWITCHING_PROTOCOLS {
                            // The connection becomes a tunnel (see `serve`).
                            let Some(protocols) = switched.filter(|_| upgrading) else {
                                return Err(ProxyError::Upgrade {
                                    addr: member.label.clone(),
                                });
                            };
                            set_upgrade(response.headers_mut(), protocols);
                        }
                        return Ok((response, &member.label));
                    }
                    ProxyError::Unavailable {
                        addr: member.label.clone(),
                    }
                }
                Ok(Err(PoolError::Connect { reason, request })) => {
                    payload.unsent(request.into_body());
                    backend.failed(snapshot, member, rtt);
                    ProxyError::Connect {
                        addr: member.label.clone(),
                        reason,
                    }
                }
                // The client's body broke off or was malformed on its way
                // (the request body, the only one, failed with its own
                // error): the client's error (400), never held against the
                // instance. Other errors hyper counts as the caller's, such
                // as a connection closed under the request, are not.
                Ok(Err(PoolError::Http(e)))
                    if e.is_user()
                        && std::error::Error::source(&e)
                            .is_some_and(|s| s.is::<hyper::Error>()) =>
                {
                    return Err(ProxyError::ClientBody(signpost_core::error_chain(&e)));
                }
                Ok(Err(PoolError::Http(e))) => {
                    backend.failed(snapshot, member, rtt);
                    ProxyError::Reset {
                        addr: member.label.clone(),
                        reason: signpost_core::error_chain(&e),
                    }
                }
                Err(_) if answered_at >= deadline => {
                    backend.failed(snapshot, member, rtt);
                    return Err(ProxyError::Timeout(policy.timeout));
                }
                Err(_) => {
                    backend.failed(snapshot, member, rtt);
                    ProxyError::TryTimeout {
                        addr: member.label.clone(),
                        timeout: policy.try_timeout.unwrap_or(policy.timeout),
                    }
                }
            };
            tracing::debug!(service = %backend.name, instance = %member.label, attempt = attempt + 1, %error, "attempt failed");
            let again = error.retryable(idempotent) && retry_here && payload.can_resend();
            // Only a retry looks at what was tried: no allocation until then.
            tried.push(addr);
            last = Some(error);
            if !again {
                break;
            }
        }
        Err(last.unwrap_or(ProxyError::NoInstance))
    }
}

/// The attempt header's value; the usual ones without an allocation.
fn attempt_value(attempt: u32) -> HeaderValue {
    const VALUES: [&str; 4] = ["1", "2", "3", "4"];
    match VALUES.get(attempt.wrapping_sub(1) as usize) {
        Some(value) => HeaderValue::from_static(value),
        None => HeaderValue::from(attempt),
    }
}

/// Full-jitter exponential back-off, never past the deadline.
async fn backoff(policy: &Policy, attempt: u32, deadline: Instant) {
    let cap = policy
        .retry_backoff
        .saturating_mul(1 << (attempt - 1).min(16))
        .min(policy.retry_backoff_max);
    if cap.is_zero() {
        return;
    }
    let wait = Duration::from_secs_f64(rand::random::<f64>() * cap.as_secs_f64());
    tokio::time::sleep_until((Instant::now() + wait).min(deadline)).await;
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Where `name` is in [`HOP_BY_HOP`]: a match on the name's text, which
/// looks at its length first, where comparing `HeaderName`s one by one
/// compares bytes for every custom one.
fn hop_by_hop(name: &HeaderName) -> Option<usize> {
    match name.as_str() {
        "connection" => Some(0),
        "keep-alive" => Some(1),
        "proxy-connection" => Some(2),
        "transfer-encoding" => Some(3),
        "upgrade" => Some(4),
        "proxy-authorization" => Some(5),
        _ => None,
    }
}

/// Removes the headers that belong to one connection. Returns the
/// `Upgrade` header's value when `Connection` names it: the protocols the
/// message asks to switch to (or, on a 101, switches to).
fn strip_hop_by_hop(headers: &mut HeaderMap) -> Option<HeaderValue> {
    // One pass over the names says which are here (most messages carry
    // one or none): only those are looked up and removed.
    let mut present = [false; HOP_BY_HOP.len()];
    let mut te = false;
    for name in headers.keys() {
        match hop_by_hop(name) {
            Some(i) => present[i] = true,
            None => te |= name == header::TE,
        }
    }
    // Headers named in Connection (HOP_BY_HOP[0]) are hop-by-hop too (its
    // usual `close` and `keep-alive` need no lookup). One lookup removes
    // it and yields its values.
    let mut named: Vec<HeaderName> = Vec::new();
    let mut upgrade_named = false;
    if present[0]
        && let header::Entry::Occupied(connection) = headers.entry(header::CONNECTION)
    {
        for value in connection.remove_entry_mult().1 {
            let bytes = value.as_bytes();
            if bytes.eq_ignore_ascii_case(b"keep-alive") || bytes.eq_ignore_ascii_case(b"close") {
                continue;
            }
            let Ok(value) = value.to_str() else { continue };
            named.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|n| {
                        if n.eq_ignore_ascii_case("upgrade") {
                            upgrade_named = true;
                            return false;
                        }
                        !n.eq_ignore_ascii_case("close") && !n.eq_ignore_ascii_case("keep-alive")
                    })
                    .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok()),
            );
        }
    }
    let mut upgrade = None;
    for (name, _) in HOP_BY_HOP
        .iter()
        .zip(present)
        .skip(1)
        .filter(|(_, here)| *here)
    {
        let removed = headers.remove(name);
        if *name == header::UPGRADE {
            upgrade = removed;
        }
    }
    for name in &named {
        headers.remove(name);
    }
    // TE survives only as "trailers" (gRPC needs it).
    if te
        && headers
            .get(header::TE)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
    upgrade.filter(|_| upgrade_named)
}

/// This hop's own headers for a switch to `protocols` (the ones the last
/// hop sent were stripped with the other hop-by-hop headers).
fn set_upgrade(headers: &mut HeaderMap, protocols: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocols);
}

/// Does an `Upgrade` value name h2c? That switch is not passed on: the
/// connection would carry HTTP/2 past the proxy's per-request routing,
/// and the proxy speaks h2c to clients itself (as Envoy strips it).
fn names_h2c(protocols: &HeaderValue) -> bool {
    protocols
        .as_bytes()
        .split(|b| *b == b',')
        .any(|p| p.trim_ascii().eq_ignore_ascii_case(b"h2c"))
}

/// What a [`Balancer::Hash`] service hashes for this request; the client's
/// IP when the header or cookie is missing.
fn balance_key(policy: &Policy, headers: &HeaderMap, client: SocketAddr) -> u64 {
    let found = match &policy.hash_key {
        HashKey::ClientIp => None,
        HashKey::Header(name) => headers.get(name.as_str()).map(|v| hash_key(v.as_bytes())),
        HashKey::Cookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| hash_key(v.as_bytes())),
    };
    found.unwrap_or_else(|| hash_ip(client.ip()))
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
    client: SocketAddr,
) {
    if backend.shared.access_log {
        tracing::info!(
            target: "signpost::access",
            service = %backend.name,
            %client,
            %method,
            path,
            status = status.as_u16(),
            instance,
            attempts,
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_scoped_headers_are_not_forwarded() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
        let mut grpc = HeaderMap::new();
        grpc.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut grpc);
        assert!(grpc.contains_key(header::TE));
    }

    #[test]
    fn hop_by_hop_names_are_found_by_text() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop(name), Some(i), "{name}");
        }
        assert_eq!(hop_by_hop(&header::TE), None);
        assert_eq!(hop_by_hop(&header::HOST), None);
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("x-a"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-b"),
        );
        for name in [
            "x-a",
            "x-b",
            "keep-alive",
            "upgrade",
            "proxy-authorization",
            "x-kept",
        ] {
            h.insert(name, HeaderValue::from_static("1"));
        }
        // An Upgrade header that Connection does not name asks for nothing.
        assert_eq!(strip_hop_by_hop(&mut h), None);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn a_switch_of_protocols_is_found_and_h2c_told_apart() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("sec-websocket-key", HeaderValue::from_static("k"));
        assert_eq!(
            strip_hop_by_hop(&mut h),
            Some(HeaderValue::from_static("websocket"))
        );
        assert_eq!(h.keys().collect::<Vec<_>>(), ["sec-websocket-key"]);
        assert!(names_h2c(&HeaderValue::from_static("foo, H2C")));
        assert!(!names_h2c(&HeaderValue::from_static("websocket")));
    }

    #[test]
    fn attempt_numbers_are_written_in_decimal() {
        for n in [1, 2, 4, 5, 12] {
            assert_eq!(attempt_value(n), n.to_string().as_str());
        }
    }

    #[test]
    fn only_safe_methods_are_idempotent() {
        assert!(is_idempotent(&Method::GET));
        assert!(is_idempotent(&Method::PUT));
        assert!(!is_idempotent(&Method::POST));
        assert!(!is_idempotent(&Method::PATCH));
    }
}
