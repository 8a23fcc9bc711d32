//! The intentions an agent enforces, compiled once when a set arrives:
//! regular expressions built, header names lowercased, and an index by
//! (destination, source) so that a decision is four map lookups, not a
//! scan of every intention.
//!
//! Consul's semantics, which this follows:
//! - Only the highest-precedence intention matching a source and a
//!   destination applies; lower ones for that pair are never consulted
//!   (Consul's RBAC generator `agent/xds/rbac.go` subtracts every
//!   higher-precedence source from lower intentions: "for a specific
//!   source L4 and L7 intentions are mutually exclusive. Only one will
//!   apply at a time", service-intentions config entry reference).
//! - An L7 intention's permissions are tried in order and the first that
//!   matches decides. A request that matches none falls to the *default*
//!   (the ACL default policy), not to a lower-precedence intention: in
//!   `rbac.go`, permissions whose action equals the default are dropped
//!   as "handled by the default catch-all", and the docs say "a default
//!   catch-all based on the default ACL policy will apply to unmatched
//!   connections and requests" (service-intentions reference, 1.9+).
//! - A connection (L4) cannot be checked against HTTP permissions, so an
//!   L7 intention denies it (`rbac.go`: "In case L7 intentions slip
//!   through to here, treat them as deny intentions"; `consul intention
//!   check` "will always treat intentions with Permissions defined as
//!   deny intentions").

use std::collections::HashMap;

use regex::Regex;

use super::{Action, HeaderMatch, Intention, Permission, WILDCARD, compile};

/// Which end of an intention `/v1/connect/intentions/match` looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    Source,
    Destination,
}

impl By {
    /// `source` or `destination`, as the `by` query parameter says it.
    pub fn parse(text: &str) -> Option<By> {
        match text {
            "source" => Some(By::Source),
            "destination" => Some(By::Destination),
            _ => None,
        }
    }
}

/// What an L7 decision looks at. Built per request from the proxy's own
/// request type; core does not depend on `http`.
pub struct Request<'a, 'h> {
    /// As sent (methods are case-sensitive).
    pub method: &'a str,
    /// The path; anything from `?` on is ignored, as Envoy's `url_path`.
    pub path: &'a str,
    /// A header's value by lowercase name, `None` when absent; several
    /// values joined with `,` (as Envoy matches them). `:method` and
    /// `:path` are answered from the fields above; other pseudo-headers
    /// (`:authority`) are asked for as named. With `http::HeaderMap`:
    /// `&|name| map.get(name).and_then(|v| v.to_str().ok())`.
    pub headers: &'a dyn Fn(&str) -> Option<&'h str>,
}

/// The verdict on a connection or a request, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the call goes through (also when only shadow-denied).
    pub allowed: bool,
    /// The verdict was deny, but shadow mode let the call through: log
    /// and count it.
    pub shadow_denied: bool,
    /// The ID of the intention that applied; `None` when none matched and
    /// the default decided.
    pub intention: Option<String>,
    /// For logs: `intention web → db (deny)`, `default deny`, ...
    pub reason: String,
}

/// The set of intentions an agent enforces, compiled.
#[derive(Debug, Clone)]
pub struct Intentions {
    /// In Consul's order ([`super::sort`]).
    list: Vec<Compiled>,
    /// destination → source → index in `list` (exact names and `*`).
    by_pair: HashMap<String, HashMap<String, usize>>,
    default: Action,
    shadow_all: bool,
}

#[derive(Debug, Clone)]
struct Compiled {
    intention: Intention,
    rule: Rule,
}

#[derive(Debug, Clone)]
enum Rule {
    Action(Action),
    Permissions(Vec<CompiledPermission>),
    /// Did not validate (the store should never hand one out): it denies.
    Invalid,
}

#[derive(Debug, Clone)]
struct CompiledPermission {
    action: Action,
    path: Option<PathTest>,
    methods: Vec<String>,
    headers: Vec<HeaderTest>,
}

