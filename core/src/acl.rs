//! ACL rules in Consul's shape, and the decision they make.
//!
//! A policy's rules give `read`, `write` or `deny` on resources:
//! `service "<name>"`, `service_prefix "<prefix>"`, the same for `node`,
//! `key` and `agent`, and the global `operator` and `acl`. A token's
//! policies merge into one [`Rules`] (per resource, `deny` beats `write`
//! beats `read`); the control plane sends that merged set to agents, and
//! both decide with an [`Authorizer`]: an exact rule first, else the
//! longest matching prefix, else the default policy. `operator` and `acl`
//! have no default: they need a rule.
//!
//! A `service` or `service_prefix` rule may also say `intentions = "..."`:
//! the access to intentions whose destination is that service
//! ([`Resource::Intention`]). Without it, as in Consul, `read` or `write`
//! on the service gives `read` on its intentions and `deny` gives `deny`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a rule grants. Ordered by precedence when rules merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Read,
    Write,
    Deny,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Deny => "deny",
        }
    }

    fn parse(text: &str) -> Option<Access> {
        match text {
            "read" => Some(Access::Read),
            "write" => Some(Access::Write),
            "deny" => Some(Access::Deny),
            _ => None,
        }
    }

    /// Whether this grant covers `needed` (`Read` or `Write`).
    fn covers(self, needed: Access) -> bool {
        match self {
            Access::Deny => false,
            Access::Write => true,
            Access::Read => needed == Access::Read,
        }
    }
}

/// What a resource no rule names gives (`acl.default_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultPolicy {
    /// Everything no rule denies (today's behaviour; the default so an
    /// upgrade changes nothing).
    #[default]
    Allow,
    /// Only what a rule grants (recommended).
    Deny,
}

/// What an agent does with tokens when the control plane cannot resolve
/// them (`acl.down_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DownPolicy {
    /// Tokens resolved before keep their rules; unknown ones are denied.
    #[default]
    ExtendCache,
    Allow,
    Deny,
}

