//! The local API's access control: who presents which token, and what
//! its rules allow on this host.
//!
//! Tokens are resolved by the control plane (`ResolveToken` on the
//! agent's own connection) and cached for `acl.token_ttl`; a hit costs no
//! round trip. When the control plane cannot answer, `acl.down_policy`
//! decides: `extend-cache` keeps what was resolved before. A request
//! without a token gets no rules, so `acl.default_policy` alone decides.
//! Refusals are logged and sent to the control plane's audit log.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use signpost_core::acl::{Access, Authorizer, DefaultPolicy, DownPolicy, Resource, Rules};
use signpost_core::config::AgentAclConfig;
use signpost_proto::{Refusal, ResolveTokenRequest};

/// Most tokens kept resolved; beyond, the stalest go.
const MAX_CACHED: usize = 10_000;
/// Most distinct refusals (token, action, target, reason) sent to the
/// control plane per batch; beyond, they are counted into one entry.
const MAX_PENDING_REFUSALS: usize = 100;
/// How long a resolution may take before the down policy decides.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// A resolved token: who it is and what it may do.
#[derive(Debug)]
pub(crate) struct Token {
    pub(crate) accessor: String,
    pub(crate) authorizer: Arc<Authorizer>,
}

struct Cached {
    /// `None`: the control plane knows no such token.
    token: Option<Arc<Token>>,
    fetched: Instant,
}

/// Why a request is refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// A token the control plane does not know (or could not resolve).
    UnknownToken,
    /// The token (or no token) may not.
    Forbidden { needs: String },
}

pub(crate) struct AgentAcl {
    config: AgentAclConfig,
    /// Without a control plane nothing is checked (as before ACLs).
    enforced: bool,
    cache: RwLock<HashMap<String, Cached>>,
    /// The connection to the control plane, while there is one.
    client: RwLock<Option<crate::sync::Client>>,
    /// Refusals not yet sent, the same ones counted together: a flood
    /// of requests makes one audit entry a batch, not one each.
    refusals: Mutex<Refusals>,
    anonymous: Arc<Token>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Tokens resolved from the cache, by the control plane, by the down
    /// policy.
    cached: Counter,
    resolved: Counter,
    down: Counter,
}

impl AgentAcl {
    pub(crate) fn new(
        config: AgentAclConfig,
        enforced: bool,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        let default = if enforced {
            config.default_policy
        } else {
            DefaultPolicy::Allow
        };
        AgentAcl {
            anonymous: Arc::new(Token {
                accessor: String::new(),
                authorizer: Arc::new(Authorizer::new(Rules::default(), default)),
            }),
            config,
            enforced,
            cache: RwLock::new(HashMap::new()),
            client: RwLock::new(None),
            refusals: Mutex::new(Refusals::default()),
            cached: metrics.acl_resolutions("cached"),
            resolved: metrics.acl_resolutions("resolved"),
            down: metrics.acl_resolutions("down"),
            metrics,
        }
    }

    /// The connection tokens are resolved on (`None`: disconnected).
    pub(crate) fn set_client(&self, client: Option<crate::sync::Client>) {
        *self.client.write().unwrap_or_else(PoisonError::into_inner) = client;
    }

