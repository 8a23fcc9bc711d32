//! The proxy's per-service traffic policy: timeouts, retries, limits,
//! balancer, panic threshold, zone preference, outlier ejection, blocked
//! instances and a forced circuit state.
//!
//! [`Policy`] is the resolved form the proxy reads on every request; a
//! [`PolicyOverride`] (every field optional) is what the agent's
//! `proxy.defaults` / `proxy.services` and operator `policy` commands say,
//! applied over the defaults with [`Policy::apply`]. Defaults follow the
//! anchors in `shared/reference/data-plane.md` (Envoy's limits and panic
//! threshold, Linkerd's retry budget and body buffer, HAProxy's connect
//! retries).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::Protocol;

/// How the proxy picks an instance for a connection or request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balancer {
    /// Power of two choices over peak-EWMA latency × in-flight load
    /// (Linkerd's default).
    #[default]
    P2cEwma,
    /// Weighted round robin.
    RoundRobin,
    /// Consistent hash (rendezvous) of [`Policy::hash_key`], so one key
    /// keeps reaching one instance while the set is stable.
    Hash,
}

impl Balancer {
    pub fn as_str(self) -> &'static str {
        match self {
            Balancer::P2cEwma => "p2c_ewma",
            Balancer::RoundRobin => "round_robin",
            Balancer::Hash => "hash",
        }
    }
}

/// A service's circuit as an operator sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Circuit {
    /// Requests and connections flow.
    #[default]
    Closed,
    /// Every request and connection fails at once, without reaching an
    /// instance.
    Open,
}

/// Whether an operator degraded a service, a route or an instance, and
/// how its requests are answered then.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Degraded {
    /// Not degraded: requests go to the instances.
    #[default]
    No,
    /// Requests fail fast with 503 (`degraded`).
    FailFast,
    /// Requests are answered with the operator's fallback.
    Fallback(Fallback),
}

impl From<Option<Fallback>> for Degraded {
    /// What a `degrade` command sets: its fallback, or failing fast.
    fn from(fallback: Option<Fallback>) -> Self {
        fallback.map_or(Degraded::FailFast, Degraded::Fallback)
    }
}

/// What the proxy answers for a degraded service instead of calling it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fallback {
    pub status: u16,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: String,
}

/// A rate limit this agent applies: a token bucket of `burst` requests
/// (L7) or connections (L4), refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

/// Requests a route-scoped command applies to: a method (any if `None`)
/// and a path prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    pub path_prefix: String,
}

impl Route {
    pub fn matches(&self, method: &str, path: &str) -> bool {
        self.method
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(method))
            && path.starts_with(&self.path_prefix)
    }

    /// The first rule this route breaks.
    pub fn check(&self) -> Result<(), String> {
        if !self.path_prefix.starts_with('/') {
            return Err(format!(
                "path_prefix {:?} must start with /",
                self.path_prefix
            ));
        }
        if let Some(m) = &self.method
            && (m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()))
        {
            return Err(format!("method {m:?} must be an HTTP method such as GET"));
        }
        Ok(())
    }
}

/// What applies to the requests of one route, over the service's policy.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutePolicy {
    pub route: Route,
    pub degraded: Degraded,
    pub circuit: Option<Circuit>,
    pub rate_limit: Option<RateLimit>,
}

/// What applies to the requests one instance would get (set by
/// instance-scoped commands).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct InstancePolicy {
    /// Answered with the fallback, or 503, instead of calling the
    /// instance.
    pub degraded: Degraded,
    pub rate_limit: Option<RateLimit>,
}

/// What a [`Balancer::Hash`] service hashes on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HashKey {
    /// The client's IP address (the only key for L4 services).
    #[default]
    ClientIp,
    /// A request header, by name (lowercase).
    Header(String),
    /// A cookie, by name.
    Cookie(String),
}

impl FromStr for HashKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} must be client_ip, header:<name> or cookie:<name>");
        match s.split_once(':') {
            None if s == "client_ip" => Ok(HashKey::ClientIp),
            Some(("header", name)) if !name.is_empty() && http_token(name) => {
                Ok(HashKey::Header(name.to_ascii_lowercase()))
            }
            Some(("cookie", name)) if !name.is_empty() && http_token(name) => {
                Ok(HashKey::Cookie(name.to_string()))
            }
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashKey::ClientIp => f.write_str("client_ip"),
            HashKey::Header(name) => write!(f, "header:{name}"),
            HashKey::Cookie(name) => write!(f, "cookie:{name}"),
        }
    }
}

impl Serialize for HashKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HashKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

