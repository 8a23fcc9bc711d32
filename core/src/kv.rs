//! Consul's key/value store and sessions as clients speak them: key
//! names and their validation, the `KVPair` and session JSON shapes,
//! session and transaction request bodies with their bounds, and the
//! query parameters of `/v1/kv`. The control plane keeps the store
//! (`signpost_control_plane::kv`); agents cache what they read.

use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::request::{Fields, bad, object};

/// Largest value (Consul's `kv_max_value_size`); a bigger body is a 413.
pub const MAX_VALUE: usize = 512 * 1024;
/// Longest key, in bytes.
pub const MAX_KEY: usize = 512;
/// Most operations in one `/v1/txn` (Consul's limit).
pub const MAX_TXN_OPS: usize = 64;
/// Largest `/v1/txn` body (Consul's `txn_max_req_len`).
pub const MAX_TXN_BODY: usize = 512 * 1024;
/// Bounds of a session's TTL (Consul's).
pub const MIN_SESSION_TTL: Duration = Duration::from_secs(10);
pub const MAX_SESSION_TTL: Duration = Duration::from_secs(24 * 3600);
/// A session's lock delay unless it says otherwise, and the most it may say.
pub const DEFAULT_LOCK_DELAY: Duration = Duration::from_secs(15);
pub const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);
/// Most checks a session may name.
pub const MAX_SESSION_CHECKS: usize = 64;
/// The node-level check every session has unless it says otherwise:
/// Consul's name for "the node's agent is alive" (Signpost's node
/// liveness: the node is not `failed`).
pub const NODE_HEALTH_CHECK: &str = "serfHealth";
/// Blocking reads wait this long unless `wait` says otherwise, and never
/// longer than the maximum (Consul's).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// Why a key name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("missing key: this request needs a key name (/v1/kv/<key>)")]
    Empty,
    #[error("key is {0} bytes, longer than the {MAX_KEY} allowed")]
    TooLong(usize),
    #[error("key {0:?}: a key may not start with '/'")]
    LeadingSlash(String),
    #[error("key {0:?}: empty segment ('//'): only the last segment may be empty")]
    EmptySegment(String),
    #[error("key {0:?}: '.' and '..' are not key segments")]
    DotSegment(String),
    #[error("key {0:?}: control characters (NUL, newline, ...) are not allowed in keys")]
    Control(String),
}

/// Checks a key name: at most [`MAX_KEY`] bytes, no leading `/`, no
/// empty segment but the last (`dir/` keys), no `.`/`..` segments, no
/// control characters. `prefix_ok`: the empty key is the whole store,
/// which a recursive read or delete may name.
pub fn check_key(key: &str, prefix_ok: bool) -> Result<(), KeyError> {
    if key.is_empty() {
        return if prefix_ok {
            Ok(())
        } else {
            Err(KeyError::Empty)
        };
    }
    if key.len() > MAX_KEY {
        return Err(KeyError::TooLong(key.len()));
    }
    if key.chars().any(char::is_control) {
        return Err(KeyError::Control(key.escape_default().to_string()));
    }
    if key.starts_with('/') {
        return Err(KeyError::LeadingSlash(key.to_string()));
    }
    let segments: Vec<&str> = key.split('/').collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        if segment.is_empty() && i != last {
            return Err(KeyError::EmptySegment(key.to_string()));
        }
        if *segment == "." || *segment == ".." {
            return Err(KeyError::DotSegment(key.to_string()));
        }
    }
    Ok(())
}

/// A session ID: a UUID, as Consul makes them.
pub fn check_session_id(id: &str) -> Result<(), String> {
    let ok = id.len() == 36
        && id.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    if ok {
        Ok(())
    } else {
        Err(format!("invalid session ID {id:?}: expected a UUID"))
    }
}

/// A key and what it holds, in Consul's `KVPair` shape: the value in
/// base64 (`null` when empty), the session that holds its lock if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct KvPair {
    pub lock_index: u64,
    pub key: String,
    pub flags: u64,
    #[serde(with = "base64_value")]
    pub value: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    pub create_index: u64,
    pub modify_index: u64,
}

