//! Instances of other nodes as the fleet view keeps them: the control
//! plane's messages checked and converted once, when they arrive, so that
//! DNS, the proxy and the API read typed data (health, protocol, parsed
//! addresses) and never parse on a lookup.

use std::collections::BTreeMap;
use std::net::IpAddr;

use signpost_core::model::{Health, Protocol, Weights};
use signpost_proto::{CatalogInstance, Check, Instance};

use crate::state::NODE_HEALTH_CHECK;

/// An instance on another node.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteInstance {
    pub node: String,
    pub node_id: String,
    /// As the node reported it.
    pub node_address: String,
    /// The same, parsed (`None` when it is not an IP address).
    pub node_ip: Option<IpAddr>,
    pub node_zone: String,
    /// The node's checks: its liveness (`serfHealth`) and maintenance.
    pub node_checks: Vec<RemoteCheck>,
    pub id: String,
    pub name: String,
    /// As registered: an IP address, a host name, or empty (the node's).
    pub address: String,
    /// Where to reach it: its own IP address, else its node's; `None`
    /// when its address is a host name (the node's would send clients to
    /// the wrong host) or its node's is not an IP address.
    pub ip: Option<IpAddr>,
    /// `ip` is the instance's own address, not its node's.
    pub service_address: bool,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    /// Its own zone, else its node's.
    pub zone: String,
    pub weights: Weights,
    pub protocol: Protocol,
    pub enable_tag_override: bool,
    pub checks: Vec<RemoteCheck>,
    /// The worst of its checks and its node's.
    pub health: Health,
    /// Its node failed: neither the control plane nor its peers reach it.
    pub host_gone: bool,
    /// Meshed: reached only through its node's inbound listener.
    pub connect: bool,
    /// Its node's mesh inbound listener, parsed (`None`: none).
    pub node_inbound: Option<std::net::SocketAddr>,
}

/// A check of a remote instance or of its node.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteCheck {
    pub id: String,
    pub name: String,
    pub status: Health,
    pub output: String,
    pub notes: String,
    /// The check's type as Consul names it (`http`, `ttl`, `serf`...).
    pub kind: String,
}

/// Why an instance from the control plane is not taken in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("instance {node}/{id}: {reason}")]
pub struct Refused {
    pub node: String,
    pub id: String,
    pub reason: String,
}

impl RemoteInstance {
    /// The control plane's message, checked: an instance, a port, a
    /// protocol and a status for every check.
    pub fn from_wire(ci: CatalogInstance) -> Result<RemoteInstance, Refused> {
        let CatalogInstance {
            node,
            node_id,
            node_address,
            node_zone,
            node_checks,
            instance,
            node_inbound,
        } = ci;
        let refused = |id: &str, reason: String| Refused {
            node: node.clone(),
            id: id.to_string(),
            reason,
        };
        let Some(i) = instance else {
            return Err(refused("", "no instance".to_string()));
        };
        let port = u16::try_from(i.port)
            .map_err(|_| refused(&i.id, format!("{} is not a port", i.port)))?;
        // Neither the enum nor the text: the default, as on the agent.
        let unsaid = i.protocol == 0 && i.protocol_text.is_empty();
        let protocol = match i.proxy_protocol() {
            Some(p) => p,
            None if unsaid => Protocol::default(),
            None => {
                let reason = format!("protocol {} ({:?}) is not one", i.protocol, i.protocol_text);
                return Err(refused(&i.id, reason));
            }
        };
        let checks = |list: &[Check]| {
            list.iter()
                .map(RemoteCheck::from_wire)
                .collect::<Result<Vec<_>, String>>()
                .map_err(|e| refused(&i.id, e))
        };
        let node_checks = checks(&node_checks)?;
        let own_checks = checks(&i.checks)?;
        let node_ip = node_address.parse().ok();
        let (ip, service_address) = if i.address.is_empty() {
            (node_ip, false)
        } else {
            (i.address.parse().ok(), true)
        };
        let health = node_checks
            .iter()
            .chain(&own_checks)
            .map(|c| c.status)
            .max()
            .unwrap_or(Health::Passing);
        let host_gone = node_checks
            .iter()
            .any(|c| c.id == NODE_HEALTH_CHECK && c.status == Health::Critical);
        Ok(RemoteInstance {
            zone: if i.zone.is_empty() {
                node_zone.clone()
            } else {
                i.zone
            },
            node,
            node_id,
            node_address,
            node_ip,
            node_zone,
            node_checks,
            id: i.id,
            name: i.name,
            address: i.address,
            ip,
            service_address,
            port,
            tags: i.tags,
            meta: i.meta.into_iter().collect(),
            weights: Weights {
                passing: i.weight_passing,
                warning: i.weight_warning,
            },
            protocol,
            enable_tag_override: i.enable_tag_override,
            checks: own_checks,
            health,
            host_gone,
            connect: i.connect,
            node_inbound: node_inbound.parse().ok(),
        })
    }

