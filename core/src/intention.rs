//! Service intentions in Consul's shape: which service may call which.
//! The control plane keeps them (`/v1/connect/intentions`); each agent's
//! inbound mTLS listener enforces them with [`Intentions`].
//!
//! An [`Intention`] names a source and a destination (a service, or `*`)
//! and either an [`Action`], which decides the whole connection (L4), or
//! a list of HTTP [`Permission`]s, which decide each request (L7), never
//! both. Between one source and one destination only the most precise
//! intention applies ([`Intention::precedence`], Consul's numbers); where
//! none does, the default (the ACL default policy) decides.
//!
//! Main parts:
//! - the record and its rules: [`Intention`], [`Intention::validate`];
//! - Consul's JSON: [`parse_consul`] reads a `/v1/connect/intentions`
//!   body, [`Intention::to_consul_json`] writes what reads return;
//! - enforcement: [`Intentions`], the compiled set an agent holds, and
//!   the [`Decision`] it makes for a connection or a [`Request`].
//!
//! Signpost adds shadow mode: a deny from an intention marked `shadow`
//! (or any deny when the whole set is in shadow mode) lets the call
//! through and says so ([`Decision::shadow_denied`]), so that a policy can
//! be tried on live traffic before it bites.

use std::collections::BTreeMap;

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

mod consul;
mod enforce;

pub use consul::{parse_consul, rfc3339};
pub use enforce::{By, Decision, Intentions, Request};

/// The source or destination that stands for every service.
pub const WILDCARD: &str = "*";
/// Most intentions the store keeps.
pub const MAX_INTENTIONS: usize = 10_000;
/// Most permissions one intention has.
pub const MAX_PERMISSIONS: usize = 64;
/// Longest description, in bytes (Consul's `metaValueMaxLength`).
pub const MAX_DESCRIPTION: usize = 512;
/// Most meta pairs (Consul's `metaMaxKeyPairs`).
pub const MAX_META: usize = 64;
/// Longest meta key, in bytes (Consul's `metaKeyMaxLength`).
pub const MAX_META_KEY: usize = 128;
/// Longest meta value, in bytes (Consul's `metaValueMaxLength`).
pub const MAX_META_VALUE: usize = 512;
/// Most header matches one permission has.
pub const MAX_HEADERS: usize = 32;
/// Longest path, header value or regular expression in a permission.
pub const MAX_PATTERN: usize = 1024;
/// Largest compiled regular expression, in bytes: a short pattern such
/// as `(a{100}){100}` must not cost every agent megabytes.
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// The HTTP methods a permission may name (Consul's `isValidHTTPMethod`).
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE",
];

/// What an intention, or one of its permissions, does with a match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }

    /// Consul's spelling only (`allow`, `deny`).
    pub fn parse(text: &str) -> Option<Action> {
        match text {
            "allow" => Some(Action::Allow),
            "deny" => Some(Action::Deny),
            _ => None,
        }
    }
}

/// An intention as an operator writes it and the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intention {
    /// A UUID the store assigns (empty in a spec).
    #[serde(default)]
    pub id: String,
    /// A service name or `*`.
    pub source: String,
    /// A service name or `*`.
    pub destination: String,
    /// The verdict for the whole connection; `None` exactly when
    /// `permissions` decide instead (Consul's rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// L7 rules, tried in order: the first that matches a request decides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<Permission>,
    /// Signpost's shadow mode: a deny from this intention lets the call
    /// through, logged and counted.
    #[serde(default, skip_serializing_if = "is_false")]
    pub shadow: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    /// Unix milliseconds; 0 until the store sets them.
    #[serde(default)]
    pub created_at_ms: u64,
    #[serde(default)]
    pub updated_at_ms: u64,
}

/// One L7 rule: an action for the requests its HTTP match covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permission {
    pub action: Action,
    pub http: HttpMatch,
}

/// What a request must look like; every part given must match (Consul's
/// `IntentionHTTPPermission`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpMatch {
    /// At most one of the three path matches. The path is matched without
    /// its query string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_exact: Option<String>,
    /// A plain string prefix, as Envoy's: `/api` also matches `/apix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Matches the whole path (anchored at both ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    /// Uppercase; empty: any method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
}