mod base64_value {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(bytes) if !bytes.is_empty() => {
                s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
            }
            _ => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| {
            base64::engine::general_purpose::STANDARD
                .decode(t)
                .map_err(serde::de::Error::custom)
        })
        .transpose()
    }
}

/// A `service-defaults` config entry: the protocol of a service's
/// instances registered without one (Consul's shape, the part Signpost
/// uses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceDefaults {
    pub kind: String,
    pub name: String,
    pub protocol: String,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub meta: std::collections::BTreeMap<String, String>,
}

impl ServiceDefaults {
    /// Reads a `PUT /v1/config` body (any key casing); `name` is the
    /// service a path names, if it does.
    pub fn parse(body: &[u8], name: Option<&str>) -> Result<ServiceDefaults, String> {
        let mut f = object(crate::request::body(body)?, "the config entry")?;
        let kind = f
            .string("kind")?
            .unwrap_or_else(|| "service-defaults".to_string());
        if kind != "service-defaults" {
            return Err(format!(
                "config entry kind {kind:?} is not supported: Signpost keeps service-defaults"
            ));
        }
        let given = f.string("name")?.filter(|n| !n.is_empty());
        let name = match (given, name) {
            (Some(g), Some(n)) if g != n => {
                return Err(format!("Name {g:?} is not the {n:?} the path names"));
            }
            (Some(g), _) => g,
            (None, Some(n)) => n.to_string(),
            (None, None) => return Err("Name is required".to_string()),
        };
        if !crate::model::valid_name(&name) {
            return Err(format!("Name {name:?} is not a service name"));
        }
        let protocol = f
            .string("protocol")?
            .unwrap_or_else(|| "tcp".to_string())
            .to_ascii_lowercase();
        protocol
            .parse::<crate::model::Protocol>()
            .map_err(|e| format!("Protocol: {e}"))?;
        let meta = f.string_map("meta")?;
        Ok(ServiceDefaults {
            kind,
            name,
            protocol,
            meta,
        })
    }
}

/// What happens to the keys a session holds when it is invalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Behavior {
    /// Locks are released, keys stay.
    #[default]
    Release,
    /// Keys are deleted (ephemeral entries).
    Delete,
}

impl Behavior {
    pub fn as_str(self) -> &'static str {
        match self {
            Behavior::Release => "release",
            Behavior::Delete => "delete",
        }
    }
}

/// `PUT /v1/session/create`, read case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSpec {
    pub name: String,
    /// The node the session belongs to; an agent fills in its own.
    pub node: Option<String>,
    /// Whether the node's liveness is one of its checks ([`NODE_HEALTH_CHECK`]).
    pub node_health: bool,
    /// IDs of checks on the node (service or node checks) that
    /// invalidate the session when critical.
    pub checks: Vec<String>,
    pub lock_delay: Duration,
    pub behavior: Behavior,
    pub ttl: Option<Duration>,
}

impl SessionSpec {
    /// Parses a create body (empty: every default).
    pub fn parse(body: &[u8]) -> Result<SessionSpec, String> {
        let mut f = object(crate::request::body(body)?, "the session")?;
        let name = f.string("name")?.unwrap_or_default();
        if name.len() > 256 {
            return Err("Name: longer than 256 bytes".to_string());
        }
        let node = f.string("node")?.filter(|n| !n.is_empty());
        // `Checks` (legacy: node and service check IDs together), or
        // `NodeChecks` and `ServiceChecks`; none of them: the node's
        // liveness only.
        let mut ids = Vec::new();
        let mut given = false;
        for key in ["checks", "nodechecks"] {
            if let Some(v) = f.take(key) {
                given = true;
                ids.extend(strings(v, key)?);
            }
        }
        if let Some(v) = f.take("servicechecks") {
            given = true;
            let Value::Array(items) = v else {
                return Err(bad("ServiceChecks", "a list of {\"ID\": ...}"));
            };
            for item in items {
                let mut c = object(item, "a ServiceChecks entry")?;
                match c.string("id")? {
                    Some(id) if !id.is_empty() => ids.push(id),
                    _ => return Err("ServiceChecks: every entry needs an ID".to_string()),
                }
            }
        }
        if !given {
            ids.push(NODE_HEALTH_CHECK.to_string());
        }
        ids.sort();
        ids.dedup();
        if ids.len() > MAX_SESSION_CHECKS {
            return Err(format!(
                "a session may name at most {MAX_SESSION_CHECKS} checks, not {}",
                ids.len()
            ));
        }
        let node_health = ids.iter().any(|c| c == NODE_HEALTH_CHECK);
        ids.retain(|c| c != NODE_HEALTH_CHECK);
        let lock_delay = lock_delay(&mut f)?;
        let behavior = match f.string("behavior")?.as_deref() {
            None | Some("") | Some("release") => Behavior::Release,
            Some("delete") => Behavior::Delete,
            Some(other) => {
                return Err(format!(
                    "Behavior: {other:?} is not a session behavior (release or delete)"
                ));
            }
        };
        let ttl = f.duration("ttl")?;
        if let Some(ttl) = ttl
            && !(MIN_SESSION_TTL..=MAX_SESSION_TTL).contains(&ttl)
        {
            return Err(format!(
                "Invalid Session TTL '{}', must be between [10s=24h0m0s]",
                crate::duration::format(ttl)
            ));
        }
        Ok(SessionSpec {
            name,
            node,
            node_health,
            checks: ids,
            lock_delay,
            behavior,
            ttl,
        })
    }
}