fn http_token(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Everything the proxy needs to know about how to treat one service,
/// grouped by concern in memory; the YAML keys ([`PolicyOverride`]) are
/// flat.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// `None`: what the instances registered (the first one's protocol).
    pub protocol: Option<Protocol>,
    pub balancer: Balancer,
    pub hash_key: HashKey,
    /// Establishing a connection to an instance.
    pub connect_timeout: Duration,
    /// One attempt of an HTTP request, up to the response's headers;
    /// `None`: only the overall `timeout` applies.
    pub try_timeout: Option<Duration>,
    /// The whole HTTP request up to the response's headers, retries
    /// included.
    pub timeout: Duration,
    /// An L4 connection that carries nothing either way for this long is
    /// closed (`None`: never; database pools keep idle connections for
    /// hours, so it is off unless a service asks for it).
    pub idle_timeout: Option<Duration>,
    /// Below this share of available instances, balance over all of them
    /// (a bad detector or stale health must not concentrate the load).
    pub panic_threshold: f64,
    /// Prefer instances in the agent's zone...
    pub zone_aware: bool,
    /// ...while at least this share of them is available.
    pub zone_min_available: f64,
    /// Traffic shares by instance tag (a canary: `{v1: 95, v2: 5}`):
    /// each request or connection first picks a tag by these weights
    /// among the tags with available instances, then an instance with
    /// it. Empty: every instance.
    pub tag_weights: BTreeMap<String, u32>,
    pub retry: RetryPolicy,
    pub limits: Limits,
    pub ejection: Ejection,
    pub breaker: BreakerPolicy,
    pub overlay: Overlay,
}

/// When a failed HTTP request is tried again (YAML: `retries`,
/// `retry_*`).
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (each to another instance when
    /// there is one).
    pub retries: u32,
    /// Retries allowed as a share of requests, over 10 s...
    pub budget_ratio: f32,
    /// ...plus this many per second.
    pub budget_min_per_second: u32,
    /// Retry POST/PATCH and other non-idempotent methods too.
    pub non_idempotent: bool,
    /// Full-jitter exponential back-off between retries: the first wait is
    /// at most `backoff`, each later one doubles, up to `backoff_max`.
    pub backoff: Duration,
    pub backoff_max: Duration,
}

/// How much a service takes at once (YAML: `max_*`).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Client connections open at once (L4 and L7).
    pub max_connections: u32,
    /// HTTP requests in flight to the instances at once.
    pub max_requests: u32,
    /// HTTP requests waiting for a `max_requests` slot; beyond that they
    /// fail at once.
    pub max_pending: u32,
}

/// Passive outlier ejection (YAML: `eject_*`).
#[derive(Debug, Clone, PartialEq)]
pub struct Ejection {
    /// Consecutive failures (connect errors, 5xx, timeouts) that eject an
    /// instance; 0 turns ejection off.
    pub after: u32,
    /// First ejection; each further one doubles, up to `max`.
    pub base: Duration,
    pub max: Duration,
    /// Never eject more than this share of a service's instances (at least
    /// one may always be).
    pub max_share: f64,
}

/// The automatic circuit breaker (YAML: `breaker_*`).
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerPolicy {
    /// Open the circuit after this many failed requests in a row (0: no)...
    pub failures: u32,
    /// ...or when this share of requests failed (0: no) within `window`,
    /// once there were `min_requests`.
    pub error_rate: f64,
    pub min_requests: u32,
    pub window: Duration,
    /// How long it stays open before probe requests are let through.
    pub open_for: Duration,
    /// Probe requests that must succeed to close it again.
    pub probes: u32,
}

/// What operators set over the configured policy: blocked instances and a
/// forced circuit (also YAML keys), and what only commands set.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Overlay {
    /// Instances (`ip:port`) that get no new connections or requests,
    /// whatever their health; requests in flight finish.
    pub blocked: Vec<SocketAddr>,
    /// An operator's forced circuit state; `None`: the automatic breaker
    /// decides (when `breaker_failures` or `breaker_error_rate` is set).
    pub circuit: Option<Circuit>,
    /// Degraded: every request is answered with the fallback, or 503,
    /// without calling the service.
    pub degraded: Degraded,
    /// Beyond this rate, requests get 429 and connections are closed.
    pub rate_limit: Option<RateLimit>,
    /// Route-scoped commands (HTTP only); the longest matching prefix
    /// wins.
    pub routes: Vec<RoutePolicy>,
    /// Instance-scoped commands, by instance.
    pub instances: BTreeMap<SocketAddr, InstancePolicy>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            protocol: None,
            balancer: Balancer::P2cEwma,
            hash_key: HashKey::ClientIp,
            connect_timeout: Duration::from_secs(1),
            try_timeout: None,
            timeout: Duration::from_secs(15),
            idle_timeout: None,
            panic_threshold: 0.5,
            zone_aware: true,
            zone_min_available: 0.5,
            tag_weights: BTreeMap::new(),
            retry: RetryPolicy {
                retries: 2,
                budget_ratio: 0.2,
                budget_min_per_second: 10,
                non_idempotent: false,
                backoff: Duration::from_millis(25),
                backoff_max: Duration::from_millis(250),
            },
            limits: Limits {
                max_connections: 1024,
                max_requests: 1024,
                max_pending: 1024,
            },
            ejection: Ejection {
                after: 5,
                base: Duration::from_secs(1),
                max: Duration::from_secs(60),
                max_share: 0.5,
            },
            breaker: BreakerPolicy {
                failures: 0,
                error_rate: 0.0,
                min_requests: 20,
                window: Duration::from_secs(10),
                open_for: Duration::from_secs(30),
                probes: 1,
            },
            overlay: Overlay::default(),
        }
    }
}

