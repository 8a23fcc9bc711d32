//! Consul's user events (`/v1/event/fire`, `/v1/event/list`): a name, a
//! small payload and optional filters on who should act on it. The
//! control plane keeps the last [`MAX_EVENTS`]; an agent lists those
//! whose filters match its node and services.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Most events kept (Consul's agents keep 256).
pub const MAX_EVENTS: usize = 256;
/// Largest payload (Consul's `UserEventSizeLimit`).
pub const MAX_PAYLOAD: usize = 512;
/// Longest name or filter.
pub const MAX_NAME: usize = 256;

/// An event as stored and listed (Consul's shape; the payload base64).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UserEvent {
    #[serde(rename = "ID")]
    pub id: String,
    pub name: String,
    #[serde(with = "payload")]
    pub payload: Vec<u8>,
    pub node_filter: String,
    pub service_filter: String,
    pub tag_filter: String,
    pub version: u32,
    #[serde(rename = "LTime")]
    pub ltime: u64,
}

mod payload {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        if v.is_empty() {
            s.serialize_none()
        } else {
            s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        match text {
            None => Ok(Vec::new()),
            Some(t) => base64::engine::general_purpose::STANDARD
                .decode(t)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Checks what `/v1/event/fire/<name>` was given: the name, the
/// payload's size and that every filter is a regular expression.
pub fn check(name: &str, payload: &[u8], filters: [&str; 3]) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(format!(
            "invalid event name {:?}: 1 to {MAX_NAME} bytes, no control characters",
            name.escape_default().to_string()
        ));
    }
    if payload.len() > MAX_PAYLOAD {
        return Err(format!(
            "User event payload exceeds limit: {} bytes, the most is {MAX_PAYLOAD}",
            payload.len()
        ));
    }
    for (what, filter) in ["node", "service", "tag"].iter().zip(filters) {
        if filter.len() > MAX_NAME {
            return Err(format!("{what} filter longer than {MAX_NAME} bytes"));
        }
        if !filter.is_empty() {
            regex::Regex::new(filter)
                .map_err(|e| format!("invalid {what} filter {filter:?}: {e}"))?;
        }
    }
    if filters[2].is_empty() || !filters[1].is_empty() {
        Ok(())
    } else {
        Err("a tag filter needs a service filter".to_string())
    }
}

impl UserEvent {
    /// Whether a node called `node`, running `services` (name and tags),
    /// should see the event (Consul's filters are regular expressions).
    pub fn matches(&self, node: &str, services: &[(String, Vec<String>)]) -> bool {
        let re = |pattern: &str| regex::Regex::new(pattern).ok();
        if !self.node_filter.is_empty() && !re(&self.node_filter).is_some_and(|r| r.is_match(node))
        {
            return false;
        }
        if self.service_filter.is_empty() {
            return true;
        }
        let (Some(service), tag) = (
            re(&self.service_filter),
            (!self.tag_filter.is_empty()).then(|| re(&self.tag_filter)),
        ) else {
            return false;
        };
        services.iter().any(|(name, tags)| {
            service.is_match(name)
                && match &tag {
                    None => true,
                    Some(Some(t)) => tags.iter().any(|x| t.is_match(x)),
                    Some(None) => false,
                }
        })
    }

    /// The payload as Consul lists it (base64), for tests and the CLI.
    pub fn payload_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(node: &str, service: &str, tag: &str) -> UserEvent {
        UserEvent {
            id: "e".into(),
            name: "deploy".into(),
            payload: b"v2".to_vec(),
            node_filter: node.into(),
            service_filter: service.into(),
            tag_filter: tag.into(),
            version: 1,
            ltime: 1,
        }
    }

    #[test]
    fn filters_are_regular_expressions_on_node_services_and_tags() {
        let services = vec![("web".to_string(), vec!["canary".to_string()])];
        assert!(event("", "", "").matches("n1", &services));
        assert!(event("^n[0-9]$", "", "").matches("n1", &services));
        assert!(!event("^db", "", "").matches("n1", &services));
        assert!(event("", "^web$", "canary").matches("n1", &services));
        assert!(!event("", "^web$", "stable").matches("n1", &services));
        assert!(!event("", "api", "").matches("n1", &services));
    }

    #[test]
    fn fire_requests_are_checked() {
        assert!(check("deploy", b"x", ["", "", ""]).is_ok());
        assert!(check("", b"", ["", "", ""]).is_err());
        assert!(
            check("d", &[0; MAX_PAYLOAD + 1], ["", "", ""])
                .unwrap_err()
                .contains("exceeds")
        );
        assert!(
            check("d", b"", ["(", "", ""])
                .unwrap_err()
                .contains("node filter")
        );
        assert!(
            check("d", b"", ["", "", "canary"])
                .unwrap_err()
                .contains("service filter")
        );
        let json = serde_json::to_value(event("", "", "")).unwrap();
        assert_eq!(json["Payload"], "djI=");
        assert_eq!(json["LTime"], 1);
    }
}
