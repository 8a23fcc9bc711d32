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
//! - `reload`: SIGHUP and `PUT /v1/agent/reload` read the configuration
//!   file again and apply what can change while serving.
//! - `handover` and `systemd`: restarts that drop nothing: the listening
//!   sockets are handed to a new process, or kept in systemd's file
//!   descriptor store while systemd restarts the agent; `stop`: which
//!   stop a SIGTERM is (a restart by systemd does not drain the node),
//!   and the drain of what serves.
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
mod drain;
mod files;
pub mod fleet;
mod handover;
mod kv;
mod liveness;
mod mesh;
pub mod metrics;
mod persist;
mod proxy;
mod reaper;
mod reload;
pub use reload::Reloading;
pub mod state;
mod stop;
mod supervise;
mod sync;
mod systemd;
pub mod tls;
pub mod vips;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use signpost_core::config::{AgentConfig, valid_node_name};
use signpost_core::sockets::{self, Sockets};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::checks::{CheckSettings, Supervisor};
use crate::metrics::Metrics;
use crate::state::{LocalState, NodeInfo};
use crate::supervise::supervise;
use crate::vips::Vips;

/// How long in-flight API requests get to finish after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs the agent until `shutdown` fires, then drains: in-flight API
/// requests finish (blocking queries answer at once), checks stop, and the
/// state is written one last time. `ready` receives the API's address once
/// it accepts connections. With `reloading`, the file `config` was read
/// from is read again on its signal and on `PUT /v1/agent/reload`.
pub async fn run(
    config: AgentConfig,
    reloading: Option<Reloading>,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // First, before anything could start a program that would inherit
    // them: the sockets systemd kept for this unit.
    let stored = systemd::listen::take();
    tls::install_crypto_provider();
    let advertise = advertise_addr(&config)?;
    let listen = config.api.listen;
    // An agent already running on this data_dir hands over its sockets,
    // having written its state, which `open` reads next.
    let data_dir = config.data_dir.clone();
    let (inherited, predecessor) =
        tokio::task::spawn_blocking(move || handover::take_over(&data_dir))
            .await
            .context("the handover failed")??;
    let store = systemd::FdStore::from_env().map(Arc::new);
    let sockets = Arc::new(Sockets::with_store(
        inherited,
        stored,
        store.clone().map(|s| s as Arc<dyn sockets::Store>),
    ));
    let (agent, files, metrics) = open(config, advertise, &shutdown)?;
    let listener = listen_tcp(&sockets, sockets::API, listen)
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
    let mesh = open_mesh(&agent.config, advertise, &sockets).await?;
    let fleet = match agent.config.control_plane.clone() {
        Some(cp) => {
            let mesh = mesh.as_ref().map(|(_, m)| m.clone());
            let joined = join_fleet(&agent, &acl, cp, advertise, mesh, &sockets, &mut background);
            Some(joined.await?)
        }
        None => None,
    };
    if let Some(reloading) = reloading {
        reload::follow(&agent, fleet.clone(), reloading, &mut background);
    }
    let taken_over = CancellationToken::new();
    // What serves stops once this node's instances are drained (SIGTERM),
    // or at once after a handover (the new process serves them) or when
    // systemd restarts the agent (see `stop`).
    let stopping = CancellationToken::new();
    let dns_stopping = CancellationToken::new();
    let (grace, l4_grace) = tokio::sync::watch::channel(agent.config.drain_timeout);
    let parts = Parts {
        listener,
        mesh,
        metrics,
        sockets: sockets.clone(),
        taken_over: taken_over.clone(),
        dns_stopping: dns_stopping.clone(),
        l4_grace,
    };
    let (serving, proxy_ready) = serve(&agent, fleet.clone(), acl, parts, &stopping).await?;
    if let Some(ready) = proxy_ready {
        // The VIP listeners take their inherited sockets on the proxy's
        // first update.
        if tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .is_err()
        {
            tracing::warn!("the proxy did not open its listeners within 10s");
        }
    }
    let unclaimed = sockets.drop_unclaimed();
    if !unclaimed.is_empty() {
        tracing::info!(sockets = ?unclaimed, "closed handed-over sockets this configuration does not serve");
    }
    if let Some(predecessor) = predecessor {
        predecessor.serving();
    }
    serve_handover(
        &agent,
        fleet.clone(),
        sockets.clone(),
        &taken_over,
        &shutdown,
    )?;
    stop::on_shutdown(
        stop::Context {
            agent: agent.clone(),
            fleet,
            sockets,
            store,
        },
        shutdown.clone(),
        stop::Signals {
            serving: stopping.clone(),
            dns: dns_stopping.clone(),
            grace,
        },
    );
    restart_on_sigusr2(taken_over);
    systemd::notify_ready();
    if let Some(ready) = ready
        && ready.send(local).is_err()
    {
        tracing::debug!("nobody waits for the ready signal");
    }
    let stopped_early = stop::until_shutdown(
        serving,
        &shutdown,
        &stopping,
        &dns_stopping,
        &agent,
        background,
    )
    .await;
    if let Some(why) = stopped_early {
        anyhow::bail!("{why}");
    }
    tracing::info!("agent stopped");
    Ok(())
}