#[derive(Debug, Clone)]
enum PathTest {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug, Clone)]
struct HeaderTest {
    /// Lowercase.
    name: String,
    test: ValueTest,
    invert: bool,
}

#[derive(Debug, Clone)]
enum ValueTest {
    Present,
    Exact(String),
    Prefix(String),
    Suffix(String),
    Regex(Regex),
}

// === impl Intentions ===

impl Intentions {
    /// Compiles `list`. `default` is what applies where no intention
    /// matches (the ACL default policy); `shadow_all` puts every deny,
    /// the default's included, in shadow mode.
    ///
    /// The store keeps one intention per (source, destination); should
    /// two arrive, the first in Consul's order (then in `list`'s) applies.
    /// An intention that does not validate denies, and is logged.
    pub fn new(mut list: Vec<Intention>, default: Action, shadow_all: bool) -> Intentions {
        super::sort(&mut list);
        let list: Vec<Compiled> = list.into_iter().map(Compiled::new).collect();
        let mut by_pair: HashMap<String, HashMap<String, usize>> = HashMap::new();
        for (i, c) in list.iter().enumerate() {
            by_pair
                .entry(c.intention.destination.clone())
                .or_default()
                .entry(c.intention.source.clone())
                .or_insert(i);
        }
        Intentions {
            list,
            by_pair,
            default,
            shadow_all,
        }
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The intention that applies to `source` calling `destination`: the
    /// exact pair (precedence 9), else `*` → destination (8), else
    /// source → `*` (6), else `*` → `*` (5).
    fn applying(&self, source: &str, destination: &str) -> Option<&Compiled> {
        [
            (destination, source),
            (destination, WILDCARD),
            (WILDCARD, source),
            (WILDCARD, WILDCARD),
        ]
        .into_iter()
        .find_map(|(d, s)| self.by_pair.get(d)?.get(s))
        .and_then(|&i| self.list.get(i))
    }

    /// Decides a connection (L4) from `source` to `destination`. An
    /// intention with HTTP permissions denies it: a connection has no
    /// requests to check them against (as Consul, which also refuses L7
    /// intentions for TCP services).
    pub fn connection(&self, source: &str, destination: &str) -> Decision {
        let Some(c) = self.applying(source, destination) else {
            return self.by_default();
        };
        match &c.rule {
            Rule::Action(action) => self.decide(Some(c), *action, c.reason(*action)),
            Rule::Permissions(_) => self.decide(
                Some(c),
                Action::Deny,
                format!(
                    "intention {} has HTTP permissions, which a connection cannot be checked against (deny)",
                    c.intention.label()
                ),
            ),
            Rule::Invalid => self.decide(Some(c), Action::Deny, c.invalid()),
        }
    }

    /// Decides one HTTP request (L7): an L4 intention decides as for a
    /// connection; an L7 one by its first matching permission, or, when
    /// none matches, by the default (Consul's "default catch-all"; see the
    /// module's notes). That fall-through still names the intention, whose
    /// shadow mode applies to it.
    pub fn request(&self, source: &str, destination: &str, req: &Request<'_, '_>) -> Decision {
        let Some(c) = self.applying(source, destination) else {
            return self.by_default();
        };
        match &c.rule {
            Rule::Action(action) => self.decide(Some(c), *action, c.reason(*action)),
            Rule::Invalid => self.decide(Some(c), Action::Deny, c.invalid()),
            Rule::Permissions(permissions) => {
                match permissions.iter().enumerate().find(|(_, p)| p.matches(req)) {
                    Some((i, p)) => self.decide(
                        Some(c),
                        p.action,
                        format!(
                            "intention {}: Permissions[{i}] ({})",
                            c.intention.label(),
                            p.action.as_str()
                        ),
                    ),
                    None => self.decide(
                        Some(c),
                        self.default,
                        format!(
                            "intention {}: no permission matches, default {}",
                            c.intention.label(),
                            self.default.as_str()
                        ),
                    ),
                }
            }
        }
    }

    /// Whether every call from `source` to `destination` is denied for
    /// real, whatever the request, so the connection can be closed before
    /// reading one: the applying intention is a plain deny (or invalid),
    /// or an L7 one whose permissions all deny with a default deny, or
    /// none applies and the default denies; and shadow mode is off for
    /// it.
    pub fn closes_connection(&self, source: &str, destination: &str) -> bool {
        let (shadow, action) = match self.applying(source, destination) {
            None => (false, self.default),
            Some(c) => {
                let action = match &c.rule {
                    Rule::Action(action) => *action,
                    Rule::Invalid => Action::Deny,
                    Rule::Permissions(p) if p.iter().all(|p| p.action == Action::Deny) => {
                        self.default
                    }
                    Rule::Permissions(_) => return false,
                };
                (c.intention.shadow, action)
            }
        };
        action == Action::Deny && !shadow && !self.shadow_all
    }

    /// The intentions whose source (or destination) is `name` or `*`, in
    /// the order they are tried (`/v1/connect/intentions/match`).
    pub fn matching(&self, by: By, name: &str) -> Vec<&Intention> {
        self.list
            .iter()
            .map(|c| &c.intention)
            .filter(|i| {
                let end = match by {
                    By::Source => &i.source,
                    By::Destination => &i.destination,
                };
                end == name || end == WILDCARD
            })
            .collect()
    }

    fn by_default(&self) -> Decision {
        self.decide(
            None,
            self.default,
            format!("default {}", self.default.as_str()),
        )
    }

    /// The verdict `action`, turned into a shadow deny where shadow mode
    /// applies.
    fn decide(&self, by: Option<&Compiled>, action: Action, reason: String) -> Decision {
        let shadow = self.shadow_all || by.is_some_and(|c| c.intention.shadow);
        let denied = action == Action::Deny;
        Decision {
            allowed: !denied || shadow,
            shadow_denied: denied && shadow,
            intention: by.map(|c| c.intention.id.clone()),
            reason,
        }
    }
}

// === impl Compiled ===

impl Compiled {
    fn new(intention: Intention) -> Compiled {
        let rule = match intention
            .validate()
            .and_then(|()| Rule::compile(&intention))
        {
            Ok(rule) => rule,
            Err(error) => {
                tracing::warn!(
                    intention = %intention.id,
                    pair = %intention.label(),
                    %error,
                    "an intention does not validate: it denies"
                );
                Rule::Invalid
            }
        };
        Compiled { intention, rule }
    }

