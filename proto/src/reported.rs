//! What the control plane checks in what an agent reports (`Hello`,
//! instances, checks, subscriptions) before taking it in: the rules a
//! registration follows on the agent, checked again, because a stream
//! with a valid token may still carry garbage (a bug, a foreign client).
//! A message that breaks them closes the stream.

use std::net::{IpAddr, SocketAddr};

use signpost_core::model::{
    MAX_OUTPUT_MAX_SIZE, valid_hostname, valid_id, valid_name, validate_meta,
};

use crate::{Check, Hello, Instance, Refusal, Traffic};

/// Longest free-form label (zone, datacenter, version, node ID).
const MAX_LABEL: usize = 256;

/// Most checks on one instance, and most node checks.
const MAX_CHECKS: usize = 256;

/// Most services one agent may subscribe to.
pub const MAX_SUBSCRIPTIONS: usize = 100_000;

/// Why a reported message is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct Garbage {
    pub what: String,
    pub reason: String,
}

fn garbage(what: impl Into<String>, reason: impl Into<String>) -> Garbage {
    Garbage {
        what: what.into(),
        reason: reason.into(),
    }
}

fn label(what: &str, value: &str) -> Result<(), Garbage> {
    if value.len() > MAX_LABEL || value.chars().any(char::is_control) {
        return Err(garbage(
            what,
            format!("at most {MAX_LABEL} characters, no control characters"),
        ));
    }
    Ok(())
}

/// An agent's `Hello`.
pub fn hello(hello: &Hello) -> Result<(), Garbage> {
    let node = &hello.node;
    if node.is_empty()
        || node.len() > MAX_LABEL
        || node.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(garbage(
            "Hello.node",
            format!("{node:?} is not a node name"),
        ));
    }
    label("Hello.node_id", &hello.node_id)?;
    label("Hello.zone", &hello.zone)?;
    label("Hello.datacenter", &hello.datacenter)?;
    label("Hello.version", &hello.version)?;
    if hello.address.parse::<IpAddr>().is_err() {
        return Err(garbage(
            "Hello.address",
            format!("{:?} is not an IP address", hello.address),
        ));
    }
    if !hello.probe_address.is_empty() && hello.probe_address.parse::<SocketAddr>().is_err() {
        return Err(garbage(
            "Hello.probe_address",
            format!("{:?} is not an address and port", hello.probe_address),
        ));
    }
    validate_meta(hello.meta.iter()).map_err(|e| garbage("Hello.meta", e.to_string()))
}

/// A refusal the agent's local API reports for the audit log.
pub fn refusal(refusal: &Refusal) -> Result<(), Garbage> {
    label("Refusal.who", &refusal.who)?;
    label("Refusal.action", &refusal.action)?;
    label("Refusal.target", &refusal.target)?;
    label("Refusal.reason", &refusal.reason)
}

/// Most services one traffic report names.
pub const MAX_TRAFFIC_SERVICES: usize = 4096;
/// Most duration buckets one service's traffic has.
pub const MAX_TRAFFIC_BUCKETS: usize = 64;

/// What an agent's proxy sent each service, for the console.
pub fn traffic(traffic: &Traffic) -> Result<(), Garbage> {
    if traffic.services.len() > MAX_TRAFFIC_SERVICES {
        return Err(garbage(
            "Traffic",
            format!("more than {MAX_TRAFFIC_SERVICES} services"),
        ));
    }
    if traffic.window_ms == 0 {
        return Err(garbage("Traffic.window_ms", "must be more than 0"));
    }
    for s in &traffic.services {
        if !valid_name(&s.service) {
            return Err(garbage(
                "Traffic",
                format!("{:?} is not a service name", s.service),
            ));
        }
        if s.duration_buckets.len() > MAX_TRAFFIC_BUCKETS || s.errors > s.requests {
            return Err(garbage(
                format!("Traffic of {:?}", s.service),
                format!("at most {MAX_TRAFFIC_BUCKETS} buckets, and no more errors than requests"),
            ));
        }
    }
    Ok(())
}