/// A TCP listener on `addr`: the socket the previous process served it
/// from, if it handed one over as `name`, else a new one; recorded for a
/// successor.
async fn listen_tcp(
    sockets: &Sockets,
    name: &str,
    addr: SocketAddr,
) -> std::io::Result<TcpListener> {
    let listener = match sockets.take_tcp(name, addr).into_iter().next() {
        Some(inherited) => TcpListener::from_std(inherited)?,
        None => TcpListener::bind(addr).await?,
    };
    sockets.serving(name, &[&listener])?;
    Ok(listener)
}

/// Hands this process's sockets to a new agent process that asks (see
/// `handover`), having written the state it starts from; once that one
/// serves, this one writes nothing more to `data_dir` and shuts down.
fn serve_handover(
    agent: &Arc<Agent>,
    fleet: Option<Arc<fleet::FleetCache>>,
    sockets: Arc<Sockets>,
    taken_over: &CancellationToken,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let (for_prepare, for_done) = (agent.clone(), agent.clone());
    let (taken_over, shutdown) = (taken_over.clone(), shutdown.clone());
    handover::listen(
        &agent.config.data_dir,
        sockets,
        tokio::runtime::Handle::current(),
        move || {
            let (agent, fleet) = (for_prepare.clone(), fleet.clone());
            async move {
                if let Err(error) = persist::flush(&agent).await {
                    tracing::error!(%error, "cannot write the state for the new process");
                }
                if let Some(fleet) = fleet {
                    fleet::save(&fleet, &agent.config.data_dir);
                }
            }
        },
        move || {
            for_done.hand_over();
            taken_over.cancel();
            shutdown.cancel();
        },
    )
}

/// SIGUSR2 restarts the agent through a handover, as `signpost restart`
/// does (what the package's upgrade sends).
fn restart_on_sigusr2(taken_over: CancellationToken) {
    let mut usr2 = match tokio::signal::unix::signal(
        tokio::signal::unix::SignalKind::user_defined2(),
    ) {
        Ok(signal) => signal,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGUSR2: restarts only through `signpost restart`");
            return;
        }
    };
    tokio::spawn(async move {
        while usr2.recv().await.is_some() {
            match handover::restart(&taken_over).await {
                Ok(pid) => {
                    tracing::info!(pid, "restarted on SIGUSR2");
                    return;
                }
                Err(error) => {
                    tracing::error!(%error, "restart on SIGUSR2 failed: this process goes on serving")
                }
            }
        }
    });
}

