//! The request path from admission to answer: prepare the request, then
//! attempt instances one after another. This file decides whether a
//! failed attempt is tried again: the service's `retries`, a proxy before
//! this one that retries already (the attempt header), whether the
//! request is safe to repeat and its body can be sent again, the retry
//! budget, and the full-jitter back-off, all within one overall deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use signpost_core::policy::Policy;
use tokio::time::Instant;

use super::AnswerBody;
use super::attempt::{self, Sent};
use super::prepare::{admit, prepare};
use crate::backend::{Backend, Snapshot};
use crate::error::ProxyError;

/// Forwards a request: the answer and the instance that gave it (`""`
/// for the proxy's own). Counts the attempts made in `attempts`, and
/// sets `admitted` once the request passed the circuit breaker (its
/// outcome then counts for the breaker).
///
/// Not an `async fn`: one of those keeps each argument twice in its
/// state (the argument, and the local it is moved to), and this state is
/// moved with every request.
#[allow(clippy::manual_async_fn)]
pub(super) fn forward<'s: 'f, 'f>(
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
        if let Some(answer) = admit(backend, policy, &req, started)? {
            return Ok((answer, ""));
        }
        *admitted = true;
        let _permit = backend.admit_request(policy, deadline).await?;
        let mut prepared = prepare(policy, snapshot.protocol, req, client, can_upgrade).await?;

        backend.deposit();
        // The first try starts now, with the body read and a slot taken.
        let ready = Instant::now();
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last: Option<ProxyError> = None;
        for attempt in 0..=policy.retry.retries {
            if attempt > 0 {
                if !backend.withdraw() {
                    break;
                }
                backoff(policy, attempt, deadline).await;
            }
            let Some(body) = prepared.payload.next() else {
                break;
            };
            let try_started = if attempt == 0 { ready } else { Instant::now() };
            let Some(pick) = backend.pick(snapshot, &tried, prepared.key, try_started) else {
                return Err(last.unwrap_or(ProxyError::NoInstance));
            };
            let member = &snapshot.members[pick.index];
            if let Some(answer) = attempt::scoped(backend, snapshot, member, try_started)? {
                return Ok((answer, &member.label));
            }
            *attempts = attempt + 1;
            let times = (try_started, deadline);
            let sent = attempt::send(
                backend,
                snapshot,
                pool,
                member,
                &mut prepared,
                body,
                attempt,
                times,
            );
            let error = match sent.await? {
                Sent::Answer(response) => {
                    // A 503 is the instance saying it cannot serve now:
                    // another may, if the request can be sent again.
                    let again = response.status() == StatusCode::SERVICE_UNAVAILABLE
                        && prepared.idempotent
                        && prepared.retry_here
                        && attempt < policy.retry.retries
                        && prepared.payload.can_resend();
                    if !again {
                        let response = attempt::answer(response, member, prepared.upgrading)?;
                        return Ok((response, &member.label));
                    }
                    ProxyError::Unavailable {
                        addr: member.label.clone(),
                    }
                }
                Sent::Failed(error) => error,
            };
            tracing::debug!(service = %backend.name, instance = %member.label, attempt = attempt + 1, %error, "attempt failed");
            let again = error.retryable(prepared.idempotent)
                && prepared.retry_here
                && prepared.payload.can_resend();
            // Only a retry looks at what was tried: no allocation until then.
            tried.push(member.endpoint.addr);
            last = Some(error);
            if !again {
                break;
            }
        }
        Err(last.unwrap_or(ProxyError::NoInstance))
    }
}

/// Full-jitter exponential back-off, never past the deadline.
async fn backoff(policy: &Policy, attempt: u32, deadline: Instant) {
    let cap = policy
        .retry
        .backoff
        .saturating_mul(1 << (attempt - 1).min(16))
        .min(policy.retry.backoff_max);
    if cap.is_zero() {
        return;
    }
    let wait = Duration::from_secs_f64(rand::random::<f64>() * cap.as_secs_f64());
    tokio::time::sleep_until((Instant::now() + wait).min(deadline)).await;
}