fn strings(v: Value, key: &str) -> Result<Vec<String>, String> {
    match v {
        Value::Array(items) => items
            .into_iter()
            .map(|i| match i {
                Value::String(s) if !s.is_empty() => Ok(s),
                _ => Err(bad(key, "a list of check IDs")),
            })
            .collect(),
        _ => Err(bad(key, "a list of check IDs")),
    }
}

/// `LockDelay`: a duration string, or a number that Consul reads as
/// seconds below 1000 and as nanoseconds above.
fn lock_delay(f: &mut Fields) -> Result<Duration, String> {
    let delay = match f.take("lockdelay") {
        None => DEFAULT_LOCK_DELAY,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(secs) if secs < 1000 => Duration::from_secs(secs),
            Some(nanos) => Duration::from_nanos(nanos),
            None => return Err(bad("LockDelay", "a duration such as \"15s\"")),
        },
        Some(Value::String(s)) => crate::duration::parse(&s)
            .map_err(|e| format!("Request decode failed: field \"LockDelay\": {e}"))?,
        Some(_) => return Err(bad("LockDelay", "a duration such as \"15s\"")),
    };
    if delay > MAX_LOCK_DELAY {
        return Err(format!(
            "LockDelay: {} is longer than the {} allowed",
            crate::duration::format(delay),
            crate::duration::format(MAX_LOCK_DELAY)
        ));
    }
    Ok(delay)
}

/// A `/v1/txn` KV operation's verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Set,
    Cas,
    Lock,
    Unlock,
    Get,
    GetTree,
    CheckIndex,
    CheckSession,
    CheckNotExists,
    Delete,
    DeleteTree,
    DeleteCas,
}

impl Verb {
    fn parse(s: &str) -> Option<Verb> {
        Some(match s {
            "set" => Verb::Set,
            "cas" => Verb::Cas,
            "lock" => Verb::Lock,
            "unlock" => Verb::Unlock,
            "get" => Verb::Get,
            "get-tree" => Verb::GetTree,
            "check-index" => Verb::CheckIndex,
            "check-session" => Verb::CheckSession,
            "check-not-exists" => Verb::CheckNotExists,
            "delete" => Verb::Delete,
            "delete-tree" => Verb::DeleteTree,
            "delete-cas" => Verb::DeleteCas,
            _ => return None,
        })
    }

    /// Whether the operation changes the store.
    pub fn writes(self) -> bool {
        matches!(
            self,
            Verb::Set
                | Verb::Cas
                | Verb::Lock
                | Verb::Unlock
                | Verb::Delete
                | Verb::DeleteTree
                | Verb::DeleteCas
        )
    }
}

/// One KV operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnOp {
    pub verb: Verb,
    pub key: String,
    pub value: Vec<u8>,
    pub flags: u64,
    pub index: u64,
    pub session: String,
}

