//! Wires the `dns` crate into the agent: the catalog view it answers from
//! ([`AgentCatalog`]), the VIPs, and the
//! recursors (`dns.recursors`, else /etc/resolv.conf).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use signpost_core::config::AgentConfig;
use signpost_core::sockets::Sockets;
use signpost_dns::{Catalog, DnsMetrics, DnsServer, Endpoint, NodeRecord, Owner, Settings};

use crate::catalog::{AgentCatalog, all_instances};
use crate::state::Inner;

/// Binds the DNS server on `dns.listen`, or serves from the sockets the
/// previous process handed over; records them for a successor.
pub(crate) async fn bind(
    catalog: Arc<AgentCatalog>,
    metrics: Arc<DnsMetrics>,
    sockets: &Sockets,
) -> anyhow::Result<DnsServer<AgentCatalog>> {
    let settings = settings(&catalog.agent.config)?;
    let listen = settings.config.listen;
    let (udp, tcp) = (sockets.take_udp(UDP, listen), sockets.take_tcp(TCP, listen));
    // Pairs, one per serving thread: uneven lists (never sent so) are
    // not used.
    let inherited = if udp.len() == tcp.len() {
        udp.into_iter().zip(tcp).collect()
    } else {
        Vec::new()
    };
    let server = DnsServer::bind(settings, catalog.clone(), metrics, inherited).await?;
    catalog.agent.live.serve_dns(&server.handler());
    let (udp, tcp) = server.sockets();
    sockets.serving(UDP, &udp)?;
    sockets.serving(TCP, &tcp)?;
    Ok(server)
}

/// The DNS server's settings in `config`: its `dns` section, and the
/// recursors (`dns.recursors`, else /etc/resolv.conf, read now). At start
/// and on every reload that changes the `dns` section.
pub(crate) fn settings(config: &AgentConfig) -> anyhow::Result<Settings> {
    let dns = config.dns.clone();
    let recursors = match dns.recursor_addrs() {
        Some(configured) => configured.map_err(anyhow::Error::msg)?,
        None => {
            let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read /etc/resolv.conf: names outside the DNS domain are refused");
                String::new()
            });
            signpost_dns::recursors_from_resolv_conf(&text, dns.listen)
        }
    };
    if recursors.is_empty() {
        tracing::info!("no DNS recursors: names outside the DNS domain are refused");
    } else {
        tracing::info!(recursors = ?recursors, "names outside the DNS domain are forwarded");
    }
    Ok(Settings {
        datacenter: config.datacenter.clone(),
        config: dns,
        recursors,
    })
}

/// The names the DNS sockets are handed over by.
const UDP: &str = signpost_core::sockets::DNS_UDP;
const TCP: &str = signpost_core::sockets::DNS_TCP;

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
        let (_, instances) = self.instances_of(service, tag)?;
        let endpoints = instances
            .into_iter()
            .map(|i| Endpoint {
                node: i.node,
                address: i.address,
                service_address: i.service_address,
                port: i.port,
                health: i.health,
                weights: i.weights,
            })
            .collect();
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
                let r = all_instances(f).find(|r| r.node.eq_ignore_ascii_case(name))?;
                Some(NodeRecord {
                    name: r.node.clone(),
                    address: r.node_ip?,
                    meta: Default::default(),
                })
            })
        })
    }

    fn owner(&self, ip: IpAddr) -> Option<Owner> {
        if let IpAddr::V4(v4) = ip
            && let Some(key) = self.vips.owner(v4)
        {
            let (service, tag) = self.vip_owner(key);
            return Some(Owner::Service { service, tag });
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
                        .find(|r| r.node_ip == Some(ip))
                        .map(|r| r.node.clone())
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