    fn reason(&self, action: Action) -> String {
        format!("intention {} ({})", self.intention.label(), action.as_str())
    }

    fn invalid(&self) -> String {
        format!("intention {} is invalid (deny)", self.intention.label())
    }
}

// === impl Rule ===

impl Rule {
    fn compile(intention: &Intention) -> Result<Rule, String> {
        if intention.permissions.is_empty() {
            return intention
                .action
                .map(Rule::Action)
                .ok_or_else(|| "no action".to_string());
        }
        intention
            .permissions
            .iter()
            .map(CompiledPermission::new)
            .collect::<Result<_, _>>()
            .map(Rule::Permissions)
    }
}

// === impl CompiledPermission ===

impl CompiledPermission {
    fn new(p: &Permission) -> Result<CompiledPermission, String> {
        let http = &p.http;
        let path = match (&http.path_exact, &http.path_prefix, &http.path_regex) {
            (Some(exact), _, _) => Some(PathTest::Exact(exact.clone())),
            (_, Some(prefix), _) => Some(PathTest::Prefix(prefix.clone())),
            (_, _, Some(regex)) => Some(PathTest::Regex(compile(regex)?)),
            _ => None,
        };
        Ok(CompiledPermission {
            action: p.action,
            path,
            methods: http.methods.clone(),
            headers: http
                .headers
                .iter()
                .map(HeaderTest::new)
                .collect::<Result<_, _>>()?,
        })
    }

