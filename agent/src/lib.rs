//! The Signpost host agent: it registers the services on its host, checks
//! their health next to them, and answers the Consul-compatible local API.
//!
//! Layout (the data flows top to bottom):
//! - [`files`]: `services_dir/*.yaml`, watched; bad files keep their last
//!   good version.
//! - `api`: the local HTTP API (registration, catalog, health, blocking
//!   queries, `/metrics`); `acl`: what each request's token may do there
//!   (resolved by the control plane, cached).
//! - [`agent`]: the one entry point for every change, whatever its source.
//! - [`state`]: services, checks and indexes; changes are published on a
//!   `watch` channel for blocking queries, the sync, DNS and the proxy.
//! - [`checks`]: one task per active check; `reaper`: TTL expiry, and
//!   services critical longer than `deregister_critical_after` removed.
//! - `supervise`: every background task is started again if it stops
//!   before shutdown, logged and counted; a serving component (DNS, proxy,
//!   API) that stops takes the agent down loudly.
//! - [`persist`]: API registrations, maintenance and TTL status in
//!   `data_dir`.
//! - `sync` and [`fleet`]: the stream to the control plane, and the view
//!   of the services this host uses that it maintains; `advertise`: the
//!   address the fleet knows this host by, and `liveness`: the read-only
//!   listener there that peers probe when its stream drops.
//! - `kv`: the KV reads this agent caches (on disk) and watches on the
//!   control plane, so configuration is served on the host.
//! - `catalog`: this node's state and the fleet view as one catalog, with
//!   the stable service VIPs ([`vips`]).
//! - `dns` and `proxy`: the local DNS server (the `signpost-dns` crate)
//!   and the L4/L7 proxy on the VIPs (the `signpost-proxy` crate), both
//!   answering from that catalog.
//! - [`cli`], [`dev`]: the `signpost` subcommands that talk to an agent,
//!   and the one-command demo.
//! - [`alloc`]: the binary's global allocator.

mod acl;
mod advertise;
pub mod agent;
pub mod alloc;
mod api;
mod identity;
pub use api::route_table;
mod catalog;
pub mod checks;
pub mod cli;
pub mod dev;
mod dns;
mod files;
pub mod fleet;
mod kv;
mod liveness;
mod mesh;
pub mod metrics;
mod persist;
mod proxy;
mod reaper;
pub mod state;
mod supervise;
mod sync;
pub mod tls;
pub mod vips;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use signpost_core::config::{AgentConfig, valid_node_name};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::checks::{CheckSettings, FastRecheck, Supervisor};
use crate::metrics::Metrics;
use crate::state::{LocalState, NodeInfo};
use crate::supervise::supervise;
use crate::vips::Vips;

/// How long in-flight API requests get to finish after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs the agent until `shutdown` fires, then drains: in-flight API
/// requests finish (blocking queries answer at once), checks stop, and the
/// state is written one last time. `ready` receives the API's address once
/// it accepts connections.
pub async fn run(
    config: AgentConfig,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tls::install_crypto_provider();
    let advertise = advertise_addr(&config)?;
    let listen = config.api.listen;
    let (agent, files, metrics) = open(config, advertise, &shutdown)?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on api.listen {listen}"))?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "local API listening");

    let mut background = Background::new(agent.metrics.clone());
    {
        let agent = agent.clone();
        background.spawn("reaper", move |stop| {
            let agent = agent.clone();
            async move {
                reaper::run(agent, stop).await;
                Ok(())
            }
        });
    }
    {
        let agent = agent.clone();
        background.spawn("state writer", move |stop| {
            let agent = agent.clone();
            async move {
                persist::run(agent, stop).await;
                Ok(())
            }
        });
    }
    {
        let agent = agent.clone();
        background.spawn("service file watcher", move |stop| {
            files::watch(agent.clone(), files.clone(), stop)
        });
    }
    let acl = Arc::new(acl::AgentAcl::new(
        agent.config.acl.clone(),
        agent.config.control_plane.is_some(),
        agent.metrics.clone(),
    ));
    let mesh = open_mesh(&agent.config, advertise).await?;
    let fleet = match agent.config.control_plane.clone() {
        Some(cp) => {
            let mesh = mesh.as_ref().map(|(_, m)| m.clone());
            Some(join_fleet(&agent, &acl, cp, advertise, mesh, &mut background).await?)
        }
        None => None,
    };
    let serving = serve(&agent, fleet, acl, listener, mesh, metrics, &shutdown).await?;
    if let Some(ready) = ready
        && ready.send(local).is_err()
    {
        tracing::debug!("nobody waits for the ready signal");
    }
    let stopped_early = until_shutdown(serving, &shutdown).await;
    agent.stop_checks().await;
    background.stop().await;
    if let Some(why) = stopped_early {
        anyhow::bail!("{why}");
    }
    tracing::info!("agent stopped");
    Ok(())
}