    /// Who presents `secret` (`None`: no token).
    pub(crate) async fn resolve(&self, secret: Option<&str>) -> Result<Arc<Token>, Refused> {
        let Some(secret) = secret.filter(|_| self.enforced) else {
            return Ok(self.anonymous.clone());
        };
        let stale = {
            let cache = self.cache.read().unwrap_or_else(PoisonError::into_inner);
            match cache.get(secret) {
                Some(hit) if hit.fetched.elapsed() < self.config.token_ttl => {
                    self.cached.inc();
                    return hit.token.clone().ok_or(Refused::UnknownToken);
                }
                Some(hit) => Some(hit.token.clone()),
                None => None,
            }
        };
        match self.ask(secret).await {
            Ok(token) => {
                self.resolved.inc();
                self.remember(secret, token.clone());
                token.ok_or(Refused::UnknownToken)
            }
            Err(e) => {
                self.down.inc();
                tracing::warn!(error = %e, down_policy = ?self.config.down_policy, "cannot resolve a token with the control plane");
                match (self.config.down_policy, stale) {
                    (DownPolicy::ExtendCache, Some(Some(token))) => Ok(token),
                    (DownPolicy::Allow, _) => Ok(Arc::new(Token {
                        accessor: String::new(),
                        authorizer: Arc::new(Authorizer::new(
                            Rules::everything(Access::Write),
                            DefaultPolicy::Allow,
                        )),
                    })),
                    _ => Err(Refused::UnknownToken),
                }
            }
        }
    }

    /// The control plane's answer: `Ok(None)` for a token it does not know.
    async fn ask(&self, secret: &str) -> Result<Option<Arc<Token>>, String> {
        let client = self
            .client
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or("not connected to the control plane")?;
        let mut client = client;
        let call = client.resolve_token(ResolveTokenRequest {
            secret: secret.to_string(),
        });
        let reply = tokio::time::timeout(RESOLVE_TIMEOUT, call)
            .await
            .map_err(|_| "the control plane did not answer in time".to_string())?
            .map_err(|status| status.message().to_string())?
            .into_inner();
        if reply.accessor.is_empty() {
            return Ok(None);
        }
        let rules: Rules = serde_json::from_str(&reply.rules_json)
            .map_err(|e| format!("unreadable rules from the control plane: {e}"))?;
        Ok(Some(Arc::new(Token {
            accessor: reply.accessor,
            authorizer: Arc::new(Authorizer::new(rules, self.config.default_policy)),
        })))
    }

    fn remember(&self, secret: &str, token: Option<Arc<Token>>) {
        let mut cache = self.cache.write().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= MAX_CACHED && !cache.contains_key(secret) {
            let ttl = self.config.token_ttl;
            cache.retain(|_, c| c.fetched.elapsed() < ttl);
            if cache.len() >= MAX_CACHED
                && let Some(oldest) = cache
                    .iter()
                    .min_by_key(|(_, c)| c.fetched)
                    .map(|(k, _)| k.clone())
            {
                cache.remove(&oldest);
            }
        }
        cache.insert(
            secret.to_string(),
            Cached {
                token,
                fetched: Instant::now(),
            },
        );
    }

    /// Checks that `secret` may do `needed` on `resource`; a refusal is
    /// logged and audited as `action` on `target`.
    pub(crate) async fn check(
        &self,
        secret: Option<&str>,
        resource: Resource<'_>,
        needed: Access,
        action: &str,
    ) -> Result<Arc<Token>, Refused> {
        let token = match self.resolve(secret).await {
            Ok(token) => token,
            Err(refused) => {
                self.note(secret.is_some(), "", action, &resource, "unknown token");
                return Err(refused);
            }
        };
        if token.authorizer.allows(resource, needed) {
            return Ok(token);
        }
        let needs = format!("{} {}", resource.describe(), needed.as_str());
        self.note(
            secret.is_some(),
            &token.accessor,
            action,
            &resource,
            &format!("needs {needs}"),
        );
        Err(Refused::Forbidden { needs })
    }

    /// Logs a refusal (once a period in a flood) and queues it for the
    /// control plane's audit log.
    fn note(&self, with_token: bool, who: &str, action: &str, resource: &Resource<'_>, why: &str) {
        let target = resource.describe();
        self.metrics.acl_refusal();
        let mut pending = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = pending.logged.note() {
            tracing::warn!(token = %who, with_token, action, target = %target, reason = why, count, "local API requests refused (logged once a period, with how many)");
        }
        let key = (who.to_string(), action.to_string(), target, why.to_string());
        if pending.batch.len() < MAX_PENDING_REFUSALS || pending.batch.contains_key(&key) {
            let count = pending.batch.entry(key).or_default();
            *count = count.saturating_add(1);
        } else {
            pending.overflow = pending.overflow.saturating_add(1);
        }
    }