/// The mesh's inbound listener and state, when this host takes part in
/// the mesh: `mesh.enabled`, with a control plane (whose CA signs the
/// services' certificates) and the proxy.
async fn open_mesh(
    config: &AgentConfig,
    advertise: IpAddr,
    sockets: &Sockets,
) -> anyhow::Result<Option<(TcpListener, Arc<mesh::Mesh>)>> {
    if !config.mesh.enabled || config.control_plane.is_none() || !config.proxy.enabled {
        return Ok(None);
    }
    let addr = SocketAddr::new(advertise, config.mesh.inbound_port);
    let listener = listen_tcp(sockets, sockets::INBOUND, addr)
        .await
        .with_context(|| {
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
        CheckSettings::from(&config.checks),
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
    sockets: &Sockets,
    background: &mut Background,
) -> anyhow::Result<Arc<fleet::FleetCache>> {
    let (listener, probe_address) =
        liveness::bind(advertise, agent.config.liveness_port, sockets).await?;
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
        let (fleet, agent) = (fleet.clone(), agent.clone());
        background.spawn("fleet view writer", move |stop| {
            let (fleet, agent) = (fleet.clone(), agent.clone());
            async move {
                fleet::keep(fleet, agent, stop).await;
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

/// What [`serve`] starts serving from.
struct Parts {
    /// The API's listener.
    listener: TcpListener,
    mesh: Option<(TcpListener, Arc<mesh::Mesh>)>,
    metrics: PartMetrics,
    sockets: Arc<Sockets>,
    /// Fired when a new process took over.
    taken_over: CancellationToken,
    /// When DNS stops (see `stop`).
    dns_stopping: CancellationToken,
    /// How long L4 connections get once serving stops.
    l4_grace: tokio::sync::watch::Receiver<Duration>,
}

/// Starts DNS, the proxy and the API; with the proxy, the signal that it
/// made its first update (its listeners are open).
async fn serve(
    agent: &Arc<Agent>,
    fleet: Option<Arc<fleet::FleetCache>>,
    acl: Arc<acl::AgentAcl>,
    parts: Parts,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Serving, Option<tokio::sync::oneshot::Receiver<()>>)> {
    let Parts {
        listener,
        mesh,
        metrics,
        sockets,
        taken_over,
        dns_stopping,
        l4_grace,
    } = parts;
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
        let server = dns::bind(catalog.clone(), metrics.dns, &sockets)
            .await
            .context("cannot start the DNS server (dns.listen)")?;
        tracing::info!(addr = %server.local_addr(), domain = %config.dns.domain, "DNS listening (UDP and TCP)");
        let token = dns_stopping;
        serving.spawn(async move {
            let served = server.run_until(token.cancelled_owned()).await;
            ("DNS server", served.map_err(|e| e.to_string()))
        });
    }
    let mut proxy_ready = None;
    if let Some(catalog) = catalog.as_ref().filter(|_| config.proxy.enabled) {
        let proxy_metrics = metrics.proxy.clone();
        let proxy = Arc::new(
            proxy::new(catalog, metrics.proxy, sockets)
                .context("cannot start the proxy's threads")?,
        );
        if let Some(fleet) = &fleet {
            // What it has in flight to draining instances, for the
            // control plane (and `signpost drain` on their hosts).
            let proxy = proxy.clone();
            fleet.set_in_flight_source(Box::new(move || proxy.draining()));
            // What it sends each service, for the console's figures.
            fleet.set_traffic_source(Box::new(move || proxy_metrics.traffic()));
        }
        tracing::info!(vip_range = %config.proxy.vip_range, "proxy serving the service VIPs");
        if let Some(inbound) = inbound {
            proxy.serve_inbound(inbound);
        }
        let (catalog, token) = (catalog.clone(), shutdown.clone());
        let (ready, first_update) = tokio::sync::oneshot::channel();
        proxy_ready = Some(first_update);
        serving.spawn(async move {
            proxy::run(proxy, catalog, token, l4_grace, ready).await;
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
        taken_over,
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
    Ok((serving, proxy_ready))
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
    let id = signpost_core::uuid::new_v4();
    signpost_daemon::fs::write_atomic(&path, id.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}