/// A partial [`Policy`], as written in `proxy.defaults` and
/// `proxy.services`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyOverride {
    pub protocol: Option<Protocol>,
    pub balancer: Option<Balancer>,
    pub hash_key: Option<HashKey>,
    #[serde(with = "crate::duration::serde_go_opt")]
    pub connect_timeout: Option<Duration>,
    #[serde(with = "crate::duration::serde_go_opt")]
    pub try_timeout: Option<Duration>,
    #[serde(with = "crate::duration::serde_go_opt")]
    pub timeout: Option<Duration>,
    #[serde(with = "crate::duration::serde_go_opt")]
    pub idle_timeout: Option<Duration>,
    pub retries: Option<u32>,
    pub retry_budget_ratio: Option<f32>,
    pub retry_budget_min_per_second: Option<u32>,
    pub retry_non_idempotent: Option<bool>,
    #[serde(with = "crate::duration::serde_go_opt")]
    pub retry_backoff: Option<Duration>,
    #[serde(with = "crate::duration::serde_go_opt")]
    pub retry_backoff_max: Option<Duration>,
    pub max_connections: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_pending: Option<u32>,
    pub panic_threshold: Option<f64>,
    pub zone_aware: Option<bool>,
    pub zone_min_available: Option<f64>,
    pub eject_after: Option<u32>,
    #[serde(with = "crate::duration::serde_go_opt")]
    pub eject_base: Option<Duration>,
    #[serde(with = "crate::duration::serde_go_opt")]
    pub eject_max: Option<Duration>,
    pub eject_max_share: Option<f64>,
    pub blocked: Option<Vec<SocketAddr>>,
    pub circuit: Option<Circuit>,
    pub breaker_failures: Option<u32>,
    pub breaker_error_rate: Option<f64>,
    pub breaker_min_requests: Option<u32>,
    #[serde(with = "crate::duration::serde_go_opt")]
    pub breaker_window: Option<Duration>,
    #[serde(with = "crate::duration::serde_go_opt")]
    pub breaker_open_for: Option<Duration>,
    pub breaker_probes: Option<u32>,
    pub tag_weights: Option<BTreeMap<String, u32>>,
}

impl Policy {
    /// The route-scoped policy for a request, if one matches.
    pub fn route(&self, method: &str, path: &str) -> Option<&RoutePolicy> {
        self.overlay
            .routes
            .iter()
            .filter(|r| r.route.matches(method, path))
            .max_by_key(|r| (r.route.path_prefix.len(), r.route.method.is_some()))
    }

    /// This policy with what `o` sets replacing its values.
    pub fn apply(&self, o: &PolicyOverride) -> Policy {
        let p = self.clone();
        let (r, l, e, b) = (p.retry, p.limits, p.ejection, p.breaker);
        // Zero turns a timeout that may be off, off.
        let off_at_zero = |set: Option<Duration>, was| match set {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None => was,
        };
        Policy {
            protocol: o.protocol.or(p.protocol),
            balancer: o.balancer.unwrap_or(p.balancer),
            hash_key: o.hash_key.clone().unwrap_or(p.hash_key),
            connect_timeout: o.connect_timeout.unwrap_or(p.connect_timeout),
            try_timeout: off_at_zero(o.try_timeout, p.try_timeout),
            timeout: o.timeout.unwrap_or(p.timeout),
            idle_timeout: off_at_zero(o.idle_timeout, p.idle_timeout),
            panic_threshold: o.panic_threshold.unwrap_or(p.panic_threshold),
            zone_aware: o.zone_aware.unwrap_or(p.zone_aware),
            zone_min_available: o.zone_min_available.unwrap_or(p.zone_min_available),
            tag_weights: o.tag_weights.clone().unwrap_or(p.tag_weights),
            retry: RetryPolicy {
                retries: o.retries.unwrap_or(r.retries),
                budget_ratio: o.retry_budget_ratio.unwrap_or(r.budget_ratio),
                budget_min_per_second: o
                    .retry_budget_min_per_second
                    .unwrap_or(r.budget_min_per_second),
                non_idempotent: o.retry_non_idempotent.unwrap_or(r.non_idempotent),
                backoff: o.retry_backoff.unwrap_or(r.backoff),
                backoff_max: o.retry_backoff_max.unwrap_or(r.backoff_max),
            },
            limits: Limits {
                max_connections: o.max_connections.unwrap_or(l.max_connections),
                max_requests: o.max_requests.unwrap_or(l.max_requests),
                max_pending: o.max_pending.unwrap_or(l.max_pending),
            },
            ejection: Ejection {
                after: o.eject_after.unwrap_or(e.after),
                base: o.eject_base.unwrap_or(e.base),
                max: o.eject_max.unwrap_or(e.max),
                max_share: o.eject_max_share.unwrap_or(e.max_share),
            },
            breaker: BreakerPolicy {
                failures: o.breaker_failures.unwrap_or(b.failures),
                error_rate: o.breaker_error_rate.unwrap_or(b.error_rate),
                min_requests: o.breaker_min_requests.unwrap_or(b.min_requests),
                window: o.breaker_window.unwrap_or(b.window),
                open_for: o.breaker_open_for.unwrap_or(b.open_for),
                probes: o.breaker_probes.unwrap_or(b.probes),
            },
            overlay: Overlay {
                blocked: o.blocked.clone().unwrap_or(p.overlay.blocked),
                circuit: o.circuit.or(p.overlay.circuit),
                ..p.overlay
            },
        }
    }