/// Parses a `/v1/txn` body: a JSON array of at most [`MAX_TXN_OPS`]
/// `{"KV": {...}}` operations, every key checked. An error names the
/// operation (by position) and what is wrong with it.
pub fn parse_txn(body: &[u8]) -> Result<Vec<TxnOp>, String> {
    if body.len() > MAX_TXN_BODY {
        return Err(format!(
            "Request body too large: {} bytes, the most is {MAX_TXN_BODY}",
            body.len()
        ));
    }
    let Value::Array(items) = crate::request::body(body)? else {
        return Err("Request decode failed: a transaction is a JSON array of operations".into());
    };
    if items.is_empty() {
        return Err("Transaction contains no operations".into());
    }
    if items.len() > MAX_TXN_OPS {
        return Err(format!(
            "Transaction contains too many operations ({} > {MAX_TXN_OPS})",
            items.len()
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| txn_op(item).map_err(|e| format!("operation {i}: {e}")))
        .collect()
}

fn txn_op(item: Value) -> Result<TxnOp, String> {
    let mut op = object(item, "an operation")?;
    let Some(kv) = op.take("kv") else {
        return Err(
            "only KV operations are supported ({\"KV\": {\"Verb\": ..., \"Key\": ...}})".into(),
        );
    };
    let mut kv = object(kv, "KV")?;
    let verb_text = kv.string("verb")?.unwrap_or_default();
    let verb = Verb::parse(&verb_text).ok_or_else(|| {
        format!("unknown KV verb {verb_text:?} (set, cas, lock, unlock, get, get-tree, check-index, check-session, check-not-exists, delete, delete-tree, delete-cas)")
    })?;
    let key = kv.string("key")?.unwrap_or_default();
    let prefix_ok = matches!(verb, Verb::GetTree | Verb::DeleteTree);
    check_key(&key, prefix_ok).map_err(|e| e.to_string())?;
    let value = match kv.string("value")? {
        None => Vec::new(),
        Some(text) => base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| format!("Value: not base64: {e}"))?,
    };
    if value.len() > MAX_VALUE {
        return Err(format!(
            "Value: {} bytes, more than the {MAX_VALUE} allowed",
            value.len()
        ));
    }
    let number = |kv: &mut Fields, key: &str| -> Result<u64, String> {
        match kv.take(key) {
            None => Ok(0),
            Some(Value::Number(n)) => n.as_u64().ok_or_else(|| bad(key, "a non-negative integer")),
            Some(_) => Err(bad(key, "a number")),
        }
    };
    let flags = number(&mut kv, "flags")?;
    let index = number(&mut kv, "index")?;
    let session = kv.string("session")?.unwrap_or_default();
    if matches!(verb, Verb::Lock | Verb::Unlock | Verb::CheckSession) {
        check_session_id(&session)?;
    }
    Ok(TxnOp {
        verb,
        key,
        value,
        flags,
        index,
        session,
    })
}

/// The query parameters of `/v1/kv/<key>` (and the blocking ones of
/// other reads). A parameter given without a value (`?recurse`) is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvQuery {
    pub recurse: bool,
    pub keys: bool,
    pub separator: Option<String>,
    pub raw: bool,
    /// Blocking: wait until the index passes this one.
    pub index: Option<u64>,
    pub wait: Option<Duration>,
    pub consistent: bool,
    pub stale: bool,
    pub flags: Option<u64>,
    pub cas: Option<u64>,
    pub acquire: Option<String>,
    pub release: Option<String>,
}

