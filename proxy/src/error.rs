//! Why the proxy failed a request or a connection, classified the way
//! pingora does: who caused it, whether another instance may be tried,
//! and what the client gets (status and `x-signpost-error` reason).

use std::time::Duration;

use http::StatusCode;

/// Who a failure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client (a broken request body).
    Client,
    /// The instance (refused, reset, too slow).
    Upstream,
    /// The proxy's own policy (a limit, no instance left).
    Proxy,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no available instance")]
    NoInstance,
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("{addr} did not answer within the per-try timeout of {timeout:?}")]
    TryTimeout { addr: String, timeout: Duration },
    #[error("no answer within the request timeout of {0:?}")]
    Timeout(Duration),
    #[error("{addr} closed the connection before answering: {reason}")]
    Reset { addr: String, reason: String },
    #[error("{addr} answered 503")]
    Unavailable { addr: String },
    #[error("{addr} switched protocols, which the request did not ask for")]
    Upgrade { addr: String },
    #[error("the circuit is open")]
    CircuitOpen,
    #[error("the service is degraded by an operator")]
    Degraded,
    #[error("over the operator's rate limit")]
    RateLimited,
    #[error("{limit} reached ({value})")]
    Limit { limit: &'static str, value: u32 },
    #[error("cannot read the request body: {0}")]
    ClientBody(String),
    /// A meshed service was called from a connection whose local service
    /// (the caller's identity) cannot be told, or has no certificate yet.
    #[error("no mesh identity to call with: {0}")]
    NoIdentity(String),
}

/// Every [`ProxyError::reason`], for dropping a service's series.
pub(crate) const REASONS: [&str; 15] = [
    "no_instance",
    "circuit_open",
    "degraded",
    "rate_limited",
    "connect_failed",
    "try_timeout",
    "timeout",
    "upstream_reset",
    "upstream_unavailable",
    "upstream_upgrade",
    "max_connections",
    "max_pending",
    "max_requests",
    "client_body",
    "no_identity",
];

impl ProxyError {
    pub fn origin(&self) -> Origin {
        match self {
            ProxyError::NoInstance
            | ProxyError::CircuitOpen
            | ProxyError::Degraded
            | ProxyError::RateLimited
            | ProxyError::Limit { .. }
            | ProxyError::NoIdentity(_)
            | ProxyError::Timeout(_) => Origin::Proxy,
            ProxyError::Connect { .. }
            | ProxyError::TryTimeout { .. }
            | ProxyError::Reset { .. }
            | ProxyError::Unavailable { .. }
            | ProxyError::Upgrade { .. } => Origin::Upstream,
            ProxyError::ClientBody(_) => Origin::Client,
        }
    }

    /// May the request go to another instance? A connection that was
    /// never made is always safe to retry; anything the instance may
    /// have acted on only for requests that are safe to repeat.
    pub fn retryable(&self, idempotent: bool) -> bool {
        match self {
            ProxyError::Connect { .. } => true,
            ProxyError::TryTimeout { .. }
            | ProxyError::Reset { .. }
            | ProxyError::Unavailable { .. } => idempotent,
            ProxyError::NoInstance
            | ProxyError::CircuitOpen
            | ProxyError::Degraded
            | ProxyError::RateLimited
            | ProxyError::Timeout(_)
            | ProxyError::Limit { .. }
            | ProxyError::Upgrade { .. }
            | ProxyError::NoIdentity(_)
            | ProxyError::ClientBody(_) => false,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoInstance
            | ProxyError::CircuitOpen
            | ProxyError::Degraded
            | ProxyError::Connect { .. }
            | ProxyError::Unavailable { .. }
            | ProxyError::NoIdentity(_)
            | ProxyError::Limit { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::TryTimeout { .. } | ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Reset { .. } | ProxyError::Upgrade { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The `x-signpost-error` value and metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::NoInstance => "no_instance",
            ProxyError::CircuitOpen => "circuit_open",
            ProxyError::Degraded => "degraded",
            ProxyError::RateLimited => "rate_limited",
            ProxyError::Connect { .. } => "connect_failed",
            ProxyError::TryTimeout { .. } => "try_timeout",
            ProxyError::Timeout(_) => "timeout",
            ProxyError::Reset { .. } => "upstream_reset",
            ProxyError::Unavailable { .. } => "upstream_unavailable",
            ProxyError::Upgrade { .. } => "upstream_upgrade",
            ProxyError::Limit { limit, .. } => limit,
            ProxyError::ClientBody(_) => "client_body",
            ProxyError::NoIdentity(_) => "no_identity",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_connect_failure_is_retried_for_any_method() {
        let connect = ProxyError::Connect {
            addr: "a".into(),
            reason: "refused".into(),
        };
        assert!(connect.retryable(false));
        assert_eq!(connect.status(), StatusCode::SERVICE_UNAVAILABLE);
        let reset = ProxyError::Reset {
            addr: "a".into(),
            reason: "eof".into(),
        };
        assert!(!reset.retryable(false));
        assert!(reset.retryable(true));
        assert_eq!(reset.status(), StatusCode::BAD_GATEWAY);
        let limit = ProxyError::Limit {
            limit: "max_requests",
            value: 1,
        };
        assert!(!limit.retryable(true));
        assert_eq!(limit.origin(), Origin::Proxy);
        assert_eq!(limit.reason(), "max_requests");
    }

    #[test]
    fn every_reason_is_listed() {
        let (addr, reason) = (String::new(), String::new());
        let mut errors = vec![
            ProxyError::NoInstance,
            ProxyError::CircuitOpen,
            ProxyError::Degraded,
            ProxyError::RateLimited,
            ProxyError::Connect {
                addr: addr.clone(),
                reason: reason.clone(),
            },
            ProxyError::TryTimeout {
                addr: addr.clone(),
                timeout: Duration::ZERO,
            },
            ProxyError::Timeout(Duration::ZERO),
            ProxyError::Reset {
                addr: addr.clone(),
                reason,
            },
            ProxyError::Unavailable { addr: addr.clone() },
            ProxyError::Upgrade { addr },
            ProxyError::ClientBody(String::new()),
            ProxyError::NoIdentity(String::new()),
        ];
        // The limits the proxy enforces.
        for limit in ["max_connections", "max_pending", "max_requests"] {
            errors.push(ProxyError::Limit { limit, value: 1 });
        }
        let mut reasons: Vec<&str> = errors.iter().map(ProxyError::reason).collect();
        let mut listed = REASONS.to_vec();
        reasons.sort_unstable();
        listed.sort_unstable();
        assert_eq!(reasons, listed);
    }
}
