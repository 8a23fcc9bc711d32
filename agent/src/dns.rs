//! Wires the `dns` crate into the agent: the catalog view it answers from
//! (this node's services plus the fleet cache), the VIPs, and the
//! recursors (`dns.recursors`, else /etc/resolv.conf).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use signpost_core::model::{Health, Weights};
use signpost_core::proto::CatalogInstance;
use signpost_dns::{Catalog, DnsMetrics, DnsServer, Endpoint, NodeRecord, Owner, Settings};

use crate::agent::Agent;
use crate::fleet::{FleetCache, FleetInner};
use crate::state::Inner;
use crate::vips::Vips;

/// The agent's catalog, as DNS sees it.
pub(crate) struct AgentCatalog {
    pub(crate) agent: Arc<Agent>,
    pub(crate) fleet: Option<Arc<FleetCache>>,
    pub(crate) vips: Arc<Vips>,
}

/// Binds the DNS server on `dns.listen`.
pub(crate) async fn bind(
    catalog: AgentCatalog,
    metrics: Arc<DnsMetrics>,
) -> anyhow::Result<DnsServer<AgentCatalog>> {
    let config = catalog.agent.config.dns.clone();
    let recursors = match config.recursor_addrs() {
        Some(configured) => configured.map_err(anyhow::Error::msg)?,
        None => {
            let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read /etc/resolv.conf: names outside the DNS domain are refused");
                String::new()
            });
            signpost_dns::recursors_from_resolv_conf(&text, config.listen)
        }
    };
    if recursors.is_empty() {
        tracing::info!("no DNS recursors: names outside the DNS domain are refused");
    } else {
        tracing::info!(recursors = ?recursors, "names outside the DNS domain are forwarded");
    }
    let settings = Settings {
        datacenter: catalog.agent.config.datacenter.clone(),
        config,
        recursors,
    };
    Ok(DnsServer::bind(settings, Arc::new(catalog), metrics).await?)
}