/// The mesh's inbound listener and state, when this host takes part in
/// the mesh: `mesh.enabled`, with a control plane (whose CA signs the
/// services' certificates) and the proxy.
async fn open_mesh(
    config: &AgentConfig,
    advertise: IpAddr,
) -> anyhow::Result<Option<(TcpListener, Arc<mesh::Mesh>)>> {
    if !config.mesh.enabled || config.control_plane.is_none() || !config.proxy.enabled {
        return Ok(None);
    }
    let addr = SocketAddr::new(advertise, config.mesh.inbound_port);
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on the mesh's inbound port {addr} (mesh.inbound_port)")
    })?;
    let inbound = listener.local_addr()?;
    tracing::info!(%inbound, "mesh inbound listener bound");
    let mesh = mesh::Mesh::open(
        &config.data_dir,
        inbound,
        config.mesh.default_source.clone(),
    );
    Ok(Some((listener, Arc::new(mesh))))
}

/// The metrics of the parts that keep their own, registered with the
/// agent's.
struct PartMetrics {
    dns: Arc<signpost_dns::DnsMetrics>,
    proxy: Arc<signpost_proxy::ProxyMetrics>,
    api_server: signpost_daemon::http_server::ServerMetrics,
}

/// The agent's state as the last run left it: the node, the checks'
/// runtime, the service files (their first scan, for the watcher) and
/// what the API registered.
fn open(
    config: AgentConfig,
    advertise: IpAddr,
    shutdown: &CancellationToken,
) -> anyhow::Result<(
    Arc<Agent>,
    Arc<std::sync::Mutex<files::ServiceFiles>>,
    PartMetrics,
)> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
    signpost_daemon::fs::clean_up(&config.data_dir);
    std::fs::create_dir_all(&config.services_dir).with_context(|| {
        format!(
            "cannot create services_dir {}",
            config.services_dir.display()
        )
    })?;
    let node = NodeInfo {
        name: node_name(&config),
        id: node_id(&config.data_dir)?,
        address: advertise.to_string(),
        datacenter: config.datacenter.clone(),
        zone: config.zone.clone(),
        meta: config.node_meta.clone(),
        mesh: config.mesh.enabled,
        connect_by_default: config.mesh.connect_by_default,
    };
    tracing::info!(node = %node.name, id = %node.id, zone = %node.zone, %advertise, "starting agent");
    let state = Arc::new(LocalState::new(node));
    let mut metrics = Metrics::new();
    let parts = PartMetrics {
        dns: Arc::new(signpost_dns::DnsMetrics::default()),
        proxy: Arc::new(signpost_proxy::ProxyMetrics::default()),
        api_server: signpost_daemon::http_server::ServerMetrics::default(),
    };
    parts.dns.register(metrics.registry_mut());
    parts.proxy.register(metrics.registry_mut());
    parts.api_server.register(metrics.registry_mut(), "api");
    let metrics = Arc::new(metrics);
    let supervisor = Supervisor::new(
        state.clone(),
        metrics.clone(),
        CheckSettings {
            recheck: FastRecheck {
                count: config.checks.fast_recheck_count,
                spacing: config.checks.fast_recheck_spacing,
            },
            http_keep_alive: config.checks.http_keep_alive,
        },
        shutdown.child_token(),
    )
    .context("cannot start the health checks' runtime")?;
    let agent = Arc::new(Agent::new(config, state, metrics, supervisor));
    // Files first, then what the API registered before the restart, so
    // that API checks bound to file services find their service.
    let files = files::initial_scan(&agent);
    persist::load(&agent).with_context(|| {
        format!(
            "cannot read {}",
            persist::state_path(&agent.config.data_dir).display()
        )
    })?;
    Ok((agent, files, parts))
}

/// The background tasks: each runs under [`supervise`], started again if
/// it stops before [`Background::stop`].
struct Background {
    tasks: tokio::task::JoinSet<()>,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
}

impl Background {
    fn new(metrics: Arc<Metrics>) -> Self {
        Background {
            tasks: tokio::task::JoinSet::new(),
            stop: CancellationToken::new(),
            metrics,
        }
    }