    /// Every part given matches (Consul ANDs them).
    fn matches(&self, req: &Request<'_, '_>) -> bool {
        let path = req.path.split_once('?').map_or(req.path, |(p, _)| p);
        let path_ok = match &self.path {
            None => true,
            Some(PathTest::Exact(p)) => path == p,
            Some(PathTest::Prefix(p)) => path.starts_with(p.as_str()),
            Some(PathTest::Regex(r)) => r.is_match(path),
        };
        path_ok
            && (self.methods.is_empty() || self.methods.iter().any(|m| m == req.method))
            && self.headers.iter().all(|h| h.matches(req))
    }
}

// === impl HeaderTest ===

impl HeaderTest {
    fn new(h: &HeaderMatch) -> Result<HeaderTest, String> {
        let test = match (&h.exact, &h.prefix, &h.suffix, &h.regex) {
            (Some(v), _, _, _) => ValueTest::Exact(v.clone()),
            (_, Some(v), _, _) => ValueTest::Prefix(v.clone()),
            (_, _, Some(v), _) => ValueTest::Suffix(v.clone()),
            (_, _, _, Some(v)) => ValueTest::Regex(compile(v)?),
            _ if h.present => ValueTest::Present,
            _ => return Err(format!("header {:?} tests nothing", h.name)),
        };
        Ok(HeaderTest {
            name: h.name.to_ascii_lowercase(),
            test,
            invert: h.invert,
        })
    }

    /// Envoy's header matcher: a missing header matches nothing but
    /// `Present` inverted; `Invert` negates the result.
    fn matches(&self, req: &Request<'_, '_>) -> bool {
        let value = match self.name.as_str() {
            ":method" => Some(req.method),
            ":path" => Some(req.path),
            name => (req.headers)(name),
        };
        let hit = match (&self.test, value) {
            (ValueTest::Present, v) => v.is_some(),
            (_, None) => false,
            (ValueTest::Exact(e), Some(v)) => v == e,
            (ValueTest::Prefix(p), Some(v)) => v.starts_with(p.as_str()),
            (ValueTest::Suffix(s), Some(v)) => v.ends_with(s.as_str()),
            (ValueTest::Regex(r), Some(v)) => r.is_match(v),
        };
        hit != self.invert
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::tests::{l4, l7, prefix};
    use super::super::{HttpMatch, Permission};
    use super::*;

    fn req<'a, 'h>(
        method: &'a str,
        path: &'a str,
        headers: &'a dyn Fn(&str) -> Option<&'h str>,
    ) -> Request<'a, 'h> {
        Request {
            method,
            path,
            headers,
        }
    }

    fn no_headers(_: &str) -> Option<&'static str> {
        None
    }

    #[test]
    fn the_most_precise_intention_decides_and_the_default_otherwise() {
        let set = Intentions::new(
            vec![
                l4("*", "*", Action::Deny),
                l4("web", "*", Action::Allow),
                l4("*", "db", Action::Deny),
                l4("web", "db", Action::Allow),
                l4("api", "cache", Action::Deny),
            ],
            Action::Allow,
            false,
        );
        let d = set.connection("web", "db");
        assert!(d.allowed);
        assert_eq!(d.intention.as_deref(), Some("web-db"));
        assert_eq!(d.reason, "intention web → db (allow)");
        // `* → db` (8) beats `web → *` (6).
        let d = set.connection("api", "db");
        assert!(!d.allowed);
        assert_eq!(d.intention.as_deref(), Some("*-db"));
        assert!(!set.connection("web2", "db").allowed);
        assert!(set.connection("web", "cache").allowed, "web → * (6)");
        let d = set.connection("api", "cache");
        assert!(!d.allowed, "exact deny");
        assert!(!set.connection("other", "queue").allowed, "* → * deny");

        let open = Intentions::new(vec![l4("api", "db", Action::Deny)], Action::Allow, false);
        let d = open.connection("web", "db");
        assert_eq!(
            d,
            Decision {
                allowed: true,
                shadow_denied: false,
                intention: None,
                reason: "default allow".into(),
            }
        );
        assert!(
            !open.connection("api", "db").allowed,
            "a deny beats the open default"
        );
        let closed = Intentions::new(vec![l4("web", "db", Action::Allow)], Action::Deny, false);
        assert!(closed.connection("web", "db").allowed);
        let d = closed.connection("api", "db");
        assert!(!d.allowed);
        assert_eq!(d.reason, "default deny");
        assert!(Intentions::new(Vec::new(), Action::Deny, false).is_empty());
    }