/// A test on one request header: exactly one of `present`, `exact`,
/// `prefix`, `suffix` and `regex`; `invert` negates the result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderMatch {
    /// Compared without regard to case.
    pub name: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub present: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    /// Matches the whole value (anchored at both ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub invert: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

// === impl Intention ===

impl Intention {
    /// Consul's precedence without namespaces (`UpdatePrecedence` with
    /// both namespaces exact): the more exact names, the higher, and an
    /// exact destination counts for more than an exact source.
    ///
    /// | source | destination | precedence |
    /// | --- | --- | --- |
    /// | exact | exact | 9 |
    /// | `*` | exact | 8 |
    /// | exact | `*` | 6 |
    /// | `*` | `*` | 5 |
    pub fn precedence(&self) -> u32 {
        match (self.source == WILDCARD, self.destination == WILDCARD) {
            (false, false) => 9,
            (true, false) => 8,
            (false, true) => 6,
            (true, true) => 5,
        }
    }

    /// `web → db`, for logs and decisions.
    pub fn label(&self) -> String {
        format!("{} → {}", self.source, self.destination)
    }

    /// Checks what every intention must be, whatever it came from, with
    /// Consul's messages where Consul has one (they name the field:
    /// `Permissions[0].HTTP.PathExact doesn't start with '/': "x"`).
    pub fn validate(&self) -> Result<(), String> {
        service_or_wildcard("SourceName", &self.source)?;
        service_or_wildcard("DestinationName", &self.destination)?;
        if self.description.len() > MAX_DESCRIPTION {
            return Err(format!(
                "Description exceeds maximum length {MAX_DESCRIPTION}"
            ));
        }
        if self.meta.len() > MAX_META {
            return Err(format!("Meta exceeds maximum element count {MAX_META}"));
        }
        for (key, value) in &self.meta {
            if key.len() > MAX_META_KEY {
                return Err(format!(
                    "Meta key {key:?} exceeds maximum length {MAX_META_KEY}"
                ));
            }
            if value.len() > MAX_META_VALUE {
                return Err(format!(
                    "Meta value for key {key:?} exceeds maximum length {MAX_META_VALUE}"
                ));
            }
        }
        if self.permissions.is_empty() {
            if self.action.is_none() {
                return Err("Action must be set to 'allow' or 'deny'".to_string());
            }
            return Ok(());
        }
        if self.action.is_some() {
            return Err("Action must be omitted if Permissions are specified".to_string());
        }
        if self.destination == WILDCARD {
            return Err(
                "Permissions cannot be specified on intentions with wildcarded destinations"
                    .to_string(),
            );
        }
        if self.permissions.len() > MAX_PERMISSIONS {
            return Err(format!(
                "Permissions: {} given, at most {MAX_PERMISSIONS}",
                self.permissions.len()
            ));
        }
        for (i, p) in self.permissions.iter().enumerate() {
            p.http.validate(&format!("Permissions[{i}].HTTP"))?;
        }
        Ok(())
    }

    /// Whether requests, not connections, are what it decides.
    pub fn is_l7(&self) -> bool {
        !self.permissions.is_empty()
    }
}

fn service_or_wildcard(field: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{field} must be set"));
    }
    if name == WILDCARD {
        return Ok(());
    }
    if name.contains('*') {
        return Err(format!(
            "{field}: wildcard character '*' cannot be used with partial values"
        ));
    }
    if !crate::model::valid_name(name) {
        return Err(format!(
            "{field} {name:?} is not a service name: use letters, digits, '-', '_' and '.' (at most 128)"
        ));
    }
    Ok(())
}

/// Sorts as Consul lists intentions and tries them: precedence first
/// (highest first), then source and destination names.
pub fn sort(list: &mut [Intention]) {
    list.sort_by(|a, b| {
        b.precedence()
            .cmp(&a.precedence())
            .then_with(|| a.source.cmp(&b.source))
            .then_with(|| a.destination.cmp(&b.destination))
    });
}

// === impl HttpMatch ===

