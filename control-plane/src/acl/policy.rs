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
service_prefix "" {
  policy = "write"
  intentions = "write"
}
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
        description: "Commands, the mesh's intentions and CA, and the audit log; reads the fleet (the former operator role)",
        rules: r#"operator = "write"
service_prefix "" {
  policy = "read"
  intentions = "write"
}
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
        match hcl::from_str(text) {
            Ok(value) => value,
            // Consul's HCL (version 1) also takes several attributes on
            // one line (`service "web" { policy = "read" intentions =
            // "write" }`), which HCL 2 does not: tried again with each on
            // a line of its own, and the first error said if that fails.
            Err(e) => hcl::from_str(&one_attribute_a_line(text))
                .map_err(|_| RulesError(format!("HCL: {e}")))?,
        }
    };
    Rules::from_consul_json(&value)
}

/// `text` with a line break after every quoted attribute value that
/// another attribute follows on the same line (a `,` between them, which
/// HCL 1 also takes, becomes the line break), and after every `{` and
/// before every `}`. Strings are copied as they are.
fn one_attribute_a_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut chars = text.chars().peekable();
    // After `=`, before its value; inside a value string; just after one.
    let (mut after_equals, mut in_value, mut after_value) = (false, false, false);
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match c {
                '\\' => {
                    if let Some(next) = chars.next() {
                        out.push(next);
                    }
                }
                '"' => {
                    in_string = false;
                    after_value = in_value;
                    in_value = false;
                }
                _ => {}
            }
            continue;
        }
        if after_value {
            match c {
                ' ' | '\t' => {
                    out.push(c);
                    continue;
                }
                ',' => {
                    out.push('\n');
                    after_value = false;
                    continue;
                }
                c if c.is_ascii_alphabetic() || c == '_' => out.push('\n'),
                _ => {}
            }
            after_value = false;
        }
        match c {
            '=' => after_equals = true,
            '"' => {
                in_string = true;
                in_value = after_equals;
                after_equals = false;
            }
            // A block's body on lines of its own, as HCL 2 wants a block
            // of several attributes.
            '{' => {
                out.push_str("{\n");
                after_equals = false;
                continue;
            }
            '}' => {
                out.push_str("\n}");
                after_equals = false;
                continue;
            }
            c if !c.is_whitespace() => after_equals = false,
            _ => {}
        }
        out.push(c);
    }
    out
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
    fn several_attributes_on_one_line_parse_as_in_consul() {
        let one_line = parse(
            r#"service "web" { policy = "read" intentions = "write" }
service_prefix "api-" { policy = "write", intentions = "read" }
key "a b" { policy = "read" }"#,
        )
        .unwrap();
        let lines = parse(
            r#"service "web" {
  policy = "read"
  intentions = "write"
}
service_prefix "api-" {
  policy = "write"
  intentions = "read"
}
key "a b" { policy = "read" }"#,
        )
        .unwrap();
        assert_eq!(one_line, lines);
        let a = Authorizer::new(one_line, DefaultPolicy::Deny);
        assert!(a.allows(Resource::Intention("web"), Access::Write));
        assert!(!a.allows(Resource::Service("web"), Access::Write));
        // Strings are left alone, and real errors still say where.
        assert_eq!(
            one_attribute_a_line(r#"key "x = \"y\" {z}" { policy = "read" a = "b" }"#),
            "key \"x = \\\"y\\\" {z}\" {\n policy = \"read\" \na = \"b\" \n}"
        );
        let e = parse(r#"service "web" { policy = "read" intentions = }"#).unwrap_err();
        assert!(e.to_string().contains("line 1, column"), "{e}");
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
        // Operators manage traffic: intentions, for every service.
        assert!(operator.allows(Resource::Intention("web"), Access::Write));
        assert!(operator.allows(Resource::Intention("*"), Access::Write));
        let management = Authorizer::new(
            builtin_rules(builtin(GLOBAL_MANAGEMENT).unwrap()),
            DefaultPolicy::Deny,
        );
        assert!(management.allows(Resource::Intention("db"), Access::Write));
        let read_only = Authorizer::new(
            builtin_rules(builtin(READ_ONLY).unwrap()),
            DefaultPolicy::Deny,
        );
        assert!(read_only.allows(Resource::Intention("db"), Access::Read));
        assert!(!read_only.allows(Resource::Intention("db"), Access::Write));
    }
}