    /// As the control plane sends it: what the fleet view keeps on disk.
    pub fn to_wire(&self) -> CatalogInstance {
        let mut instance = Instance {
            id: self.id.clone(),
            name: self.name.clone(),
            address: self.address.clone(),
            port: u32::from(self.port),
            tags: self.tags.clone(),
            meta: self.meta.clone().into_iter().collect(),
            zone: self.zone.clone(),
            weight_passing: self.weights.passing,
            weight_warning: self.weights.warning,
            enable_tag_override: self.enable_tag_override,
            checks: self.checks.iter().map(RemoteCheck::to_wire).collect(),
            connect: self.connect,
            ..Instance::default()
        };
        instance.set_proxy_protocol(self.protocol);
        CatalogInstance {
            node: self.node.clone(),
            node_id: self.node_id.clone(),
            node_address: self.node_address.clone(),
            node_zone: self.node_zone.clone(),
            node_checks: self.node_checks.iter().map(RemoteCheck::to_wire).collect(),
            instance: Some(instance),
            node_inbound: self.node_inbound.map(|a| a.to_string()).unwrap_or_default(),
        }
    }

    /// Carries every tag in `tags` (see [`signpost_core::model::has_tags`]).
    pub fn has_tags<'t>(&self, tags: impl IntoIterator<Item = &'t str>) -> bool {
        signpost_core::model::has_tags(&self.tags, tags)
    }

    /// Every check, its node's first.
    pub fn all_checks(&self) -> impl Iterator<Item = &RemoteCheck> {
        self.node_checks.iter().chain(&self.checks)
    }
}

impl RemoteCheck {
    fn from_wire(c: &Check) -> Result<RemoteCheck, String> {
        let status = c
            .health()
            .ok_or_else(|| format!("check {:?}: status {:?} is not one", c.id, c.status_text))?;
        Ok(RemoteCheck {
            id: c.id.clone(),
            name: c.name.clone(),
            status,
            output: c.output.clone(),
            notes: c.notes.clone(),
            kind: c.r#type.clone(),
        })
    }

    fn to_wire(&self) -> Check {
        let mut check = Check {
            id: self.id.clone(),
            name: self.name.clone(),
            output: self.output.clone(),
            notes: self.notes.clone(),
            r#type: self.kind.clone(),
            ..Check::default()
        };
        check.set_health(self.status);
        check
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire() -> CatalogInstance {
        let mut liveness = Check {
            id: NODE_HEALTH_CHECK.to_string(),
            r#type: "serf".to_string(),
            ..Check::default()
        };
        liveness.set_health(Health::Passing);
        let mut check = Check {
            id: "service:web-1".to_string(),
            ..Check::default()
        };
        check.set_health(Health::Warning);
        let mut instance = Instance {
            id: "web-1".to_string(),
            name: "web".to_string(),
            port: 8080,
            tags: vec!["V1".to_string()],
            weight_passing: 3,
            weight_warning: 1,
            checks: vec![check],
            ..Instance::default()
        };
        instance.set_proxy_protocol(Protocol::Http);
        CatalogInstance {
            node: "a".to_string(),
            node_id: "id-a".to_string(),
            node_address: "10.0.0.1".to_string(),
            node_zone: "z1".to_string(),
            node_checks: vec![liveness],
            instance: Some(instance),
            node_inbound: String::new(),
        }
    }

    #[test]
    fn a_message_becomes_typed_data_and_back() {
        let remote = RemoteInstance::from_wire(wire()).unwrap();
        assert_eq!(remote.ip, Some("10.0.0.1".parse().unwrap()), "the node's");
        assert!(!remote.service_address);
        assert_eq!(remote.zone, "z1", "the node's");
        assert_eq!(remote.health, Health::Warning, "the worst check");
        assert_eq!(remote.protocol, Protocol::Http);
        assert!(!remote.host_gone);
        assert!(remote.has_tags(["v1"]));
        assert!(!remote.has_tags(["v2"]));
        let back = RemoteInstance::from_wire(remote.to_wire()).unwrap();
        assert_eq!(back, remote);
    }

    #[test]
    fn addresses_and_failed_nodes() {
        let mut ci = wire();
        let i = ci.instance.as_mut().unwrap();
        i.address = "db.example".to_string();
        ci.node_checks[0].set_health(Health::Critical);
        let remote = RemoteInstance::from_wire(ci).unwrap();
        assert_eq!(remote.ip, None, "a host name is not the node's address");
        assert!(remote.service_address);
        assert!(remote.host_gone);
        assert_eq!(remote.health, Health::Critical);
    }

    #[test]
    fn garbage_is_refused_with_the_reason() {
        let spoil: [fn(&mut CatalogInstance); 4] = [
            |ci| ci.instance = None,
            |ci| ci.instance.as_mut().unwrap().port = 70_000,
            |ci| {
                let i = ci.instance.as_mut().unwrap();
                i.protocol = 42;
                i.protocol_text = "smtp".to_string();
            },
            |ci| {
                ci.node_checks[0].status = 0;
                ci.node_checks[0].status_text = "fine".to_string();
            },
        ];
        for (n, spoil) in spoil.iter().enumerate() {
            let mut ci = wire();
            spoil(&mut ci);
            let e = RemoteInstance::from_wire(ci).unwrap_err();
            assert_eq!(e.node, "a", "case {n}");
            assert!(!e.reason.is_empty(), "case {n}");
        }
    }
}
