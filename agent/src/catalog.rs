//! The agent's view of the catalog, shared by DNS and the proxy: this
//! node's services (from its own state) and the other nodes' instances of
//! the services it uses (the fleet cache), plus the service VIPs.

use std::net::IpAddr;
use std::sync::Arc;

use signpost_core::model::{Health, Protocol, Weights, has_tags};

use crate::agent::Agent;
use crate::fleet::{FleetCache, FleetInner, RemoteInstance};
use crate::vips::Vips;

/// The agent's catalog, as DNS and the proxy see it.
pub(crate) struct AgentCatalog {
    pub(crate) agent: Arc<Agent>,
    pub(crate) fleet: Option<Arc<FleetCache>>,
    pub(crate) vips: Arc<Vips>,
    /// The mesh on this host, when it takes part.
    pub(crate) mesh: Option<Arc<crate::mesh::Mesh>>,
}

/// One instance of a service, wherever it runs.
pub(crate) struct Instance {
    pub(crate) node: String,
    /// The instance's own address, else its node's; `None` when it is a
    /// host name.
    pub(crate) address: Option<IpAddr>,
    /// The address is the instance's own, not its node's.
    pub(crate) service_address: bool,
    pub(crate) port: u16,
    pub(crate) health: Health,
    pub(crate) weights: Weights,
    pub(crate) zone: String,
    pub(crate) protocol: Protocol,
    pub(crate) tags: Vec<String>,
    /// Its node failed (the control plane and its peers cannot reach it).
    pub(crate) host_gone: bool,
    /// Meshed: reached through its node's inbound listener, here.
    pub(crate) inbound: Option<std::net::SocketAddr>,
}

impl AgentCatalog {
    /// The service's name as the fleet spells it (DNS names arrive in
    /// lowercase); `None` when the control plane is known not to have it.
    pub(crate) fn fleet_name(&self, fleet: &FleetInner, service: &str) -> Option<String> {
        if fleet.services.contains_key(service) {
            return Some(service.to_string());
        }
        match &fleet.names {
            // Never heard from the control plane: worth asking.
            None => Some(service.to_string()),
            Some(names) => names
                .services
                .keys()
                .chain(fleet.services.keys())
                .find(|k| k.eq_ignore_ascii_case(service))
                .cloned(),
        }
    }

    /// The service's name as this node or the fleet spells it.
    pub(crate) fn canonical(&self, service: &str) -> Option<String> {
        let local = self.agent.state.read(|inner| {
            inner
                .services
                .values()
                .find(|s| s.def.name.as_str().eq_ignore_ascii_case(service))
                .map(|s| s.def.name.to_string())
        });
        local.or_else(|| {
            let fleet = self.fleet.as_ref()?;
            fleet.read(|f| {
                let name = self.fleet_name(f, service)?;
                let known = f.services.contains_key(&name)
                    || f.names
                        .as_ref()
                        .is_some_and(|n| n.services.contains_key(&name));
                known.then_some(name)
            })
        })
    }

    /// The service and tag a VIP's name (`service` or `tag.service`)
    /// stands for.
    pub(crate) fn vip_owner(&self, key: String) -> (String, Option<String>) {
        match key.split_once('.') {
            Some((tag, service)) if self.canonical(&key).is_none() => {
                (service.to_string(), Some(tag.to_string()))
            }
            _ => (key, None),
        }
    }

    /// Every instance of `service` (with `tag`, if given), whatever its
    /// health, under the service's canonical name; `None` for a service
    /// nobody knows.
    pub(crate) fn instances_of(
        &self,
        service: &str,
        tag: Option<&str>,
    ) -> Option<(String, Vec<Instance>)> {
        let name = self.canonical(service)?;
        let (local_node, mut instances) = self.agent.state.read(|inner| {
            let node_ip: Option<IpAddr> = inner.node.address.parse().ok();
            let instances: Vec<Instance> = inner
                .services
                .values()
                .filter(|s| s.def.name.as_str() == name && has_tags(&s.def.tags, tag))
                .map(|s| {
                    let (address, service_address) = endpoint_address(&s.def.address, node_ip);
                    Instance {
                        node: inner.node.name.clone(),
                        address,
                        service_address,
                        port: s.def.port,
                        health: inner.service_health(&s.def.id),
                        weights: s.def.weights,
                        zone: s
                            .def
                            .zone
                            .clone()
                            .unwrap_or_else(|| inner.node.zone.clone()),
                        protocol: s.def.protocol,
                        tags: s.def.tags.clone(),
                        host_gone: false,
                        inbound: self
                            .mesh
                            .as_ref()
                            .filter(|_| inner.node.meshed(&s.def))
                            .map(|m| m.inbound),
                    }
                })
                .collect();
            (inner.node.name.clone(), instances)
        });
        if let Some(fleet) = &self.fleet {
            fleet.read(|f| {
                let remote = f
                    .services
                    .get(&name)
                    .into_iter()
                    .flat_map(|s| s.instances.values())
                    .filter(|r| r.node != local_node)
                    .filter_map(|r| remote_instance(r, tag, self.mesh.is_some()));
                instances.extend(remote);
            });
        }
        Some((name, instances))
    }
}

pub(crate) fn all_instances(f: &FleetInner) -> impl Iterator<Item = &RemoteInstance> {
    f.services.values().flat_map(|s| s.instances.values())
}

/// The address of an instance, and whether it is the instance's own: its
/// IP address, else its node's when it has none. `None` when the address
/// is a host name (the node's address would send clients to the wrong
/// host).
fn endpoint_address(own: &str, node: Option<IpAddr>) -> (Option<IpAddr>, bool) {
    if own.is_empty() {
        return (node, false);
    }
    (own.parse().ok(), true)
}

/// An instance on another node; `None` if it lacks the tag.
/// With `meshing` (this host takes part in the mesh), a meshed instance
/// is reached through its node's inbound listener.
fn remote_instance(r: &RemoteInstance, tag: Option<&str>, meshing: bool) -> Option<Instance> {
    if !r.has_tags(tag) {
        return None;
    }
    Some(Instance {
        node: r.node.clone(),
        address: r.ip,
        service_address: r.service_address,
        port: r.port,
        health: r.health,
        weights: r.weights,
        zone: r.zone.clone(),
        protocol: r.protocol,
        tags: r.tags.clone(),
        host_gone: r.host_gone,
        inbound: r.node_inbound.filter(|_| meshing && r.connect),
    })
}
