//! Consul request bodies: Consul decodes case-insensitively and accepts
//! snake_case (clients send `ID`, `id`, `Name`, `name`, `LockDelay`,
//! `lockdelay`, `deregister_critical_service_after`, ...). Every key that
//! names a field is normalised (lowercase, `_` and `-` removed) before it
//! is read, and user data keys (`Meta`, `Header`, tagged address names)
//! are left alone. Durations are Go strings or numbers of nanoseconds.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};

/// Keys whose values are maps of user data, not fields.
const DATA_MAPS: &[&str] = &["meta", "header", "nodemeta", "servicemeta"];

fn normalize_key(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

/// Lowercases field names recursively, keeping data maps as sent.
pub fn normalize(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut out = Map::new();
            for (key, value) in map {
                let key = normalize_key(&key);
                let value = if DATA_MAPS.contains(&key.as_str()) {
                    value
                } else if key == "taggedaddresses" {
                    match value {
                        Value::Object(tags) => Value::Object(
                            tags.into_iter().map(|(t, v)| (t, normalize(v))).collect(),
                        ),
                        other => other,
                    }
                } else {
                    normalize(value)
                };
                out.insert(key, value);
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.into_iter().map(normalize).collect()),
        other => other,
    }
}

/// A body field that was present but not of the expected type.
pub fn bad(field: &str, expected: &str) -> String {
    format!("Request decode failed: field {field:?}: expected {expected}")
}

pub struct Fields(Map<String, Value>);

impl Fields {
    /// A field's value, left in place.
    pub fn peek(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.0.remove(key).filter(|v| !v.is_null())
    }

    pub fn string(&mut self, key: &str) -> Result<Option<String>, String> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(bad(key, "a string")),
        }
    }

    pub fn bool(&mut self, key: &str) -> Result<bool, String> {
        match self.take(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(b),
            Some(_) => Err(bad(key, "true or false")),
        }
    }

    pub fn u32(&mut self, key: &str) -> Result<u32, String> {
        match self.take(key) {
            None => Ok(0),
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad(key, "a non-negative integer")),
            Some(_) => Err(bad(key, "a number")),
        }
    }

    pub fn strings(&mut self, key: &str) -> Result<Vec<String>, String> {
        match self.take(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(bad(key, "a list of strings")),
                })
                .collect(),
            Some(_) => Err(bad(key, "a list of strings")),
        }
    }

    pub fn string_map(&mut self, key: &str) -> Result<BTreeMap<String, String>, String> {
        match self.take(key) {
            None => Ok(BTreeMap::new()),
            Some(Value::Object(map)) => map
                .into_iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k, s)),
                    _ => Err(bad(key, "a map of strings")),
                })
                .collect(),
            Some(_) => Err(bad(key, "a map of strings")),
        }
    }

    pub fn duration(&mut self, key: &str) -> Result<Option<Duration>, String> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => crate::duration::parse(&s)
                .map(Some)
                .map_err(|e| format!("Request decode failed: field {key:?}: {e}")),
            // A bare number is nanoseconds, as Go's time.Duration.
            Some(Value::Number(n)) => match n.as_u64() {
                Some(n) => crate::duration::from_nanos(n)
                    .map(Some)
                    .map_err(|e| format!("Request decode failed: field {key:?}: {e}")),
                None => Err(bad(key, "a duration")),
            },
            Some(_) => Err(bad(key, "a duration such as \"10s\"")),
        }
    }
}

pub fn object(value: Value, what: &str) -> Result<Fields, String> {
    match value {
        Value::Object(map) => Ok(Fields(map)),
        _ => Err(format!(
            "Request decode failed: {what} must be a JSON object"
        )),
    }
}

/// Parses a JSON body, normalising its keys.
pub fn body(bytes: &[u8]) -> Result<Value, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    serde_json::from_slice::<Value>(bytes)
        .map(normalize)
        .map_err(|e| format!("Request decode failed: {e}"))
}