impl KvQuery {
    pub fn parse(query: Option<&str>) -> Result<KvQuery, String> {
        let mut q = KvQuery::default();
        let number = |name: &str, v: &str| -> Result<u64, String> {
            v.parse()
                .map_err(|_| format!("invalid {name} {v:?}: expected a non-negative integer"))
        };
        for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let set = value.is_empty() || value != "false";
            match name.as_ref() {
                "recurse" => q.recurse = set,
                "keys" => q.keys = set,
                "raw" => q.raw = set,
                "consistent" => q.consistent = set,
                "stale" => q.stale = set,
                "separator" => q.separator = Some(value.into_owned()).filter(|s| !s.is_empty()),
                "index" => q.index = Some(number("index", &value)?),
                "wait" => {
                    let wait = crate::duration::parse(&value)
                        .map_err(|e| format!("invalid wait {value:?}: {e}"))?;
                    q.wait = Some(wait.min(MAX_WAIT));
                }
                "flags" => q.flags = Some(number("flags", &value)?),
                "cas" => q.cas = Some(number("cas", &value)?),
                "acquire" => {
                    check_session_id(&value)?;
                    q.acquire = Some(value.into_owned());
                }
                "release" => {
                    check_session_id(&value)?;
                    q.release = Some(value.into_owned());
                }
                // dc, token, cached, near, ... : accepted and not needed.
                _ => {}
            }
        }
        if q.consistent && q.stale {
            return Err("Cannot specify ?stale with ?consistent, conflicting semantics.".into());
        }
        if q.acquire.is_some() && q.release.is_some() {
            return Err("Conflicting flags: cannot acquire and release in one request".into());
        }
        Ok(q)
    }

    /// How long a blocking read waits at most, with Consul's jitter
    /// (up to a sixteenth more) so that many watchers do not return in
    /// one burst.
    pub fn wait_for(&self) -> Duration {
        let wait = self.wait.unwrap_or(DEFAULT_WAIT);
        let jitter = wait / 16;
        wait + jitter.mul_f64(rand::random::<f64>())
    }
}