    /// Runs the task `start` makes (given the stop token) as `task`.
    fn spawn<F, Fut>(&mut self, task: &'static str, start: F)
    where
        F: Fn(CancellationToken) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let token = self.stop.clone();
        let supervised = supervise(task, self.metrics.clone(), self.stop.clone(), move || {
            start(token.clone())
        });
        self.tasks.spawn(supervised);
    }

    async fn stop(mut self) {
        self.stop.cancel();
        while let Some(result) = self.tasks.join_next().await {
            if let Err(e) = result {
                tracing::error!(error = %e, "agent task failed");
            }
        }
    }
}

/// Joins the control plane's fleet: the liveness listener peers probe
/// when this host's stream drops, the fleet view (restored from disk, and
/// kept there), and the sync.
async fn join_fleet(
    agent: &Arc<Agent>,
    acl: &Arc<acl::AgentAcl>,
    cp: signpost_core::config::ControlPlaneClientConfig,
    advertise: IpAddr,
    mesh: Option<Arc<mesh::Mesh>>,
    background: &mut Background,
) -> anyhow::Result<Arc<fleet::FleetCache>> {
    let (listener, probe_address) = liveness::bind(advertise, agent.config.liveness_port).await?;
    let listener = Arc::new(listener);
    let (name, id) = agent
        .state
        .read(|i| (i.node.name.clone(), i.node.id.clone()));
    let fleet = Arc::new(fleet::FleetCache::new(
        &agent.config.upstreams,
        &name,
        agent.state.clock(),
    ));
    background.spawn("liveness listener", move |stop| {
        let (listener, name, id) = (listener.clone(), name.clone(), id.clone());
        async move {
            liveness::serve(&listener, name, id, stop).await;
            Ok(())
        }
    });
    fleet::load(&fleet, &agent.config.data_dir);
    {
        let (fleet, dir) = (fleet.clone(), agent.config.data_dir.clone());
        background.spawn("fleet view writer", move |stop| {
            let (fleet, dir) = (fleet.clone(), dir.clone());
            async move {
                fleet::keep(fleet, dir, stop).await;
                Ok(())
            }
        });
    }
    let settings = Arc::new(sync::Settings {
        config: cp,
        probe_address,
        acl: acl.clone(),
        identity: identity::path(&agent.config.data_dir),
        mesh,
    });
    let (for_sync, fleet_for_sync) = (agent.clone(), fleet.clone());
    background.spawn("control-plane sync", move |stop| {
        sync::run(
            for_sync.clone(),
            fleet_for_sync.clone(),
            settings.clone(),
            stop,
        )
    });
    Ok(fleet)
}