    /// The refusals not yet sent to the control plane, one per kind with
    /// its count.
    pub(crate) fn take_refusals(&self) -> Vec<Refusal> {
        let mut pending = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
        let overflow = std::mem::take(&mut pending.overflow);
        let mut out: Vec<Refusal> = std::mem::take(&mut pending.batch)
            .into_iter()
            .map(|((who, action, target, reason), count)| Refusal {
                who,
                action,
                target,
                reason,
                count,
            })
            .collect();
        if overflow > 0 {
            out.push(Refusal {
                who: String::new(),
                action: "local.api".to_string(),
                target: String::new(),
                reason: format!(
                    "more kinds of refusal than the agent reports at once ({MAX_PENDING_REFUSALS})"
                ),
                count: overflow,
            });
        }
        out
    }
}

/// Refusals waiting for the control plane.
#[derive(Default)]
struct Refusals {
    batch: std::collections::BTreeMap<(String, String, String, String), u32>,
    overflow: u32,
    logged: signpost_core::accept::Tally,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_a_control_plane_tokens_are_not_checked() {
        let acl = AgentAcl::new(AgentAclConfig::default(), false, Default::default());
        let token = acl
            .check(
                Some("anything"),
                Resource::Service("web"),
                Access::Write,
                "t",
            )
            .await
            .unwrap();
        assert!(token.authorizer.allows(Resource::Node("n"), Access::Write));
    }

    #[tokio::test]
    async fn cached_tokens_need_no_round_trip_and_down_policy_decides_the_rest() {
        let config = AgentAclConfig {
            default_policy: DefaultPolicy::Deny,
            ..AgentAclConfig::default()
        };
        let acl = AgentAcl::new(config, true, Default::default());
        acl.remember(
            "web-secret",
            Some(Arc::new(Token {
                accessor: "a1".to_string(),
                authorizer: Arc::new(Authorizer::new(
                    Rules::service_identity("web"),
                    DefaultPolicy::Deny,
                )),
            })),
        );
        // No client: only the cache can answer.
        assert!(
            acl.check(
                Some("web-secret"),
                Resource::Service("web"),
                Access::Write,
                "t"
            )
            .await
            .is_ok()
        );
        assert_eq!(
            acl.check(
                Some("web-secret"),
                Resource::Service("db"),
                Access::Write,
                "t"
            )
            .await
            .unwrap_err(),
            Refused::Forbidden {
                needs: "service \"db\" write".to_string()
            }
        );
        assert_eq!(
            acl.check(Some("other"), Resource::Service("web"), Access::Read, "t")
                .await
                .unwrap_err(),
            Refused::UnknownToken,
            "extend-cache: an unknown token is refused while the control plane is away"
        );
        assert!(
            acl.check(None, Resource::Service("web"), Access::Read, "t")
                .await
                .is_err(),
            "default deny without a token"
        );
        for _ in 0..1000 {
            let _ = acl
                .check(None, Resource::Service("web"), Access::Write, "t")
                .await;
        }
        let refusals = acl.take_refusals();
        assert_eq!(refusals.len(), 4, "{refusals:?}");
        let from_a1: Vec<_> = refusals.iter().filter(|r| r.who == "a1").collect();
        assert_eq!(from_a1.len(), 1);
        assert_eq!(from_a1[0].reason, "needs service \"db\" write");
        let flood = refusals
            .iter()
            .find(|r| r.who.is_empty() && r.reason == "needs service \"web\" write")
            .unwrap();
        assert_eq!(flood.count, 1000, "a flood is one entry with its count");
        assert!(acl.take_refusals().is_empty());
    }
}
