//! ACL policies: named rule sets in Consul's HCL (or JSON) form, and the
//! built-in ones that reproduce the roles tokens had before policies
//! (`admin`, `read`, `operator`, `agent`).

use serde::{Deserialize, Serialize};
use signpost_core::acl::{Access, Rules, RulesError};

/// Largest rules text a policy may have.
pub const MAX_RULES_TEXT: usize = 64 * 1024;

/// A policy as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// As given (HCL or JSON).
    pub rules: String,
    /// Unix seconds.
    #[serde(default)]
    pub created_at: u64,
}

/// A built-in policy: fixed ID and rules, never stored, never changed.
pub struct Builtin {
    pub id: &'static str,
    pub name: &'static str,
    pub description: &'static str,
    pub rules: &'static str,
}

/// Consul's management policy ID, so tools that look for it find it.
pub const GLOBAL_MANAGEMENT: &str = "00000000-0000-0000-0000-000000000001";
pub const READ_ONLY: &str = "00000000-0000-0000-0000-000000000002";
pub const OPERATOR: &str = "00000000-0000-0000-0000-000000000003";
pub const AGENT: &str = "00000000-0000-0000-0000-000000000004";

pub const BUILTINS: [Builtin; 4] = [
    Builtin {
        id: GLOBAL_MANAGEMENT,
        name: "global-management",
        description: "Everything (the former admin role)",
        rules: r#"acl = "write"
operator = "write"
service_prefix "" { policy = "write" }
node_prefix "" { policy = "write" }
key_prefix "" { policy = "write" }
agent_prefix "" { policy = "write" }
"#,
    },
    Builtin {
        id: READ_ONLY,
        name: "builtin/global-read-only",
        description: "Reads everything (the former read role)",
        rules: r#"acl = "read"
operator = "read"
service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
key_prefix "" { policy = "read" }
agent_prefix "" { policy = "read" }
"#,
    },
    Builtin {
        id: OPERATOR,
        name: "builtin/operator",
        description: "Commands and the audit log, reads the fleet (the former operator role)",
        rules: r#"operator = "write"
service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
agent_prefix "" { policy = "read" }
"#,
    },
    Builtin {
        id: AGENT,
        name: "builtin/agent",
        description: "Joins as ANY node (the former agent role): give each host a node identity instead",
        rules: r#"node_prefix "" { policy = "write" }
agent_prefix "" { policy = "read" }
service_prefix "" { policy = "read" }
"#,
    },
];

/// The built-in policy with this ID or name.
pub fn builtin(id_or_name: &str) -> Option<&'static Builtin> {
    BUILTINS
        .iter()
        .find(|b| b.id == id_or_name || b.name == id_or_name)
}

/// The rules of a built-in policy (their text is ours and parses).
pub fn builtin_rules(b: &Builtin) -> Rules {
    parse(b.rules).unwrap_or_else(|e| {
        tracing::error!(policy = b.name, error = %e, "a built-in policy does not parse");
        Rules::default()
    })
}

/// Parses a policy's rules: Consul's HCL, or its JSON form.
pub fn parse(text: &str) -> Result<Rules, RulesError> {
    if text.len() > MAX_RULES_TEXT {
        return Err(RulesError(format!(
            "{} bytes, at most {MAX_RULES_TEXT}",
            text.len()
        )));
    }
    let value: serde_json::Value = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| RulesError(format!("JSON: {e}")))?
    } else if text.trim().is_empty() {
        serde_json::Value::Object(Default::default())
    } else {
        hcl::from_str(text).map_err(|e| RulesError(format!("HCL: {e}")))?
    };
    Rules::from_consul_json(&value)
}

/// The rules a legacy role had, as its built-in policy.
pub fn role_policy(role: super::Role) -> &'static str {
    match role {
        super::Role::Admin => GLOBAL_MANAGEMENT,
        super::Role::Read => READ_ONLY,
        super::Role::Operator => OPERATOR,
        super::Role::Agent => AGENT,
    }
}

/// What a rule grants, for messages (`service:write`).
pub fn needs(resource: &signpost_core::acl::Resource<'_>, access: Access) -> String {
    format!("{} {}", resource.describe(), access.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use signpost_core::acl::{Authorizer, DefaultPolicy, Resource};

    #[test]
    fn hcl_and_json_rules_parse_to_the_same_thing() {
        let hcl = parse(
            r#"service "web" { policy = "write" }
service "web" { policy = "read" }
service_prefix "" { policy = "read" }
operator = "read"
"#,
        )
        .unwrap();
        let json = parse(
            r#"{"service": {"web": {"policy": "write"}}, "service_prefix": {"": {"policy": "read"}}, "operator": "read"}"#,
        )
        .unwrap();
        assert_eq!(hcl, json);
        let a = Authorizer::new(hcl, DefaultPolicy::Deny);
        assert!(a.allows(Resource::Service("web"), Access::Write));
        let e = parse("service \"web\" { policy = }").unwrap_err();
        assert!(e.to_string().contains("line 1, column"), "{e}");
        assert!(parse(&"#".repeat(MAX_RULES_TEXT + 1)).is_err());
    }

    #[test]
    fn builtins_parse_and_reproduce_the_roles() {
        for b in &BUILTINS {
            assert!(parse(b.rules).is_ok(), "{}", b.name);
        }
        let agent = Authorizer::new(builtin_rules(builtin(AGENT).unwrap()), DefaultPolicy::Deny);
        assert!(agent.allows(Resource::Node("any"), Access::Write));
        assert!(!agent.allows(Resource::Operator, Access::Read));
        let operator = Authorizer::new(
            builtin_rules(builtin("builtin/operator").unwrap()),
            DefaultPolicy::Deny,
        );
        assert!(operator.allows(Resource::Operator, Access::Write));
        assert!(!operator.allows(Resource::Acl, Access::Read));
        assert!(!operator.allows(Resource::Service("web"), Access::Write));
    }
}