/// What serves until shutdown: a name for the log and how it ended.
type Serving = tokio::task::JoinSet<(&'static str, Result<(), String>)>;

/// Starts DNS, the proxy and the API on `listener`.
async fn serve(
    agent: &Arc<Agent>,
    fleet: Option<Arc<fleet::FleetCache>>,
    acl: Arc<acl::AgentAcl>,
    listener: TcpListener,
    mesh: Option<(TcpListener, Arc<mesh::Mesh>)>,
    metrics: PartMetrics,
    shutdown: &CancellationToken,
) -> anyhow::Result<Serving> {
    let (inbound, mesh) = match mesh {
        Some((listener, mesh)) => (Some(listener), Some(mesh)),
        None => (None, None),
    };
    let config = &agent.config;
    let catalog = if config.dns.enabled || config.proxy.enabled {
        let vips = Vips::load(&config.data_dir, config.proxy.vip_range).with_context(|| {
            format!("cannot read the VIP table in {}", config.data_dir.display())
        })?;
        Some(Arc::new(catalog::AgentCatalog {
            agent: agent.clone(),
            fleet: fleet.clone(),
            vips: Arc::new(vips),
            mesh: mesh.clone(),
        }))
    } else {
        None
    };
    let mut serving = Serving::new();
    if let Some(catalog) = catalog.as_ref().filter(|_| config.dns.enabled) {
        let server = dns::bind(catalog.clone(), metrics.dns)
            .await
            .context("cannot start the DNS server (dns.listen)")?;
        tracing::info!(addr = %server.local_addr(), domain = %config.dns.domain, "DNS listening (UDP and TCP)");
        let token = shutdown.clone();
        serving.spawn(async move {
            let served = server.run_until(token.cancelled_owned()).await;
            ("DNS server", served.map_err(|e| e.to_string()))
        });
    }
    if let Some(catalog) = catalog.as_ref().filter(|_| config.proxy.enabled) {
        let proxy =
            proxy::new(catalog, metrics.proxy).context("cannot start the proxy's threads")?;
        tracing::info!(vip_range = %config.proxy.vip_range, "proxy serving the service VIPs");
        if let Some(inbound) = inbound {
            proxy.serve_inbound(inbound);
        }
        let (catalog, token) = (catalog.clone(), shutdown.clone());
        serving.spawn(async move {
            proxy::run(proxy, catalog, token, SHUTDOWN_GRACE).await;
            ("proxy", Ok(()))
        });
    }
    let http = Arc::new(api::ControlPlaneHttp::new(
        config.control_plane.as_ref().map(|c| c.ca_file.clone()),
    ));
    let kv = config
        .control_plane
        .as_ref()
        .and_then(|c| c.http.as_deref())
        .map(|cp| {
            kv::KvCache::open(
                &config.data_dir,
                http.clone(),
                api::control_plane_url(cp),
                shutdown.clone(),
            )
        });
    let router = api::router(api::Api {
        agent: agent.clone(),
        fleet,
        shutdown: shutdown.clone(),
        http,
        acl,
        kv,
        mesh,
    });
    let (server_shutdown, limits) = (shutdown.clone(), config.api.limits.clone());
    serving.spawn(async move {
        signpost_daemon::http_server::serve(
            listener,
            router,
            &limits,
            metrics.api_server,
            None,
            server_shutdown,
        )
        .await;
        ("API server", Ok(()))
    });
    Ok(serving)
}

/// Waits for the shutdown, or for a serving part to stop first: the agent
/// cannot serve without it, so that stops the agent loudly (systemd starts
/// it again) rather than leaving the host without its DNS, proxy or API.
/// Then gives what is in flight up to [`SHUTDOWN_GRACE`]. Returns why it
/// stopped early, if it did.
async fn until_shutdown(mut serving: Serving, shutdown: &CancellationToken) -> Option<String> {
    let stopped_early = tokio::select! {
        biased;
        () = shutdown.cancelled() => None,
        // Ending because of the shutdown (the select saw it first) is not
        // ending early.
        Some(ended) = serving.join_next() => (!shutdown.is_cancelled()).then(|| match ended {
            Ok((what, Ok(()))) => format!("{what} stopped"),
            Ok((what, Err(e))) => format!("{what} failed: {e}"),
            Err(e) => format!("a serving task failed: {e}"),
        }),
    };
    if let Some(why) = &stopped_early {
        tracing::error!(error = %why, "the agent cannot serve without it: stopping");
        shutdown.cancel();
    }
    tracing::info!("shutting down: finishing in-flight requests");
    let drained = tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(5), async {
        while let Some(ended) = serving.join_next().await {
            match ended {
                Ok((_, Ok(()))) => {}
                Ok((what, Err(e))) => tracing::error!(error = %e, "{what} failed"),
                Err(e) => tracing::error!(error = %e, "serving task failed"),
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("in-flight requests and connections did not finish in time");
    }
    stopped_early
}

/// The address other hosts reach this one at: `advertise_addr`, the
/// address of the interface it names, or the host's one private address
/// (loopback when the control plane is on loopback too).
fn advertise_addr(config: &AgentConfig) -> anyhow::Result<IpAddr> {
    Ok(advertise::resolve(config)?)
}

/// What `--validate` checks beyond the files, as the agent would at start:
/// the address to advertise can be found. (An unreadable CA does not stop
/// the agent, which serves its last view and keeps trying.)
pub fn preflight(config: &AgentConfig) -> anyhow::Result<()> {
    advertise_addr(config)?;
    Ok(())
}

/// The configured node name, or the host name reduced to a DNS label.
fn node_name(config: &AgentConfig) -> String {
    if let Some(name) = &config.node_name {
        return name.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let label: String = host
        .trim()
        .split('.')
        .next()
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    if valid_node_name(&label) {
        label
    } else {
        "signpost-node".to_string()
    }
}

/// A random node id (UUID v4 format), kept in `data_dir/node-id`.
fn node_id(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let b: [u8; 16] = rand::random();
    let id = format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-4{:01x}{:02x}-{:01x}{:01x}{:02x}-{}",
        b[0],
        b[1],
        b[2],
        b[3],
        b[4],
        b[5],
        b[6] & 0x0f,
        b[7],
        8 | (b[8] & 0x03),
        b[8] >> 4,
        b[9],
        b[10..16]
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    );
    signpost_daemon::fs::write_atomic(&path, id.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}
