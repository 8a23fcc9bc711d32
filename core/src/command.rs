//! Operator commands: what an operator asks every agent's proxy to do to a
//! service (block an instance, degrade, force a circuit, rate-limit, set a
//! traffic policy), with a reason, a creator and an expiry.
//!
//! The control plane validates and stores them, sends the active ones to
//! every agent, and each agent applies them to its proxy's policy and
//! expires them by itself, even with the control plane gone.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::policy::{Circuit, Fallback, PolicyOverride, Route};

/// Now, in Unix milliseconds: how command times are kept.
pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The longest a command may last.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// What a command applies to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub service: String,
    /// One instance, as `ip:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<SocketAddr>,
    /// Only requests of this route (HTTP services; not for `block` or
    /// `policy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<Route>,
    /// Only the agents of hosts that run one of these services apply it
    /// (empty: every agent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub callers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// The instance gets no new connections or requests.
    Block,
    /// Answer with the fallback (or fail fast with 503) without calling
    /// the service.
    Degrade {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fallback: Option<Fallback>,
    },
    /// Force the circuit open or closed.
    Circuit { state: Circuit },
    /// At most `per_second` requests (connections for L4 services) with
    /// bursts of `burst`, on each agent; with `split`, the rate is for
    /// the whole fleet and each agent takes its share among the agents
    /// using the service.
    RateLimit {
        per_second: f64,
        burst: u32,
        #[serde(default)]
        split: bool,
    },
    /// Traffic policy for the service (timeouts, retries, balancer...).
    Policy { policy: Box<PolicyOverride> },
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Block => "block",
            Action::Degrade { .. } => "degrade",
            Action::Circuit { .. } => "circuit",
            Action::RateLimit { .. } => "rate_limit",
            Action::Policy { .. } => "policy",
        }
    }
}

/// A command as an operator submits it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCommand {
    pub action: Action,
    pub target: Target,
    pub reason: String,
    /// How long it lasts, e.g. `30m` (at most [`MAX_TTL`]).
    #[serde(with = "crate::duration::serde_go")]
    pub ttl: Duration,
}

/// A stored command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub id: String,
    pub action: Action,
    pub target: Target,
    pub reason: String,
    /// The accessor of the token that created it.
    pub creator: String,
    /// Unix milliseconds.
    pub created_at: u64,
    pub expires_at: u64,
    /// Unix milliseconds of an early revocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
}

/// Why a command is refused, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct CommandError {
    pub field: String,
    pub reason: String,
}

fn invalid(field: &str, reason: impl Into<String>) -> CommandError {
    CommandError {
        field: field.to_string(),
        reason: reason.into(),
    }
}

impl NewCommand {
    /// Checks the rules a command must follow.
    pub fn validate(&self) -> Result<(), CommandError> {
        if self.target.service.trim().is_empty() {
            return Err(invalid("target.service", "must name a service"));
        }
        if self.reason.trim().is_empty() {
            return Err(invalid("reason", "say why (it goes to the audit log)"));
        }
        if self.ttl.is_zero() {
            return Err(invalid("ttl", "must be greater than 0"));
        }
        if self.ttl > MAX_TTL {
            return Err(invalid("ttl", "at most 168h (7 days); renew it if needed"));
        }
        if let Some(route) = &self.target.route {
            route
                .check()
                .map_err(|reason| invalid("target.route", reason))?;
            if matches!(self.action, Action::Block | Action::Policy { .. }) {
                return Err(invalid(
                    "target.route",
                    "block and policy apply to a service or an instance, not a route",
                ));
            }
        }
        if self.target.instance.is_some() && matches!(self.action, Action::Policy { .. }) {
            return Err(invalid(
                "target.instance",
                "a policy applies to a whole service",
            ));
        }
        match &self.action {
            Action::Block if self.target.instance.is_none() => Err(invalid(
                "target.instance",
                "block needs the instance (ip:port); to stop a whole service use degrade",
            )),
            Action::Degrade {
                fallback: Some(f), ..
            } if !(100..=599).contains(&f.status) => Err(invalid(
                "action.fallback.status",
                "must be an HTTP status (100-599)",
            )),
            Action::RateLimit {
                per_second, burst, ..
            } => {
                if !per_second.is_finite() || *per_second <= 0.0 {
                    Err(invalid("action.per_second", "must be greater than 0"))
                } else if *burst == 0 {
                    Err(invalid("action.burst", "must be at least 1"))
                } else {
                    Ok(())
                }
            }
            Action::Policy { policy } => crate::policy::Policy::default()
                .apply(policy)
                .check()
                .map_err(|(field, reason)| invalid(&format!("action.policy.{field}"), reason)),
            _ => Ok(()),
        }
    }
}

impl Command {
    /// In force at `now` (Unix ms): not expired, not revoked.
    pub fn active(&self, now: u64) -> bool {
        self.revoked_at.is_none() && now < self.expires_at
    }

    pub fn state(&self, now: u64) -> &'static str {
        match self.revoked_at {
            Some(_) => "revoked",
            None if now >= self.expires_at => "expired",
            None => "active",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> NewCommand {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn commands_parse_and_bad_ones_name_the_field() {
        let ok = parse(
            r#"{"action":{"kind":"block"},"target":{"service":"web","instance":"10.0.0.1:80"},"reason":"bad disk","ttl":"30m"}"#,
        );
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(ok.ttl, Duration::from_secs(1800));
        for (json, field) in [
            (
                r#"{"action":{"kind":"block"},"target":{"service":"web"},"reason":"x","ttl":"30m"}"#,
                "target.instance",
            ),
            (
                r#"{"action":{"kind":"circuit","state":"open"},"target":{"service":"web"},"reason":"","ttl":"30m"}"#,
                "reason",
            ),
            (
                r#"{"action":{"kind":"circuit","state":"open"},"target":{"service":"web"},"reason":"x","ttl":"200h"}"#,
                "ttl",
            ),
            (
                r#"{"action":{"kind":"degrade","fallback":{"status":42}},"target":{"service":"web"},"reason":"x","ttl":"1m"}"#,
                "action.fallback.status",
            ),
            (
                r#"{"action":{"kind":"circuit","state":"open"},"target":{"service":"web","route":{"path_prefix":"api"}},"reason":"x","ttl":"1m"}"#,
                "target.route",
            ),
            (
                r#"{"action":{"kind":"rate_limit","per_second":0,"burst":5},"target":{"service":"web"},"reason":"x","ttl":"1m"}"#,
                "action.per_second",
            ),
            (
                r#"{"action":{"kind":"policy","policy":{"panic_threshold":3}},"target":{"service":"web"},"reason":"x","ttl":"1m"}"#,
                "action.policy.panic_threshold",
            ),
        ] {
            assert_eq!(parse(json).validate().unwrap_err().field, field, "{json}");
        }
        assert!(
            serde_json::from_str::<NewCommand>(
                r#"{"action":{"kind":"explode"},"target":{"service":"web"},"reason":"x","ttl":"1m"}"#
            )
            .is_err(),
            "an unknown kind is refused"
        );
    }
}