    #[test]
    fn permissions_are_tried_in_order_and_unmatched_requests_get_the_default() {
        let set = |default| {
            Intentions::new(
                vec![
                    l7(
                        "web",
                        "db",
                        vec![prefix(Action::Deny, "/admin"), prefix(Action::Allow, "/")],
                    ),
                    l7(
                        "api",
                        "db",
                        vec![Permission {
                            action: Action::Allow,
                            http: HttpMatch {
                                path_exact: Some("/health".into()),
                                methods: vec!["GET".into()],
                                ..HttpMatch::default()
                            },
                        }],
                    ),
                    // Lower precedence: never consulted for web or api.
                    l4("*", "db", Action::Allow),
                ],
                default,
                false,
            )
        };
        let set_deny = set(Action::Deny);
        let d = set_deny.request("web", "db", &req("GET", "/admin/users", &no_headers));
        assert!(!d.allowed);
        assert_eq!(d.reason, "intention web → db: Permissions[0] (deny)");
        let d = set_deny.request("web", "db", &req("GET", "/users?admin=1", &no_headers));
        assert!(d.allowed);
        assert_eq!(d.reason, "intention web → db: Permissions[1] (allow)");
        assert!(
            set_deny
                .request("api", "db", &req("GET", "/health?full", &no_headers))
                .allowed
        );
        let d = set_deny.request("api", "db", &req("POST", "/health", &no_headers));
        assert!(
            !d.allowed,
            "no permission matches: the default, not `* → db`"
        );
        assert_eq!(d.intention.as_deref(), Some("api-db"));
        assert_eq!(
            d.reason,
            "intention api → db: no permission matches, default deny"
        );
        assert!(
            set(Action::Allow)
                .request("api", "db", &req("POST", "/health", &no_headers))
                .allowed
        );
        assert!(
            set_deny
                .request("cache", "db", &req("POST", "/x", &no_headers))
                .allowed,
            "an L4 intention decides requests too"
        );

        // A connection cannot be checked against permissions.
        let d = set(Action::Allow).connection("web", "db");
        assert!(!d.allowed);
        assert!(d.reason.contains("HTTP permissions"), "{}", d.reason);
    }

