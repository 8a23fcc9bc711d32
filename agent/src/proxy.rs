//! Wires the `proxy` crate into the agent. Every name with a VIP on this
//! host (looked up through DNS, or listed in `upstreams`) gets listeners;
//! its instances come from [`AgentCatalog`] and its policy from
//! `proxy.defaults` and `proxy.services`, with the operator commands in
//! force applied over it. The proxy is updated in place on every change
//! of this node's state, the fleet cache (commands included), the VIP
//! table or the configuration in force (a reload), and when a command
//! expires.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use signpost_core::command::{Command, now_millis};
use signpost_core::config::ProxyConfig;
use signpost_core::model::Protocol;
use signpost_core::overlay;
use signpost_proxy::{Endpoint, InboundSpec, Liveness, Proxy, ProxyMetrics, ServiceSpec, Settings};
use tokio_util::sync::CancellationToken;

use crate::catalog::{AgentCatalog, Instance};

/// How soon listeners that could not be opened are tried again.
const RETRY_LISTEN: Duration = Duration::from_secs(5);

/// A proxy for the agent's configuration; it reports use of a service to
/// the fleet cache, which keeps the service subscribed.
pub(crate) fn new(
    catalog: &AgentCatalog,
    metrics: Arc<ProxyMetrics>,
    sockets: Arc<signpost_core::sockets::Sockets>,
) -> std::io::Result<Proxy> {
    let config = &catalog.agent.config;
    let threads = match config.proxy.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
        n => n,
    };
    let settings = Settings {
        zone: config.zone.clone(),
        http_port: config.proxy.http_port,
        pool_idle_timeout: config.proxy.pool_idle_timeout,
        client_idle_timeout: config.proxy.client_idle_timeout,
        client_first_byte_timeout: config.proxy.client_first_byte_timeout,
        liveness: Liveness {
            keepalive: config.proxy.tcp_keepalive,
            user_timeout: config.proxy.tcp_user_timeout,
        },
        access_log: config.proxy.access_log,
        threads,
        sockets,
    };
    let fleet = catalog.fleet.clone();
    Proxy::new(settings, metrics, move |service| {
        if let Some(fleet) = &fleet {
            fleet.touch(service);
        }
    })
}