/// One resource a request touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    Service(&'a str),
    Node(&'a str),
    Key(&'a str),
    /// An agent, by its node's name.
    Agent(&'a str),
    /// Sessions on a node, by the node's name.
    Session(&'a str),
    /// User events, by name.
    Event(&'a str),
    /// Intentions whose destination is this service (Consul's
    /// `intentions:read`/`intentions:write`). Consul checks writes on the
    /// destination, and lets an intention be read when either end allows
    /// it (`Intention.CanRead`): a caller asks for both.
    Intention(&'a str),
    Operator,
    Acl,
}

impl Resource<'_> {
    /// How the resource reads in an error or audit entry (`service "web"`).
    pub fn describe(&self) -> String {
        match self {
            Resource::Service(n) => format!("service {n:?}"),
            Resource::Node(n) => format!("node {n:?}"),
            Resource::Key(k) => format!("key {k:?}"),
            Resource::Agent(n) => format!("agent {n:?}"),
            Resource::Session(n) => format!("sessions of node {n:?}"),
            Resource::Event(n) => format!("event {n:?}"),
            Resource::Intention(n) => format!("intentions of service {n:?}"),
            Resource::Operator => "operator".to_string(),
            Resource::Acl => "acl".to_string(),
        }
    }
}

/// Most rules one policy may hold.
pub const MAX_RULES: usize = 1000;

/// A policy's rules, or a token's merged ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rules {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub service: BTreeMap<String, Access>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub service_prefix: BTreeMap<String, Access>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub node: BTreeMap<String, Access>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub node_prefix: BTreeMap<String, Access>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub key: BTreeMap<String, Access>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub key_prefix: BTreeMap<String, Access>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub agent: BTreeMap<String, Access>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub agent_prefix: BTreeMap<String, Access>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub session: BTreeMap<String, Access>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub session_prefix: BTreeMap<String, Access>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub event: BTreeMap<String, Access>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub event_prefix: BTreeMap<String, Access>,
    /// `intentions = "..."` where a `service` rule gives it; where it does
    /// not, the rule's policy implies it ([`Authorizer::rule_for`]).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub service_intentions: BTreeMap<String, Access>,
    /// The same for `service_prefix` rules.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub service_prefix_intentions: BTreeMap<String, Access>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator: Option<Access>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acl: Option<Access>,
}

/// Why a policy's rules cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rules: {0}")]
pub struct RulesError(pub String);

impl Rules {
    /// Every resource at `access` (the built-in management and read-only
    /// policies; intentions included, as Consul's `global-management`
    /// gives `intentions = "write"`).
    pub fn everything(access: Access) -> Rules {
        let all = || BTreeMap::from([(String::new(), access)]);
        Rules {
            service_prefix: all(),
            service_prefix_intentions: all(),
            node_prefix: all(),
            key_prefix: all(),
            agent_prefix: all(),
            session_prefix: all(),
            event_prefix: all(),
            operator: Some(access),
            acl: Some(access),
            ..Rules::default()
        }
    }

    /// Consul's node identity: write on that node (and its sessions),
    /// read on every service.
    pub fn node_identity(node: &str) -> Rules {
        Rules {
            node: BTreeMap::from([(node.to_string(), Access::Write)]),
            session: BTreeMap::from([(node.to_string(), Access::Write)]),
            agent: BTreeMap::from([(node.to_string(), Access::Read)]),
            service_prefix: BTreeMap::from([(String::new(), Access::Read)]),
            ..Rules::default()
        }
    }

    /// Consul's service identity: write on that service (and its
    /// sidecar), read on every service and node.
    pub fn service_identity(service: &str) -> Rules {
        Rules {
            service: BTreeMap::from([
                (service.to_string(), Access::Write),
                (format!("{service}-sidecar-proxy"), Access::Write),
            ]),
            service_prefix: BTreeMap::from([(String::new(), Access::Read)]),
            node_prefix: BTreeMap::from([(String::new(), Access::Read)]),
            ..Rules::default()
        }
    }

    fn maps(&self) -> [(&'static str, &BTreeMap<String, Access>); 12] {
        [
            ("service", &self.service),
            ("service_prefix", &self.service_prefix),
            ("node", &self.node),
            ("node_prefix", &self.node_prefix),
            ("key", &self.key),
            ("key_prefix", &self.key_prefix),
            ("agent", &self.agent),
            ("agent_prefix", &self.agent_prefix),
            ("session", &self.session),
            ("session_prefix", &self.session_prefix),
            ("event", &self.event),
            ("event_prefix", &self.event_prefix),
        ]
    }

    fn map_mut(&mut self, kind: &str) -> Option<&mut BTreeMap<String, Access>> {
        Some(match kind {
            "service" => &mut self.service,
            "service_prefix" => &mut self.service_prefix,
            "node" => &mut self.node,
            "node_prefix" => &mut self.node_prefix,
            "key" => &mut self.key,
            "key_prefix" => &mut self.key_prefix,
            "agent" => &mut self.agent,
            "agent_prefix" => &mut self.agent_prefix,
            "session" => &mut self.session,
            "session_prefix" => &mut self.session_prefix,
            "event" => &mut self.event,
            "event_prefix" => &mut self.event_prefix,
            _ => return None,
        })
    }

    /// How many rules there are.
    pub fn len(&self) -> usize {
        self.maps().iter().map(|(_, m)| m.len()).sum::<usize>()
            + usize::from(self.operator.is_some())
            + usize::from(self.acl.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds `other`'s rules; where both name a resource, the stronger
    /// (`deny` > `write` > `read`) stays. An `intentions` given merges the
    /// same way, apart from the policy (Consul's policy merger).
    pub fn merge(&mut self, other: &Rules) {
        for (kind, theirs) in other.maps() {
            if let Some(ours) = self.map_mut(kind) {
                merge_into(ours, theirs);
            }
        }
        merge_into(&mut self.service_intentions, &other.service_intentions);
        merge_into(
            &mut self.service_prefix_intentions,
            &other.service_prefix_intentions,
        );
        self.operator = self.operator.max(other.operator);
        self.acl = self.acl.max(other.acl);
    }

    /// Rules from Consul's JSON form of a policy (what its HCL form parses
    /// to): `{"service": {"web": {"policy": "write", "intentions": "read"}},
    /// "operator": "read"}`. A block given twice may come as a list of such
    /// objects. Only `service` and `service_prefix` blocks take
    /// `intentions`.
    pub fn from_consul_json(value: &Value) -> Result<Rules, RulesError> {
        let bad = |what: String| Err(RulesError(what));
        let Some(top) = value.as_object() else {
            return bad(
                "expected resource blocks such as service \"web\" { policy = \"read\" }"
                    .to_string(),
            );
        };
        let mut rules = Rules::default();
        for (kind, body) in top {
            match kind.as_str() {
                "operator" | "acl" => {
                    let access = body.as_str().and_then(Access::parse).ok_or_else(|| {
                        RulesError(format!("{kind} must be \"read\", \"write\" or \"deny\""))
                    })?;
                    let slot = if kind == "acl" {
                        &mut rules.acl
                    } else {
                        &mut rules.operator
                    };
                    *slot = (*slot).max(Some(access));
                }
                _ => {
                    let takes_intentions = matches!(kind.as_str(), "service" | "service_prefix");
                    let mut intentions = Vec::new();
                    let Some(map) = rules.map_mut(kind) else {
                        return bad(format!(
                            "unknown resource {kind:?}: Signpost has service, service_prefix, node, node_prefix, key, key_prefix, agent, agent_prefix, session, session_prefix, event, event_prefix, operator and acl"
                        ));
                    };
                    let blocks: Vec<&Value> = match body {
                        Value::Array(list) => list.iter().collect(),
                        other => vec![other],
                    };
                    for block in blocks {
                        let Some(labels) = block.as_object() else {
                            return bad(format!(
                                "{kind} needs a name: {kind} \"name\" {{ policy = \"read\" }}"
                            ));
                        };
                        for (label, inner) in labels {
                            let inner: Vec<&Value> = match inner {
                                Value::Array(list) => list.iter().collect(),
                                other => vec![other],
                            };
                            for one in inner {
                                let access = one
                                    .get("policy")
                                    .and_then(Value::as_str)
                                    .and_then(Access::parse)
                                    .ok_or_else(|| {
                                        RulesError(format!(
                                            "{kind} {label:?}: policy must be \"read\", \"write\" or \"deny\""
                                        ))
                                    })?;
                                let allowed = |k: &str| {
                                    k == "policy" || (takes_intentions && k == "intentions")
                                };
                                if let Some(extra) =
                                    one.as_object().and_then(|o| o.keys().find(|k| !allowed(k)))
                                {
                                    let only = if takes_intentions {
                                        "policy and intentions"
                                    } else {
                                        "policy"
                                    };
                                    return bad(format!(
                                        "{kind} {label:?}: unknown field {extra:?} (only {only})"
                                    ));
                                }
                                if let Some(given) = one.get("intentions") {
                                    let access = given.as_str().and_then(Access::parse).ok_or_else(|| {
                                        RulesError(format!(
                                            "{kind} {label:?}: intentions must be \"read\", \"write\" or \"deny\""
                                        ))
                                    })?;
                                    intentions.push((label.clone(), access));
                                }
                                let entry = map.entry(label.clone()).or_insert(access);
                                *entry = (*entry).max(access);
                            }
                        }
                    }
                    let explicit = if kind == "service" {
                        &mut rules.service_intentions
                    } else {
                        &mut rules.service_prefix_intentions
                    };
                    for (label, access) in intentions {
                        let entry = explicit.entry(label).or_insert(access);
                        *entry = (*entry).max(access);
                    }
                }
            }
        }
        if rules.len() > MAX_RULES {
            return bad(format!("{} rules, at most {MAX_RULES}", rules.len()));
        }
        Ok(rules)
    }
}

fn merge_into(ours: &mut BTreeMap<String, Access>, theirs: &BTreeMap<String, Access>) {
    for (name, access) in theirs {
        let entry = ours.entry(name.clone()).or_insert(*access);
        *entry = (*entry).max(*access);
    }
}

/// Which rule decided: the exact one, or the prefix one with this prefix.
enum Match<'n> {
    Exact,
    Prefix(&'n str),
}

/// The exact rule for `name`, else the longest prefix rule.
fn longest_match<'n>(
    exact: &BTreeMap<String, Access>,
    prefixes: &BTreeMap<String, Access>,
    name: &'n str,
) -> Option<(Match<'n>, Access)> {
    if let Some(access) = exact.get(name) {
        return Some((Match::Exact, *access));
    }
    if prefixes.is_empty() {
        return None;
    }
    (0..=name.len())
        .rev()
        .filter(|&end| name.is_char_boundary(end))
        .find_map(|end| {
            let prefix = &name[..end];
            prefixes.get(prefix).map(|a| (Match::Prefix(prefix), *a))
        })
}

/// Decides requests for one token (or for requests without one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorizer {
    pub rules: Rules,
    pub default: DefaultPolicy,
}

impl Authorizer {
    pub fn new(rules: Rules, default: DefaultPolicy) -> Self {
        Authorizer { rules, default }
    }

    /// What the rules say about `resource`: an exact rule, else the
    /// longest matching prefix, else nothing.
    ///
    /// For [`Resource::Intention`] the rule is the service rule that would
    /// decide the service (Consul keeps a second tree with the same
    /// names): its `intentions` if it gives one, else `read` from a `read`
    /// or `write` policy and `deny` from `deny` (Consul's
    /// `policy_authorizer.go`).
    pub fn rule_for(&self, resource: Resource<'_>) -> Option<Access> {
        let (exact, prefixes, name) = match resource {
            Resource::Operator => return self.rules.operator,
            Resource::Acl => return self.rules.acl,
            Resource::Intention(service) => return self.intention_rule(service),
            Resource::Service(n) => (&self.rules.service, &self.rules.service_prefix, n),
            Resource::Node(n) => (&self.rules.node, &self.rules.node_prefix, n),
            Resource::Key(n) => (&self.rules.key, &self.rules.key_prefix, n),
            Resource::Agent(n) => (&self.rules.agent, &self.rules.agent_prefix, n),
            Resource::Session(n) => (&self.rules.session, &self.rules.session_prefix, n),
            Resource::Event(n) => (&self.rules.event, &self.rules.event_prefix, n),
        };
        longest_match(exact, prefixes, name).map(|(_, access)| access)
    }

    fn intention_rule(&self, service: &str) -> Option<Access> {
        let rules = &self.rules;
        let (rule, policy) = longest_match(&rules.service, &rules.service_prefix, service)?;
        let explicit = match rule {
            Match::Exact => rules.service_intentions.get(service),
            Match::Prefix(prefix) => rules.service_prefix_intentions.get(prefix),
        };
        Some(match (explicit, policy) {
            (Some(access), _) => *access,
            (None, Access::Read | Access::Write) => Access::Read,
            (None, Access::Deny) => Access::Deny,
        })
    }

    /// Whether a rule grants `needed` on `resource`, whatever the default
    /// policy: what binds an agent's token to its node.
    pub fn grants(&self, resource: Resource<'_>, needed: Access) -> bool {
        self.rule_for(resource).is_some_and(|a| a.covers(needed))
    }

    /// Whether `needed` (`Read` or `Write`) is allowed on `resource`.
    pub fn allows(&self, resource: Resource<'_>, needed: Access) -> bool {
        match self.rule_for(resource) {
            Some(access) => access.covers(needed),
            None => {
                self.default == DefaultPolicy::Allow
                    && !matches!(resource, Resource::Operator | Resource::Acl)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn exact_beats_prefix_longest_prefix_wins_and_deny_merges_first() {
        let rules = Rules::from_consul_json(&json!({
            "service": {"web": {"policy": "write"}},
            "service_prefix": {"": {"policy": "read"}, "db-": {"policy": "deny"}},
            "operator": "read",
        }))
        .unwrap();
        let a = Authorizer::new(rules.clone(), DefaultPolicy::Deny);
        assert!(a.allows(Resource::Service("web"), Access::Write));
        assert!(a.allows(Resource::Service("api"), Access::Read));
        assert!(!a.allows(Resource::Service("api"), Access::Write));
        assert!(!a.allows(Resource::Service("db-main"), Access::Read));
        assert!(
            !a.allows(Resource::Node("n1"), Access::Read),
            "default deny"
        );
        assert!(a.allows(Resource::Operator, Access::Read));
        assert!(!a.allows(Resource::Acl, Access::Read));
        let open = Authorizer::new(rules.clone(), DefaultPolicy::Allow);
        assert!(open.allows(Resource::Node("n1"), Access::Write));
        assert!(
            !open.grants(Resource::Node("n1"), Access::Write),
            "no rule names it"
        );
        assert!(
            !open.allows(Resource::Acl, Access::Read),
            "acl always needs a rule"
        );

        let mut merged = rules;
        merged.merge(
            &Rules::from_consul_json(&json!({"service": [{"web": {"policy": "deny"}}]})).unwrap(),
        );
        merged.merge(&Rules::node_identity("n1"));
        let a = Authorizer::new(merged, DefaultPolicy::Deny);
        assert!(
            !a.allows(Resource::Service("web"), Access::Read),
            "deny wins"
        );
        assert!(a.allows(Resource::Node("n1"), Access::Write));
        assert!(!a.allows(Resource::Node("n2"), Access::Write));
    }

    #[test]
    fn intentions_follow_the_deciding_service_rule() {
        let rules = Rules::from_consul_json(&json!({
            "service": {
                "web": {"policy": "read", "intentions": "write"},
                "api": {"policy": "write"},
            },
            "service_prefix": {
                "": {"policy": "read"},
                "db-": {"policy": "deny"},
                "pay": {"policy": "read", "intentions": "deny"},
            },
        }))
        .unwrap();
        assert_eq!(rules.len(), 5, "intentions are part of a rule, not rules");
        let a = Authorizer::new(rules.clone(), DefaultPolicy::Deny);
        let ixn = Resource::Intention;
        assert!(a.allows(ixn("web"), Access::Write));
        assert!(!a.allows(Resource::Service("web"), Access::Write));
        assert!(
            a.allows(ixn("api"), Access::Read),
            "write on the service: read"
        );
        assert!(!a.allows(ixn("api"), Access::Write));
        assert!(
            a.allows(ixn("other"), Access::Read),
            "from service_prefix \"\""
        );
        assert!(!a.allows(ixn("other"), Access::Write));
        assert!(
            !a.allows(ixn("db-main"), Access::Read),
            "deny on the service: deny"
        );
        assert!(!a.allows(ixn("payments"), Access::Read), "given: deny");
        assert!(a.allows(Resource::Service("payments"), Access::Read));
        assert!(
            a.allows(ixn("web"), Access::Write),
            "an exact rule beats the prefixes"
        );
        assert_eq!(ixn("web").describe(), "intentions of service \"web\"");

        let none = Authorizer::new(Rules::default(), DefaultPolicy::Deny);
        assert!(!none.allows(ixn("web"), Access::Read));
        let open = Authorizer::new(Rules::default(), DefaultPolicy::Allow);
        assert!(open.allows(ixn("web"), Access::Write));
        let all = Authorizer::new(Rules::everything(Access::Write), DefaultPolicy::Deny);
        assert!(all.allows(ixn("*"), Access::Write));
        let reader = Authorizer::new(Rules::everything(Access::Read), DefaultPolicy::Deny);
        assert!(reader.allows(ixn("web"), Access::Read));
        assert!(!reader.allows(ixn("web"), Access::Write));

        // Agents receive merged rules as JSON.
        let text = serde_json::to_string(&rules).unwrap();
        assert!(
            text.contains("\"service_intentions\":{\"web\":\"write\"}"),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Rules>(&text).unwrap(), rules);
    }

    #[test]
    fn intentions_merge_apart_from_the_policy_as_consul() {
        let mut merged = Rules::from_consul_json(&json!({
            "service": {"web": {"policy": "deny"}, "api": {"policy": "write"}},
        }))
        .unwrap();
        merged.merge(
            &Rules::from_consul_json(&json!({
                "service": [
                    {"web": {"policy": "read", "intentions": "write"}},
                    {"api": {"policy": "read", "intentions": "read"}},
                ],
            }))
            .unwrap(),
        );
        let a = Authorizer::new(merged, DefaultPolicy::Deny);
        assert!(!a.allows(Resource::Service("web"), Access::Read));
        // Consul's merger keeps the strongest `intentions` given, and a
        // given one is not derived from the merged policy.
        assert!(a.allows(Resource::Intention("web"), Access::Write));
        assert!(a.allows(Resource::Service("api"), Access::Write));
        assert!(!a.allows(Resource::Intention("api"), Access::Write));
    }

    #[test]
    fn bad_rules_are_named() {
        for (rules, says) in [
            (
                json!({"service": {"web": {"policy": "all"}}}),
                "service \"web\": policy",
            ),
            (
                json!({"query_prefix": {"": {"policy": "read"}}}),
                "unknown resource \"query_prefix\"",
            ),
            (json!({"operator": "maybe"}), "operator must be"),
            (json!({"node": "n1"}), "node needs a name"),
            (
                json!({"key": {"a": {"policy": "read", "intentions": "x"}}}),
                "unknown field \"intentions\"",
            ),
            (
                json!({"service": {"web": {"policy": "read", "intentions": "all"}}}),
                "service \"web\": intentions must be",
            ),
            (
                json!({"service_prefix": {"": {"policy": "read", "intention": "read"}}}),
                "unknown field \"intention\" (only policy and intentions)",
            ),
            (
                json!({"service": {"web": {"intentions": "read"}}}),
                "service \"web\": policy must be",
            ),
            (json!([1]), "expected resource blocks"),
        ] {
            let e = Rules::from_consul_json(&rules).unwrap_err();
            assert!(e.to_string().contains(says), "{rules}: {e}");
        }
    }
}