/// `?keys`: the keys under `prefix`, rolled up to the first `separator`
/// after the prefix (`["a/b/", "a/c"]`), sorted, without repeats.
pub fn list_keys<'a>(
    keys: impl Iterator<Item = &'a str>,
    prefix: &str,
    separator: Option<&str>,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for key in keys {
        let Some(rest) = key.strip_prefix(prefix) else {
            continue;
        };
        let shown = match separator.and_then(|sep| rest.find(sep).map(|at| at + sep.len())) {
            Some(end) => &key[..prefix.len() + end],
            None => key,
        };
        if out.last().map(String::as_str) != Some(shown) {
            out.push(shown.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        for ok in [
            "a",
            "a/b",
            "dir/",
            "config/web/timeout",
            "a.b/c..d",
            "ünï/ç",
        ] {
            assert_eq!(check_key(ok, false), Ok(()), "{ok}");
        }
        assert_eq!(check_key("", true), Ok(()));
        assert_eq!(check_key("", false), Err(KeyError::Empty));
        assert!(matches!(
            check_key("/a", false),
            Err(KeyError::LeadingSlash(_))
        ));
        assert!(matches!(
            check_key("a//b", false),
            Err(KeyError::EmptySegment(_))
        ));
        assert!(matches!(
            check_key("a/../b", false),
            Err(KeyError::DotSegment(_))
        ));
        assert!(matches!(
            check_key("..", false),
            Err(KeyError::DotSegment(_))
        ));
        assert!(matches!(
            check_key("a/./b", false),
            Err(KeyError::DotSegment(_))
        ));
        assert!(matches!(
            check_key("a\0b", false),
            Err(KeyError::Control(_))
        ));
        assert!(matches!(
            check_key("a\nb", false),
            Err(KeyError::Control(_))
        ));
        assert!(matches!(
            check_key(&"k".repeat(MAX_KEY + 1), false),
            Err(KeyError::TooLong(_))
        ));
    }

    #[test]
    fn sessions_parse_as_clients_send_them() {
        // py-consul's lowercase keys, a TTL and a delay in seconds.
        let s = SessionSpec::parse(
            br#"{"name": "lead", "lockdelay": "1s", "ttl": "10s", "behavior": "delete"}"#,
        )
        .unwrap();
        assert_eq!(s.name, "lead");
        assert_eq!(s.lock_delay, Duration::from_secs(1));
        assert_eq!(s.ttl, Some(Duration::from_secs(10)));
        assert_eq!(s.behavior, Behavior::Delete);
        assert!(s.node_health, "serfHealth by default");
        // Empty body: every default.
        let s = SessionSpec::parse(b"").unwrap();
        assert_eq!(s.lock_delay, DEFAULT_LOCK_DELAY);
        assert_eq!(s.behavior, Behavior::Release);
        // Checks given without serfHealth: only those.
        let s = SessionSpec::parse(br#"{"Checks": ["service:web"], "LockDelay": 5}"#).unwrap();
        assert!(!s.node_health);
        assert_eq!(s.checks, vec!["service:web".to_string()]);
        assert_eq!(s.lock_delay, Duration::from_secs(5));
        let s = SessionSpec::parse(br#"{"LockDelay": 2000000000}"#).unwrap();
        assert_eq!(s.lock_delay, Duration::from_secs(2));
        for bad in [
            r#"{"TTL": "5s"}"#,
            r#"{"TTL": "25h"}"#,
            r#"{"Behavior": "keep"}"#,
            r#"{"LockDelay": "2m"}"#,
            r#"{"Checks": "serfHealth"}"#,
            r#"[1]"#,
        ] {
            assert!(SessionSpec::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn transactions_are_bounded_and_checked() {
        let ops = parse_txn(br#"[{"KV": {"Verb": "set", "Key": "a", "Value": "aGk=", "Flags": 3}}, {"kv": {"verb": "get-tree", "key": ""}}]"#).unwrap();
        assert_eq!(ops[0].value, b"hi");
        assert_eq!(ops[0].flags, 3);
        assert_eq!(ops[1].verb, Verb::GetTree);
        let many = format!(
            "[{}]",
            vec![r#"{"KV": {"Verb": "get", "Key": "a"}}"#; MAX_TXN_OPS + 1].join(",")
        );
        assert!(parse_txn(many.as_bytes()).unwrap_err().contains("too many"));
        for (body, says) in [
            (r#"[]"#, "no operations"),
            (r#"{}"#, "JSON array"),
            (
                r#"[{"KV": {"Verb": "set", "Key": "../etc"}}]"#,
                "operation 0",
            ),
            (
                r#"[{"KV": {"Verb": "explode", "Key": "a"}}]"#,
                "unknown KV verb",
            ),
            (r#"[{"Node": {"Verb": "set"}}]"#, "only KV"),
            (
                r#"[{"KV": {"Verb": "set", "Key": "a", "Value": "!!"}}]"#,
                "base64",
            ),
            (
                r#"[{"KV": {"Verb": "lock", "Key": "a", "Session": "x"}}]"#,
                "session ID",
            ),
            (r#"[{"KV": {"Verb": "set", "Key": ""}}]"#, "missing key"),
        ] {
            let e = parse_txn(body.as_bytes()).unwrap_err();
            assert!(e.contains(says), "{body}: {e}");
        }
    }

    #[test]
    fn query_flags_without_values_are_set() {
        let q = KvQuery::parse(Some("recurse&index=7&wait=1s&cas=0")).unwrap();
        assert!(q.recurse && !q.keys);
        assert_eq!(q.index, Some(7));
        assert_eq!(q.cas, Some(0));
        assert_eq!(q.wait, Some(Duration::from_secs(1)));
        assert!(KvQuery::parse(Some("stale&consistent")).is_err());
        assert!(KvQuery::parse(Some("index=x")).is_err());
        assert!(KvQuery::parse(Some("acquire=not-a-uuid")).is_err());
        assert_eq!(
            KvQuery::parse(Some("wait=1h")).unwrap().wait,
            Some(MAX_WAIT)
        );
    }

    #[test]
    fn keys_roll_up_to_the_separator() {
        let keys = ["base/", "base/base/a", "base/base/b", "base/foo", "other"];
        assert_eq!(
            list_keys(keys.iter().copied(), "base/", Some("/")),
            vec!["base/", "base/base/", "base/foo"]
        );
        assert_eq!(
            list_keys(keys.iter().copied(), "base/f", None),
            vec!["base/foo"]
        );
    }

    #[test]
    fn pairs_have_consuls_shape() {
        let pair = KvPair {
            lock_index: 0,
            key: "a".into(),
            flags: 0,
            value: Some(Vec::new()),
            session: None,
            create_index: 3,
            modify_index: 4,
        };
        let json = serde_json::to_value(&pair).unwrap();
        assert_eq!(json["Value"], Value::Null, "an empty value is null");
        assert!(json.get("Session").is_none());
        assert_eq!(json["CreateIndex"], 3);
    }
}