    #[test]
    fn headers_methods_and_regexes_match_as_envoy() {
        let header = |h: HeaderMatch| {
            Intentions::new(
                vec![l7(
                    "web",
                    "db",
                    vec![Permission {
                        action: Action::Allow,
                        http: HttpMatch {
                            headers: vec![h],
                            ..HttpMatch::default()
                        },
                    }],
                )],
                Action::Deny,
                false,
            )
        };
        let with = |name: &str, test: fn(&mut HeaderMatch)| {
            let mut h = HeaderMatch {
                name: name.into(),
                ..HeaderMatch::default()
            };
            test(&mut h);
            header(h)
        };
        let headers: BTreeMap<&str, &str> =
            BTreeMap::from([("x-env", "prod-eu"), ("host", "db.internal")]);
        let lookup = |name: &str| headers.get(name).copied();
        let allowed = |set: &Intentions, method: &str| {
            set.request("web", "db", &req(method, "/v1/x", &lookup))
                .allowed
        };
        let present = with("X-Env", |h| h.present = true);
        assert!(allowed(&present, "GET"), "names compare without case");
        assert!(!allowed(&with("x-missing", |h| h.present = true), "GET"));
        assert!(allowed(
            &with("x-missing", |h| {
                h.present = true;
                h.invert = true;
            }),
            "GET"
        ));
        assert!(allowed(
            &with("x-env", |h| h.exact = Some("prod-eu".into())),
            "GET"
        ));
        assert!(!allowed(
            &with("x-env", |h| h.exact = Some("prod".into())),
            "GET"
        ));
        assert!(allowed(
            &with("x-env", |h| h.prefix = Some("prod".into())),
            "GET"
        ));
        assert!(allowed(
            &with("x-env", |h| h.suffix = Some("-eu".into())),
            "GET"
        ));
        assert!(allowed(
            &with("x-env", |h| h.regex = Some("prod-(eu|us)".into())),
            "GET"
        ));
        assert!(
            !allowed(&with("x-env", |h| h.regex = Some("prod".into())), "GET"),
            "regexes match the whole value"
        );
        assert!(allowed(
            &with("x-env", |h| {
                h.exact = Some("staging".into());
                h.invert = true;
            }),
            "GET"
        ));
        assert!(
            allowed(
                &with("x-missing", |h| {
                    h.exact = Some("1".into());
                    h.invert = true;
                }),
                "GET"
            ),
            "an inverted test on a missing header matches"
        );
        assert!(allowed(
            &with(":method", |h| h.exact = Some("PUT".into())),
            "PUT"
        ));
        assert!(!allowed(
            &with(":method", |h| h.exact = Some("PUT".into())),
            "GET"
        ));

        let paths = |http: HttpMatch| {
            Intentions::new(
                vec![l7(
                    "web",
                    "db",
                    vec![Permission {
                        action: Action::Allow,
                        http,
                    }],
                )],
                Action::Deny,
                false,
            )
        };
        let regex = paths(HttpMatch {
            path_regex: Some("/v[0-9]+/items".into()),
            methods: vec!["GET".into(), "HEAD".into()],
            ..HttpMatch::default()
        });
        let at = |set: &Intentions, method: &str, path: &str| {
            set.request("web", "db", &req(method, path, &no_headers))
                .allowed
        };
        assert!(at(&regex, "GET", "/v2/items"));
        assert!(at(&regex, "HEAD", "/v10/items?page=2"));
        assert!(!at(&regex, "POST", "/v2/items"), "method not listed");
        assert!(!at(&regex, "GET", "/v2/items/7"), "anchored at the end");
        assert!(!at(&regex, "GET", "/api/v2/items"), "anchored at the start");
        let exact = paths(HttpMatch {
            path_exact: Some("/health".into()),
            ..HttpMatch::default()
        });
        assert!(at(&exact, "DELETE", "/health"), "no methods: any");
        assert!(!at(&exact, "GET", "/healthz"));
    }

    #[test]
    fn shadow_mode_lets_denies_through_and_says_so() {
        let mut shadow_deny = l4("web", "db", Action::Deny);
        shadow_deny.shadow = true;
        let mut shadow_l7 = l7("api", "db", vec![prefix(Action::Deny, "/admin")]);
        shadow_l7.shadow = true;
        let set = Intentions::new(
            vec![
                shadow_deny,
                shadow_l7,
                l4("batch", "db", Action::Deny),
                l4("ops", "db", Action::Allow),
            ],
            Action::Deny,
            false,
        );
        let d = set.connection("web", "db");
        assert!(d.allowed && d.shadow_denied);
        assert_eq!(d.reason, "intention web → db (deny)");
        let d = set.request("api", "db", &req("GET", "/admin", &no_headers));
        assert!(d.allowed && d.shadow_denied);
        let d = set.request("api", "db", &req("GET", "/public", &no_headers));
        assert!(
            d.allowed && d.shadow_denied,
            "the default deny it falls to is the shadow intention's"
        );
        let d = set.connection("batch", "db");
        assert!(!d.allowed && !d.shadow_denied, "not in shadow mode");
        let d = set.connection("ops", "db");
        assert!(d.allowed && !d.shadow_denied);
        let d = set.connection("other", "db");
        assert!(
            !d.allowed && !d.shadow_denied,
            "the default is not shadowed"
        );

        let all = Intentions::new(vec![l4("batch", "db", Action::Deny)], Action::Deny, true);
        for source in ["batch", "other"] {
            let d = all.connection(source, "db");
            assert!(d.allowed && d.shadow_denied, "{source}");
        }
    }

