//! Before the first attempt: what answers or refuses a request without
//! an instance (an operator's route rule or degraded service, the rate
//! limit, the circuit breaker), then the request made ready to be sent
//! any number of times: this hop's headers, the body kept when it may be
//! sent again, the balancing key.

use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Incoming};
use signpost_core::model::Protocol;
use signpost_core::policy::{Balancer, Degraded, Policy};
use tokio::time::Instant;

use super::headers::{attempt_value, balance_key, names_h2c, set_upgrade, strip_hop_by_hop};
use super::{ATTEMPT_HEADER, AnswerBody, fallback_response};
use crate::backend::Backend;
use crate::body::{MAX_KEPT, Payload};
use crate::error::ProxyError;

/// A request ready for its attempts.
pub(super) struct Prepared {
    pub(super) method: Method,
    pub(super) path: PathAndQuery,
    /// The headers every attempt clones, the attempt header included (a
    /// clone, made to its length, never grows: later attempts only
    /// replace its value).
    pub(super) headers: HeaderMap,
    /// The client sent a Host header (or the request's authority became
    /// one); otherwise each attempt names its instance.
    pub(super) has_host: bool,
    pub(super) payload: Payload,
    /// What a hash balancer hashes.
    pub(super) key: Option<u64>,
    /// The instances speak HTTP/2.
    pub(super) http2: bool,
    /// The client asks to switch protocols (a WebSocket) and may.
    pub(super) upgrading: bool,
    /// Safe to send again once its body went out.
    pub(super) idempotent: bool,
    /// This proxy retries: the service allows retries and no proxy
    /// before this one retries already.
    pub(super) retry_here: bool,
    /// Where the client connects from: which local service calls, for
    /// the mesh.
    pub(super) client: std::net::IpAddr,
}

/// An operator's answer, or a refusal, before any instance is asked:
/// `Ok(None)` lets the request through.
pub(super) fn admit(
    backend: &Backend,
    policy: &Policy,
    req: &Request<Incoming>,
    now: Instant,
) -> Result<Option<Response<AnswerBody>>, ProxyError> {
    if let Some(fallback) = backend.route_check(policy, req.method().as_str(), req.uri().path())? {
        return Ok(Some(fallback_response(backend, &fallback)));
    }
    if let Some(answer) = degraded(backend, &policy.overlay.degraded)? {
        return Ok(Some(answer));
    }
    backend.within_rate(policy, now)?;
    backend.through_circuit(policy, now)?;
    Ok(None)
}

/// What a degraded service or instance answers: an error, the operator's
/// fallback, or `None` when it is not degraded.
pub(super) fn degraded(
    backend: &Backend,
    degraded: &Degraded,
) -> Result<Option<Response<AnswerBody>>, ProxyError> {
    match degraded {
        Degraded::No => Ok(None),
        Degraded::FailFast => Err(ProxyError::Degraded),
        Degraded::Fallback(fallback) => Ok(Some(fallback_response(backend, fallback))),
    }
}

/// The request made ready for its attempts. Reads a small body whole
/// when it may be sent again. Not an `async fn`, for the reason
/// `forward` is not.
#[allow(clippy::manual_async_fn)]
pub(super) fn prepare(
    policy: &Policy,
    protocol: Protocol,
    req: Request<Incoming>,
    client: SocketAddr,
    can_upgrade: bool,
) -> impl Future<Output = Result<Prepared, ProxyError>> + '_ {
    async move {
        let idempotent = policy.retry.non_idempotent || is_idempotent(req.method());
        let (parts, body) = req.into_parts();
        let mut headers = parts.headers;
        let key =
            (policy.balancer == Balancer::Hash).then(|| balance_key(policy, &headers, client));
        let http2 = matches!(protocol, Protocol::Http2 | Protocol::Grpc);
        // A switch of protocols (a WebSocket) goes on to an HTTP/1.1
        // instance, with this hop's own two headers.
        let upgrade = strip_hop_by_hop(&mut headers)
            .filter(|protocols| can_upgrade && !http2 && !names_h2c(protocols));
        let upgrading = upgrade.is_some();
        if let Some(protocols) = upgrade {
            set_upgrade(&mut headers, protocols);
        }
        // What the attempt header replaces says whether a proxy before
        // this one retries already.
        let marked = headers.insert(ATTEMPT_HEADER, attempt_value(1)).is_some();
        let retry_here = policy.retry.retries > 0 && !marked;
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
        let payload = if body.is_end_stream() {
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
        Ok(Prepared {
            method: parts.method,
            path,
            headers,
            has_host,
            payload,
            key,
            http2,
            upgrading,
            idempotent,
            retry_here,
            client: client.ip(),
        })
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_safe_methods_are_idempotent() {
        assert!(is_idempotent(&Method::GET));
        assert!(is_idempotent(&Method::PUT));
        assert!(!is_idempotent(&Method::POST));
        assert!(!is_idempotent(&Method::PATCH));
    }
}