    /// The first rule this policy breaks, as `(field, reason)`: the YAML
    /// key and why.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let share = |field, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err((field, format!("{v} must be between 0 and 1")))
            }
        };
        share("panic_threshold", self.panic_threshold)?;
        share("zone_min_available", self.zone_min_available)?;
        share("eject_max_share", self.ejection.max_share)?;
        share("breaker_error_rate", self.breaker.error_rate)?;
        let positive = |field, d: Duration| {
            if d.is_zero() {
                Err((field, "must be greater than 0".to_string()))
            } else {
                Ok(())
            }
        };
        positive("connect_timeout", self.connect_timeout)?;
        positive("timeout", self.timeout)?;
        positive("eject_base", self.ejection.base)?;
        positive("breaker_window", self.breaker.window)?;
        positive("breaker_open_for", self.breaker.open_for)?;
        if self.ejection.max < self.ejection.base {
            return Err(("eject_max", "must be at least eject_base".to_string()));
        }
        if self.retry.backoff_max < self.retry.backoff {
            return Err((
                "retry_backoff_max",
                "must be at least retry_backoff".to_string(),
            ));
        }
        if !(0.0..=10.0).contains(&self.retry.budget_ratio) {
            return Err((
                "retry_budget_ratio",
                format!("{} must be between 0 and 10", self.retry.budget_ratio),
            ));
        }
        for (field, v) in [
            ("max_connections", self.limits.max_connections),
            ("max_requests", self.limits.max_requests),
        ] {
            if v == 0 {
                return Err((field, "must be at least 1".to_string()));
            }
        }
        if !self.tag_weights.is_empty() && self.tag_weights.values().all(|w| *w == 0) {
            return Err((
                "tag_weights",
                "at least one weight must be above 0".to_string(),
            ));
        }
        if self.retry.retries > 10 {
            return Err(("retries", "at most 10".to_string()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_override_replaces_only_what_it_sets() {
        let o: PolicyOverride = serde_saphyr::from_str(
            "balancer: hash\nhash_key: header:X-User\ntry_timeout: 200ms\nretries: 0\n",
        )
        .unwrap();
        let p = Policy::default().apply(&o);
        assert_eq!(p.balancer, Balancer::Hash);
        assert_eq!(p.hash_key, HashKey::Header("x-user".to_string()));
        assert_eq!(p.try_timeout, Some(Duration::from_millis(200)));
        assert_eq!(p.retry.retries, 0);
        assert_eq!(p.timeout, Policy::default().timeout);
        let off: PolicyOverride = serde_saphyr::from_str("try_timeout: 0s\n").unwrap();
        assert_eq!(p.apply(&off).try_timeout, None);
    }

    #[test]
    fn bad_values_are_named() {
        for (yaml, field) in [
            ("panic_threshold: 1.5\n", "panic_threshold"),
            ("connect_timeout: 0s\n", "connect_timeout"),
            ("eject_base: 10s\neject_max: 1s\n", "eject_max"),
            ("max_requests: 0\n", "max_requests"),
        ] {
            let o: PolicyOverride = serde_saphyr::from_str(yaml).unwrap();
            assert_eq!(Policy::default().apply(&o).check().unwrap_err().0, field);
        }
        assert!("cookie:".parse::<HashKey>().is_err());
        assert!("header:a b".parse::<HashKey>().is_err());
        assert_eq!(
            "cookie:sid".parse::<HashKey>().unwrap(),
            HashKey::Cookie("sid".to_string())
        );
    }
}