/// Keeps the proxy's services current until `shutdown`, then drains it
/// for up to `grace` (as it is then: shorter when systemd restarts the
/// agent). `ready` hears when the first update is made.
pub(crate) async fn run(
    proxy: Arc<Proxy>,
    catalog: Arc<AgentCatalog>,
    shutdown: CancellationToken,
    grace: tokio::sync::watch::Receiver<Duration>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut config = catalog.agent.live.subscribe();
    let mut live = config.borrow_and_update().clone();
    upstream_vips(&catalog, &live.upstreams);
    let mut state = catalog.agent.state.subscribe();
    let mut fleet = catalog.fleet.as_ref().map(|f| f.subscribe_changes());
    let mut vips = catalog.vips.subscribe();
    let mut mesh_changes = catalog.mesh.as_ref().map(|m| m.subscribe());
    // What the mesh's view was built from: rebuilt only when it changes,
    // so that TLS sessions stay resumable.
    let mut mesh_built: Option<MeshInputs> = None;
    loop {
        if let (Some(mesh), Some(changes)) = (&catalog.mesh, &mesh_changes) {
            let version = *changes.borrow();
            let (targets, callers) = catalog.agent.state.read(|inner| {
                let mut callers: Vec<(String, String)> = inner
                    .services
                    .values()
                    .map(|s| (s.def.name.to_string(), s.def.address.clone()))
                    .collect();
                callers.sort();
                (inbound_targets(inner, &live.proxy), callers)
            });
            let unchanged = mesh_built.as_ref().is_some_and(|(v, t, c)| {
                *v == version && same_targets(t, &targets) && *c == callers
            });
            if !unchanged {
                let view = catalog.agent.state.read(|inner| mesh.view(inner));
                proxy.set_mesh(view);
                proxy.update_inbound(targets.clone());
                mesh_built = Some((version, targets, callers));
            }
        }
        let now = now_millis();
        let commands = commands(&catalog);
        let failures = proxy.update(services(&catalog, &live.proxy, &commands, now));
        if let Some(ready) = ready.take()
            && ready.send(()).is_err()
        {
            tracing::debug!("nobody waits for the proxy's first update");
        }
        // Commands expire here even with the control plane gone.
        let expiry = commands
            .iter()
            .filter(|c| c.active(now))
            .map(|c| Duration::from_millis(c.expires_at - now))
            .min();
        let retry = async {
            match (failures > 0, expiry) {
                (true, Some(e)) => tokio::time::sleep(e.min(RETRY_LISTEN)).await,
                (true, None) => tokio::time::sleep(RETRY_LISTEN).await,
                (false, Some(e)) => tokio::time::sleep(e).await,
                (false, None) => std::future::pending::<()>().await,
            }
        };
        let fleet_changed = async {
            match &mut fleet {
                Some(changes) => {
                    if changes.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        let mesh_changed = async {
            match &mut mesh_changes {
                Some(changes) => {
                    if changes.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = state.changed() => {}
            _ = vips.changed() => {}
            () = mesh_changed => {}
            () = fleet_changed => {}
            () = retry => {}
            Ok(()) = config.changed() => {
                live = config.borrow_and_update().clone();
                upstream_vips(&catalog, &live.upstreams);
            }
            () = shutdown.cancelled() => break,
        }
    }
    let grace = *grace.borrow();
    proxy.shutdown(grace).await;
}

/// Every upstream gets its VIP (and so its listeners) before any lookup.
fn upstream_vips(catalog: &AgentCatalog, upstreams: &[String]) {
    for upstream in upstreams {
        if let Err(error) = catalog.vips.get_or_allocate(upstream, None) {
            tracing::error!(service = %upstream, %error, "no VIP for the upstream: it is not proxied");
        }
    }
}

/// What the proxy should serve now: one entry per VIP, with its policy
/// from `config`.
fn services(
    catalog: &AgentCatalog,
    config: &ProxyConfig,
    commands: &[Command],
    now: u64,
) -> Vec<ServiceSpec> {
    let here: Vec<String> = catalog.agent.state.read(|inner| {
        inner
            .services
            .values()
            .map(|s| s.def.name.to_string())
            .collect()
    });
    // Commands for callers apply only on the hosts of those callers.
    let commands: Vec<Command> = commands
        .iter()
        .filter(|c| {
            c.target.callers.is_empty()
                || c.target
                    .callers
                    .iter()
                    .any(|caller| here.iter().any(|s| s.eq_ignore_ascii_case(caller)))
        })
        .cloned()
        .collect();
    catalog
        .vips
        .entries()
        .into_iter()
        .filter_map(|(key, vip)| {
            let (service, tag) = catalog.vip_owner(key.clone());
            let (service, instances) = catalog.instances_of(&service, tag.as_deref())?;
            let policy = overlay::with_commands(config.policy(&service), &service, &commands, now);
            Some(ServiceSpec {
                protocol: protocol(&instances),
                endpoints: instances
                    .iter()
                    .filter_map(|i| endpoint(&service, i))
                    .collect(),
                name: key,
                service,
                vip,
                policy,
            })
        })
        .collect()
}

/// What the mesh's view was last built from: the mesh's version, the
/// inbound targets, and every local service's name and address (which
/// decide who calls).
type MeshInputs = (u64, Vec<InboundSpec>, Vec<(String, String)>);

/// The meshed instances registered here, as the inbound listener serves
/// them: at their own address, else the node's.
fn inbound_targets(inner: &crate::state::Inner, config: &ProxyConfig) -> Vec<InboundSpec> {
    let node_ip: Option<IpAddr> = inner.node.address.parse().ok();
    let mut targets: Vec<InboundSpec> = inner
        .services
        .values()
        .filter(|s| s.def.port != 0 && inner.node.meshed(&s.def))
        .filter_map(|s| {
            let ip = if s.def.address.is_empty() {
                node_ip?
            } else {
                s.def.address.parse().ok()?
            };
            let name = s.def.name.to_string();
            let policy = config.policy(&name);
            Some(InboundSpec {
                protocol: policy.protocol.unwrap_or(s.def.protocol),
                addr: SocketAddr::new(ip, s.def.port),
                port: s.def.port,
                service: name,
                policy,
            })
        })
        .collect();
    targets.sort_by(|a, b| (&a.service, a.port).cmp(&(&b.service, b.port)));
    targets
}

/// Whether two lists of inbound targets serve the same.
fn same_targets(a: &[InboundSpec], b: &[InboundSpec]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            (&x.service, x.port, x.addr, x.protocol, &x.policy)
                == (&y.service, y.port, y.addr, y.protocol, &y.policy)
        })
}

/// The operator commands received, oldest first (later ones win).
fn commands(catalog: &AgentCatalog) -> Vec<Command> {
    let mut commands = catalog
        .fleet
        .as_ref()
        .map(|f| f.read(|inner| inner.commands.clone()))
        .unwrap_or_default();
    commands.sort_by_key(|c| c.created_at);
    commands
}

/// The protocol most instances registered (TCP when none).
fn protocol(instances: &[Instance]) -> Protocol {
    let mut counts: Vec<(Protocol, usize)> = Vec::new();
    for i in instances {
        match counts.iter_mut().find(|(p, _)| *p == i.protocol) {
            Some((_, n)) => *n += 1,
            None => counts.push((i.protocol, 1)),
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map_or(Protocol::Tcp, |(p, _)| p)
}

/// An instance the proxy can connect to: an IP address and a port, or
/// for a meshed one its node's inbound listener (and then the address
/// that names it is that listener's IP address with its port: it may
/// listen on loopback on its host).
fn endpoint(service: &str, i: &Instance) -> Option<Endpoint> {
    if i.port == 0 {
        return None;
    }
    let (addr, mesh) = match i.inbound {
        Some(inbound) => {
            let hop = signpost_proxy::mesh::MeshHop::new(inbound, service, i.port)?;
            (SocketAddr::new(inbound.ip(), i.port), Some(hop))
        }
        None => (SocketAddr::new(i.address?, i.port), None),
    };
    Some(Endpoint {
        addr,
        zone: i.zone.clone(),
        tags: i.tags.clone(),
        health: i.health,
        weights: i.weights,
        host_gone: i.host_gone,
        mesh,
    })
}