impl HttpMatch {
    fn validate(&self, at: &str) -> Result<(), String> {
        let mut parts = 0;
        for (field, value) in [
            ("PathExact", &self.path_exact),
            ("PathPrefix", &self.path_prefix),
            ("PathRegex", &self.path_regex),
        ] {
            let Some(value) = value else { continue };
            parts += 1;
            if value.len() > MAX_PATTERN {
                return Err(format!("{at}.{field} is longer than {MAX_PATTERN} bytes"));
            }
            if field == "PathRegex" {
                compile(value).map_err(|e| format!("{at}.{field}: {e}"))?;
            } else if !value.starts_with('/') {
                return Err(format!("{at}.{field} doesn't start with '/': {value:?}"));
            }
        }
        if parts > 1 {
            return Err(format!(
                "{at} should only contain at most one of PathExact, PathPrefix, or PathRegex"
            ));
        }
        if self.headers.len() > MAX_HEADERS {
            return Err(format!(
                "{at}.Header: {} given, at most {MAX_HEADERS}",
                self.headers.len()
            ));
        }
        for (k, header) in self.headers.iter().enumerate() {
            header.validate(&format!("{at}.Header[{k}]"))?;
        }
        for (j, method) in self.methods.iter().enumerate() {
            if !METHODS.contains(&method.as_str()) {
                return Err(format!(
                    "{at}.Methods contains an invalid method {method:?}"
                ));
            }
            if self.methods[..j].contains(method) {
                return Err(format!("{at}.Methods contains {method:?} more than once"));
            }
        }
        if parts == 0 && self.headers.is_empty() && self.methods.is_empty() {
            return Err(format!("{at} should not be empty"));
        }
        Ok(())
    }
}

// === impl HeaderMatch ===

impl HeaderMatch {
    fn validate(&self, at: &str) -> Result<(), String> {
        if self.name.is_empty() {
            return Err(format!("{at} missing required Name field"));
        }
        if !valid_header_name(&self.name) {
            return Err(format!("{at}.Name {:?} is not a header name", self.name));
        }
        let mut parts = usize::from(self.present);
        for (field, value) in [
            ("Exact", &self.exact),
            ("Prefix", &self.prefix),
            ("Suffix", &self.suffix),
            ("Regex", &self.regex),
        ] {
            let Some(value) = value else { continue };
            parts += 1;
            if value.is_empty() {
                return Err(format!("{at}.{field} is empty"));
            }
            if value.len() > MAX_PATTERN {
                return Err(format!("{at}.{field} is longer than {MAX_PATTERN} bytes"));
            }
            if field == "Regex" {
                compile(value).map_err(|e| format!("{at}.{field}: {e}"))?;
            }
        }
        if parts != 1 {
            return Err(format!(
                "{at} should only contain one of Present, Exact, Prefix, Suffix, or Regex"
            ));
        }
        Ok(())
    }
}

