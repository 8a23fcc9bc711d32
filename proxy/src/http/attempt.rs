//! One attempt: the prepared request sent to one instance under the
//! try's time limit, the outcome counted against the instance, and what
//! came of it: an answer, a failure another instance may be tried for,
//! or an end to the request.

use std::future::Future;

use http::header::{self, HeaderValue};
use http::uri::{self, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::Either;
use tokio::time::Instant;

use super::ATTEMPT_HEADER;
use super::AnswerBody;
use super::headers::{attempt_value, set_upgrade, strip_hop_by_hop};
use super::prepare::{Prepared, degraded};
use crate::backend::{Backend, Snapshot};
use crate::body::ProxyBody;
use crate::endpoint::Member;
use crate::error::ProxyError;
use crate::pool::{Answer, Pool, PoolError, Via};

/// What one attempt came to, short of an end to the request.
pub(super) enum Sent {
    /// The instance answered (any status).
    Answer(Response<Answer>),
    /// The instance did not answer: counted against it; the request may
    /// go to another.
    Failed(ProxyError),
}

/// What an operator set for this one instance of the service: its
/// fallback, a refusal, or `None` to go on.
pub(super) fn scoped(
    backend: &Backend,
    snapshot: &Snapshot,
    member: &Member,
    now: Instant,
) -> Result<Option<Response<AnswerBody>>, ProxyError> {
    let Some(scoped) = snapshot.policy.overlay.instances.get(&member.endpoint.addr) else {
        return Ok(None);
    };
    if let Some(answer) = degraded(backend, &scoped.degraded)? {
        return Ok(Some(answer));
    }
    if !member.stats.limiter.allow(scoped.rate_limit, now) {
        return Err(ProxyError::RateLimited);
    }
    Ok(None)
}

/// Sends attempt number `attempt` (from 0) to `member`, started at
/// `started`, within the try timeout and the request's `deadline`. An
/// `Err` ends the request: the client's body failed, or the deadline
/// passed. Not an `async fn`, for the reason `forward` is not.
#[allow(clippy::manual_async_fn, clippy::too_many_arguments)]
pub(super) fn send<'f>(
    backend: &'f Backend,
    snapshot: &'f Snapshot,
    pool: &'f Pool,
    member: &'f Member,
    prepared: &'f mut Prepared,
    body: ProxyBody,
    attempt: u32,
    (started, deadline): (Instant, Instant),
) -> impl Future<Output = Result<Sent, ProxyError>> + 'f {
    async move {
        let policy = &snapshot.policy;
        let request = request(prepared, member, body, attempt)?;
        let limit = match policy.try_timeout {
            Some(t) => (started + t).min(deadline),
            None => deadline,
        };
        let caller = match &member.endpoint.mesh {
            None => None,
            Some(_) => Some(
                backend
                    .shared
                    .mesh
                    .load()
                    .caller(prepared.client)
                    .map_err(ProxyError::NoIdentity)?,
            ),
        };
        let via = member
            .endpoint
            .mesh
            .as_ref()
            .zip(caller.as_deref())
            .map(|(hop, caller)| Via {
                hop,
                caller,
                metrics: &backend.shared.metrics,
            });
        let in_flight = member.stats.in_flight();
        let answered = tokio::time::timeout_at(
            limit,
            pool.request(member.endpoint.addr, &member.stats, request, via),
        )
        .await;
        drop(in_flight);
        let answered_at = Instant::now();
        let rtt = answered_at - started;
        let error = match answered {
            Ok(Ok(response)) => {
                if response.status().is_server_error() {
                    backend.failed(snapshot, member, rtt);
                } else {
                    backend.succeeded(member, rtt, answered_at);
                }
                member.stats.statuses.count(response.status().as_u16());
                return Ok(Sent::Answer(response));
            }
            Ok(Err(PoolError::Connect { reason, request })) => {
                prepared.payload.unsent(request.into_body());
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
                    && std::error::Error::source(&e).is_some_and(|s| s.is::<hyper::Error>()) =>
            {
                return Err(ProxyError::ClientBody(signpost_core::error_chain(&e)));
            }
            Ok(Err(PoolError::Http(e))) => ProxyError::Reset {
                addr: member.label.clone(),
                reason: signpost_core::error_chain(&e),
            },
            Err(_) if answered_at >= deadline => {
                backend.failed(snapshot, member, rtt);
                return Err(ProxyError::Timeout(policy.timeout));
            }
            Err(_) => ProxyError::TryTimeout {
                addr: member.label.clone(),
                timeout: policy.try_timeout.unwrap_or(policy.timeout),
            },
        };
        backend.failed(snapshot, member, rtt);
        Ok(Sent::Failed(error))
    }
}

/// The request for one attempt: the prepared method, headers and path,
/// addressed to `member`.
fn request(
    prepared: &Prepared,
    member: &Member,
    body: ProxyBody,
    attempt: u32,
) -> Result<Request<ProxyBody>, ProxyError> {
    let mut request = Request::new(body);
    *request.method_mut() = prepared.method.clone();
    *request.headers_mut() = prepared.headers.clone();
    let headers = request.headers_mut();
    if attempt > 0 {
        headers.insert(ATTEMPT_HEADER, attempt_value(attempt + 1));
    }
    // HTTP/2 names the instance in the URI (`:authority`); HTTP/1.1
    // sends the origin-form and a Host header. Between hosts of the mesh
    // it is always HTTP/2, which has no protocol switch.
    let mut target = uri::Parts::default();
    if member.endpoint.mesh.is_some() {
        headers.remove(header::UPGRADE);
        headers.remove(header::CONNECTION);
    }
    if prepared.http2 || member.endpoint.mesh.is_some() {
        *request.version_mut() = Version::HTTP_2;
        target.scheme = Some(Scheme::HTTP);
        target.authority = Some(member.authority.clone());
    } else if !prepared.has_host
        && let Ok(host) = HeaderValue::from_str(member.authority.as_str())
    {
        headers.insert(header::HOST, host);
    }
    target.path_and_query = Some(prepared.path.clone());
    *request.uri_mut() = Uri::from_parts(target)
        .map_err(|e| ProxyError::ClientBody(format!("bad request target: {e}")))?;
    Ok(request)
}

/// An instance's answer made the client's: without its hop-by-hop
/// headers, and with this hop's own when it switches protocols (the
/// connection then becomes a tunnel, see `serve`), which only a request
/// that asked to may.
pub(super) fn answer(
    response: Response<Answer>,
    member: &Member,
    upgrading: bool,
) -> Result<Response<AnswerBody>, ProxyError> {
    let mut response = response.map(Either::Right);
    let switched = strip_hop_by_hop(response.headers_mut());
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(protocols) = switched.filter(|_| upgrading) else {
            return Err(ProxyError::Upgrade {
                addr: member.label.clone(),
            });
        };
        set_upgrade(response.headers_mut(), protocols);
    }
    Ok(response)
}