impl AgentCatalog {
    /// The service's name as the fleet spells it (DNS names arrive in
    /// lowercase); `None` when the control plane is known not to have it.
    fn fleet_name(&self, fleet: &FleetInner, service: &str) -> Option<String> {
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
    fn canonical(&self, service: &str) -> Option<String> {
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
}

impl Catalog for AgentCatalog {
    async fn first_use(&self, service: &str) {
        let (Some(fleet), Some(cp)) = (&self.fleet, &self.agent.config.control_plane) else {
            return;
        };
        // A name the control plane does not have is not subscribed to: a
        // typo or a scan must not pile up subscriptions.
        let Some(name) = fleet.read(|f| self.fleet_name(f, service)) else {
            return;
        };
        fleet.first_use(&name, cp.first_lookup_wait).await;
    }

    fn instances(&self, service: &str, tag: Option<&str>) -> Option<Vec<Endpoint>> {
        let name = self.canonical(service)?;
        let (local_node, mut endpoints) = self.agent.state.read(|inner| {
            let node_ip: Option<IpAddr> = inner.node.address.parse().ok();
            let endpoints: Vec<Endpoint> = inner
                .services
                .values()
                .filter(|s| s.def.name.as_str() == name && has_tag(&s.def.tags, tag))
                .map(|s| {
                    let (address, service_address) = endpoint_address(&s.def.address, node_ip);
                    Endpoint {
                        node: inner.node.name.clone(),
                        address,
                        service_address,
                        port: s.def.port,
                        health: inner.service_health(&s.def.id),
                        weights: s.def.weights,
                    }
                })
                .collect();
            (inner.node.name.clone(), endpoints)
        });
        if let Some(fleet) = &self.fleet {
            fleet.read(|f| {
                let remote = f
                    .services
                    .get(&name)
                    .into_iter()
                    .flat_map(|s| s.instances.values())
                    .filter(|ci| ci.node != local_node)
                    .filter_map(|ci| remote_endpoint(ci, tag));
                endpoints.extend(remote);
            });
        }
        Some(endpoints)
    }

    fn vip(&self, service: &str, tag: Option<&str>) -> Option<Ipv4Addr> {
        let name = self.canonical(service)?;
        let tag = tag.map(str::to_ascii_lowercase);
        match self.vips.get_or_allocate(&name, tag.as_deref()) {
            Ok(ip) => Some(ip),
            Err(e) => {
                tracing::error!(service = %name, error = %e, "no VIP for the service");
                None
            }
        }
    }

    fn node(&self, name: &str) -> Option<NodeRecord> {
        let local = self.agent.state.read(|inner: &Inner| {
            (inner.node.name.eq_ignore_ascii_case(name))
                .then(|| {
                    Some(NodeRecord {
                        name: inner.node.name.clone(),
                        address: inner.node.address.parse().ok()?,
                        meta: inner.node.meta.clone(),
                    })
                })
                .flatten()
        });
        local.or_else(|| {
            self.fleet.as_ref()?.read(|f| {
                let ci = all_instances(f).find(|ci| ci.node.eq_ignore_ascii_case(name))?;
                Some(NodeRecord {
                    name: ci.node.clone(),
                    address: ci.node_address.parse().ok()?,
                    meta: Default::default(),
                })
            })
        })
    }

    fn owner(&self, ip: IpAddr) -> Option<Owner> {
        if let IpAddr::V4(v4) = ip
            && let Some(key) = self.vips.owner(v4)
        {
            // The key is `service` or `tag.service`.
            let owner = match key.split_once('.') {
                Some((tag, service)) if self.canonical(&key).is_none() => Owner::Service {
                    service: service.to_string(),
                    tag: Some(tag.to_string()),
                },
                _ => Owner::Service {
                    service: key,
                    tag: None,
                },
            };
            return Some(owner);
        }
        let text = ip.to_string();
        let local = self
            .agent
            .state
            .read(|inner| (inner.node.address == text).then(|| inner.node.name.clone()));
        local
            .or_else(|| {
                self.fleet.as_ref()?.read(|f| {
                    all_instances(f)
                        .find(|ci| ci.node_address == text)
                        .map(|ci| ci.node.clone())
                })
            })
            .map(Owner::Node)
    }

    fn generation(&self) -> u64 {
        // Both only grow, so their sum moves whenever either does.
        let fleet = self.fleet.as_ref().map_or(0, |f| f.version());
        self.agent.state.index() + fleet
    }
}

fn all_instances(f: &FleetInner) -> impl Iterator<Item = &CatalogInstance> {
    f.services.values().flat_map(|s| s.instances.values())
}

fn has_tag(tags: &[String], tag: Option<&str>) -> bool {
    tag.is_none_or(|t| tags.iter().any(|have| have.eq_ignore_ascii_case(t)))
}

/// The address DNS gives for an instance, and whether it is the
/// instance's own: its IP address, else its node's when it has none.
/// `None` when the address is a host name (the node's address would send
/// clients to the wrong host).
fn endpoint_address(own: &str, node: Option<IpAddr>) -> (Option<IpAddr>, bool) {
    if own.is_empty() {
        return (node, false);
    }
    (own.parse().ok(), true)
}

/// An instance on another node; `None` if it lacks the tag.
fn remote_endpoint(ci: &CatalogInstance, tag: Option<&str>) -> Option<Endpoint> {
    let i = ci.instance.as_ref()?;
    if !has_tag(&i.tags, tag) {
        return None;
    }
    let (address, service_address) = endpoint_address(&i.address, ci.node_address.parse().ok());
    let health = ci
        .node_checks
        .iter()
        .chain(&i.checks)
        .map(|c| c.status.parse().unwrap_or(Health::Critical))
        .max()
        .unwrap_or(Health::Passing);
    Some(Endpoint {
        node: ci.node.clone(),
        address,
        service_address,
        port: u16::try_from(i.port).ok()?,
        health,
        weights: Weights {
            passing: i.weight_passing,
            warning: i.weight_warning,
        },
    })
}