    #[test]
    fn connections_close_early_only_on_a_hard_deny_for_every_request() {
        let mut shadow = l4("web", "db", Action::Deny);
        shadow.shadow = true;
        let set = |default, shadow_all| {
            Intentions::new(
                vec![
                    shadow.clone(),
                    l4("batch", "db", Action::Deny),
                    l4("ops", "db", Action::Allow),
                    l7("api", "db", vec![prefix(Action::Allow, "/")]),
                    l7("cron", "db", vec![prefix(Action::Deny, "/")]),
                ],
                default,
                shadow_all,
            )
        };
        let strict = set(Action::Deny, false);
        assert!(strict.closes_connection("batch", "db"));
        assert!(!strict.closes_connection("web", "db"), "shadow");
        assert!(!strict.closes_connection("ops", "db"));
        assert!(
            !strict.closes_connection("api", "db"),
            "depends on the request"
        );
        assert!(
            strict.closes_connection("cron", "db"),
            "every permission and the default deny"
        );
        assert!(strict.closes_connection("other", "db"), "default deny");
        let open = set(Action::Allow, false);
        assert!(open.closes_connection("batch", "db"));
        assert!(!open.closes_connection("cron", "db"));
        assert!(!open.closes_connection("other", "db"));
        let shadowed = set(Action::Deny, true);
        assert!(!shadowed.closes_connection("batch", "db"));
        assert!(!shadowed.closes_connection("other", "db"));
    }

    #[test]
    fn an_invalid_intention_denies() {
        let mut bad = l7("web", "db", vec![prefix(Action::Allow, "/")]);
        bad.permissions[0].http.path_regex = Some("(".into());
        bad.permissions[0].http.path_prefix = None;
        let mut both = l4("api", "db", Action::Allow);
        both.permissions = vec![prefix(Action::Allow, "/")];
        let set = Intentions::new(vec![bad, both], Action::Allow, false);
        for source in ["web", "api"] {
            let d = set.request(source, "db", &req("GET", "/", &no_headers));
            assert!(!d.allowed, "{source}");
            assert!(d.reason.ends_with("is invalid (deny)"), "{}", d.reason);
            assert!(set.closes_connection(source, "db"));
        }
    }

    #[test]
    fn match_lists_by_source_or_destination_in_precedence_order() {
        let set = Intentions::new(
            vec![
                l4("*", "*", Action::Deny),
                l4("web", "*", Action::Allow),
                l4("*", "db", Action::Deny),
                l4("web", "db", Action::Allow),
                l4("api", "db", Action::Allow),
                l4("web", "cache", Action::Allow),
            ],
            Action::Deny,
            false,
        );
        let labels = |v: Vec<&Intention>| v.into_iter().map(Intention::label).collect::<Vec<_>>();
        assert_eq!(
            labels(set.matching(By::Destination, "db")),
            ["api → db", "web → db", "* → db", "web → *", "* → *"]
        );
        assert_eq!(
            labels(set.matching(By::Source, "web")),
            ["web → cache", "web → db", "* → db", "web → *", "* → *"]
        );
        assert_eq!(By::parse("source"), Some(By::Source));
        assert_eq!(By::parse("dest"), None);
    }
}