/// An HTTP field name (RFC 9110 token), or a pseudo-header such as
/// `:authority`.
fn valid_header_name(name: &str) -> bool {
    let token = name.strip_prefix(':').unwrap_or(name);
    !token.is_empty()
        && token.len() <= 256
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Compiles a permission's regular expression as a whole-string match,
/// within [`REGEX_SIZE_LIMIT`]: validation and enforcement both use it,
/// so what validates is what is enforced.
fn compile(pattern: &str) -> Result<Regex, String> {
    RegexBuilder::new(&format!(r"\A(?:{pattern})\z"))
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("invalid regular expression: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn l4(source: &str, destination: &str, action: Action) -> Intention {
        Intention {
            id: format!("{source}-{destination}"),
            source: source.to_string(),
            destination: destination.to_string(),
            action: Some(action),
            permissions: Vec::new(),
            shadow: false,
            description: String::new(),
            meta: BTreeMap::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    pub(super) fn l7(source: &str, destination: &str, permissions: Vec<Permission>) -> Intention {
        Intention {
            action: None,
            permissions,
            ..l4(source, destination, Action::Allow)
        }
    }

    pub(super) fn prefix(action: Action, path: &str) -> Permission {
        Permission {
            action,
            http: HttpMatch {
                path_prefix: Some(path.to_string()),
                ..HttpMatch::default()
            },
        }
    }

    #[test]
    fn precedence_is_consuls() {
        assert_eq!(l4("web", "db", Action::Allow).precedence(), 9);
        assert_eq!(l4("*", "db", Action::Allow).precedence(), 8);
        assert_eq!(l4("web", "*", Action::Allow).precedence(), 6);
        assert_eq!(l4("*", "*", Action::Allow).precedence(), 5);
        let mut list = vec![
            l4("*", "*", Action::Deny),
            l4("web", "*", Action::Deny),
            l4("web", "db", Action::Allow),
            l4("*", "db", Action::Deny),
            l4("api", "db", Action::Allow),
        ];
        sort(&mut list);
        let order: Vec<String> = list.iter().map(Intention::label).collect();
        assert_eq!(
            order,
            ["api → db", "web → db", "* → db", "web → *", "* → *"]
        );
    }

    #[test]
    fn good_intentions_validate() {
        for ok in [
            l4("web", "db", Action::Allow),
            l4("*", "db", Action::Deny),
            l4("*", "*", Action::Deny),
            l7("web", "db", vec![prefix(Action::Allow, "/")]),
            l7(
                "web",
                "db",
                vec![Permission {
                    action: Action::Deny,
                    http: HttpMatch {
                        path_regex: Some("/v[0-9]+/admin/.*".into()),
                        methods: vec!["GET".into(), "POST".into()],
                        headers: vec![
                            HeaderMatch {
                                name: "x-debug".into(),
                                present: true,
                                ..HeaderMatch::default()
                            },
                            HeaderMatch {
                                name: ":authority".into(),
                                suffix: Some(".internal".into()),
                                invert: true,
                                ..HeaderMatch::default()
                            },
                        ],
                        ..HttpMatch::default()
                    },
                }],
            ),
        ] {
            assert_eq!(ok.validate(), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn validation_errors_name_the_field() {
        let web_db = || l4("web", "db", Action::Allow);
        let http = |http: HttpMatch| {
            l7(
                "web",
                "db",
                vec![Permission {
                    action: Action::Allow,
                    http,
                }],
            )
        };
        let header = |h: HeaderMatch| {
            http(HttpMatch {
                headers: vec![h],
                ..HttpMatch::default()
            })
        };
        let cases: Vec<(Intention, &str)> = vec![
            (l4("", "db", Action::Allow), "SourceName must be set"),
            (l4("web", "", Action::Allow), "DestinationName must be set"),
            (
                l4("we*", "db", Action::Allow),
                "SourceName: wildcard character '*' cannot be used with partial values",
            ),
            (
                l4("web", "d b", Action::Allow),
                "DestinationName \"d b\" is not a service name",
            ),
            (
                Intention {
                    action: None,
                    ..web_db()
                },
                "Action must be set to 'allow' or 'deny'",
            ),
            (
                Intention {
                    permissions: vec![prefix(Action::Allow, "/")],
                    ..web_db()
                },
                "Action must be omitted if Permissions are specified",
            ),
            (
                l7("web", "*", vec![prefix(Action::Allow, "/")]),
                "Permissions cannot be specified on intentions with wildcarded destinations",
            ),
            (
                l7(
                    "web",
                    "db",
                    vec![prefix(Action::Allow, "/"); MAX_PERMISSIONS + 1],
                ),
                "Permissions: 65 given",
            ),
            (
                Intention {
                    description: "x".repeat(MAX_DESCRIPTION + 1),
                    ..web_db()
                },
                "Description exceeds maximum length 512",
            ),
            (
                Intention {
                    meta: (0..=MAX_META)
                        .map(|i| (i.to_string(), String::new()))
                        .collect(),
                    ..web_db()
                },
                "Meta exceeds maximum element count 64",
            ),
            (
                Intention {
                    meta: BTreeMap::from([("k".repeat(MAX_META_KEY + 1), String::new())]),
                    ..web_db()
                },
                "exceeds maximum length 128",
            ),
            (
                Intention {
                    meta: BTreeMap::from([("k".into(), "v".repeat(MAX_META_VALUE + 1))]),
                    ..web_db()
                },
                "Meta value for key \"k\" exceeds maximum length 512",
            ),
            (
                l7("web", "db", vec![prefix(Action::Allow, "api")]),
                "Permissions[0].HTTP.PathPrefix doesn't start with '/': \"api\"",
            ),
            (
                http(HttpMatch {
                    path_exact: Some("/a".into()),
                    path_prefix: Some("/".into()),
                    ..HttpMatch::default()
                }),
                "Permissions[0].HTTP should only contain at most one of PathExact, PathPrefix, or PathRegex",
            ),
            (
                http(HttpMatch {
                    path_regex: Some("(".into()),
                    ..HttpMatch::default()
                }),
                "Permissions[0].HTTP.PathRegex: invalid regular expression",
            ),
            (
                http(HttpMatch {
                    path_regex: Some("(a{1000}){1000}".into()),
                    ..HttpMatch::default()
                }),
                "Permissions[0].HTTP.PathRegex: invalid regular expression",
            ),
            (
                http(HttpMatch {
                    path_exact: Some(format!("/{}", "a".repeat(MAX_PATTERN))),
                    ..HttpMatch::default()
                }),
                "Permissions[0].HTTP.PathExact is longer than 1024 bytes",
            ),
            (
                http(HttpMatch {
                    methods: vec!["get".into()],
                    ..HttpMatch::default()
                }),
                "Permissions[0].HTTP.Methods contains an invalid method \"get\"",
            ),
            (
                http(HttpMatch {
                    methods: vec!["GET".into(), "GET".into()],
                    ..HttpMatch::default()
                }),
                "Permissions[0].HTTP.Methods contains \"GET\" more than once",
            ),
            (
                http(HttpMatch::default()),
                "Permissions[0].HTTP should not be empty",
            ),
            (
                header(HeaderMatch {
                    present: true,
                    ..HeaderMatch::default()
                }),
                "Permissions[0].HTTP.Header[0] missing required Name field",
            ),
            (
                header(HeaderMatch {
                    name: "x a".into(),
                    present: true,
                    ..HeaderMatch::default()
                }),
                "Permissions[0].HTTP.Header[0].Name \"x a\" is not a header name",
            ),
            (
                header(HeaderMatch {
                    name: "x-a".into(),
                    present: true,
                    exact: Some("1".into()),
                    ..HeaderMatch::default()
                }),
                "Permissions[0].HTTP.Header[0] should only contain one of Present, Exact, Prefix, Suffix, or Regex",
            ),
            (
                header(HeaderMatch {
                    name: "x-a".into(),
                    invert: true,
                    ..HeaderMatch::default()
                }),
                "Permissions[0].HTTP.Header[0] should only contain one of",
            ),
            (
                header(HeaderMatch {
                    name: "x-a".into(),
                    regex: Some("[".into()),
                    ..HeaderMatch::default()
                }),
                "Permissions[0].HTTP.Header[0].Regex: invalid regular expression",
            ),
            (
                header(HeaderMatch {
                    name: "x-a".into(),
                    prefix: Some(String::new()),
                    ..HeaderMatch::default()
                }),
                "Permissions[0].HTTP.Header[0].Prefix is empty",
            ),
            (
                http(HttpMatch {
                    headers: vec![
                        HeaderMatch {
                            name: "x".into(),
                            present: true,
                            ..HeaderMatch::default()
                        };
                        MAX_HEADERS + 1
                    ],
                    ..HttpMatch::default()
                }),
                "Permissions[0].HTTP.Header: 33 given",
            ),
        ];
        for (intention, says) in cases {
            let e = intention.validate().unwrap_err();
            assert!(e.contains(says), "{says:?} not in {e:?}");
        }
    }

    #[test]
    fn records_round_trip_through_serde() {
        let mut i = l7(
            "web",
            "db",
            vec![Permission {
                action: Action::Deny,
                http: HttpMatch {
                    path_exact: Some("/admin".into()),
                    methods: vec!["DELETE".into()],
                    ..HttpMatch::default()
                },
            }],
        );
        i.shadow = true;
        i.meta.insert("team".into(), "db".into());
        let json = serde_json::to_value(&i).unwrap();
        assert_eq!(json["permissions"][0]["action"], "deny");
        assert_eq!(json["permissions"][0]["http"]["path_exact"], "/admin");
        assert!(json.get("action").is_none());
        let back: Intention = serde_json::from_value(json).unwrap();
        assert_eq!(back, i);
        let plain: Intention =
            serde_json::from_str(r#"{"source":"web","destination":"db","action":"allow"}"#)
                .unwrap();
        assert_eq!(plain.action, Some(Action::Allow));
        assert!(!plain.shadow);
    }
}