/// A service instance an agent reports.
pub fn instance(instance: &Instance) -> Result<(), Garbage> {
    let what = format!("instance {:?}", instance.id);
    if !valid_id(&instance.id) {
        return Err(garbage(what, "not a service ID"));
    }
    if instance.name.is_empty() || !valid_name(&instance.name) {
        return Err(garbage(
            what,
            format!("{:?} is not a service name", instance.name),
        ));
    }
    if !instance.address.is_empty()
        && instance.address.parse::<IpAddr>().is_err()
        && !valid_hostname(&instance.address)
    {
        return Err(garbage(
            what,
            format!("{:?} is not an IP address or a host name", instance.address),
        ));
    }
    if instance.port > u32::from(u16::MAX) {
        return Err(garbage(what, format!("{} is not a port", instance.port)));
    }
    if let Some(tag) = instance
        .tags
        .iter()
        .find(|t| t.is_empty() || t.len() > MAX_LABEL || t.chars().any(char::is_whitespace))
    {
        return Err(garbage(what, format!("{tag:?} is not a tag")));
    }
    validate_meta(instance.meta.iter()).map_err(|e| garbage(&what, e.to_string()))?;
    label(&what, &instance.zone)?;
    // Neither the enum nor the text: the default protocol.
    let unsaid = instance.protocol == 0 && instance.protocol_text.is_empty();
    if instance.proxy_protocol().is_none() && !unsaid {
        return Err(garbage(
            &what,
            format!(
                "protocol {} ({:?}) is not one of tcp, http, http2 or grpc",
                instance.protocol, instance.protocol_text
            ),
        ));
    }
    checks(&what, &instance.checks)
}

/// Checks (of an instance, or the node's).
pub fn checks(what: &str, checks: &[Check]) -> Result<(), Garbage> {
    if checks.len() > MAX_CHECKS {
        return Err(garbage(
            what,
            format!("{} checks, at most {MAX_CHECKS}", checks.len()),
        ));
    }
    for check in checks {
        let what = format!("{what}: check {:?}", check.id);
        if check.id.is_empty() || check.id.len() > MAX_LABEL {
            return Err(garbage(what, "not a check ID"));
        }
        if check.health().is_none() {
            return Err(garbage(
                what,
                format!(
                    "status {} ({:?}) is not one of passing, warning or critical",
                    check.status, check.status_text
                ),
            ));
        }
        if check.output.len() > MAX_OUTPUT_MAX_SIZE {
            return Err(garbage(
                what,
                format!(
                    "output of {} bytes, at most {MAX_OUTPUT_MAX_SIZE}",
                    check.output.len()
                ),
            ));
        }
    }
    Ok(())
}

/// A service name an agent subscribes to.
pub fn service_name(name: &str) -> Result<(), Garbage> {
    if name.is_empty() || !valid_name(name) {
        return Err(garbage(
            "Subscribe",
            format!("{name:?} is not a service name"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Instance {
        Instance {
            id: "web-1".to_string(),
            name: "web".to_string(),
            address: "10.0.0.1".to_string(),
            port: 8080,
            protocol: crate::Protocol::Http.into(),
            checks: vec![Check {
                id: "service:web-1".to_string(),
                status: crate::Health::Passing.into(),
                ..Check::default()
            }],
            ..Instance::default()
        }
    }

    #[test]
    fn what_an_agent_sends_passes_and_garbage_does_not() {
        assert_eq!(instance(&good()), Ok(()));
        let mut old = good();
        old.protocol = 0;
        old.protocol_text = "http".to_string();
        old.checks[0].status = 0;
        old.checks[0].status_text = "warning".to_string();
        assert_eq!(instance(&old), Ok(()), "as an earlier version sends it");
        let bad: [fn(&mut Instance); 9] = [
            |i| i.port = 70_000,
            |i| i.id = "a/b".to_string(),
            |i| i.name = "we b".to_string(),
            |i| i.address = "not an address!".to_string(),
            |i| i.protocol = 42,
            |i| {
                i.protocol = 0;
                i.protocol_text = "smtp".to_string();
            },
            |i| i.checks[0].status = 42,
            |i| {
                i.checks[0].status = 0;
                i.checks[0].status_text = "fine".to_string();
            },
            |i| i.tags = vec!["a b".to_string()],
        ];
        for (n, spoil) in bad.iter().enumerate() {
            let mut i = good();
            spoil(&mut i);
            assert!(instance(&i).is_err(), "case {n}: {i:?}");
        }
        let mut h = Hello {
            node: "web-1".to_string(),
            address: "10.0.0.1".to_string(),
            probe_address: "10.0.0.1:8301".to_string(),
            ..Hello::default()
        };
        assert_eq!(hello(&h), Ok(()));
        h.node = "a\nb".to_string();
        assert!(hello(&h).is_err());
    }
}
