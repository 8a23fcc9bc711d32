//! The local L4/L7 proxy: the data plane behind a service's VIP.
//!
//! A program on the host resolves `payments.service.internal` to the
//! service's VIP (the `dns` crate) and connects to it; this crate listens
//! there and hands the connection (L4) or each request (L7) to a healthy
//! instance anywhere in the fleet. The agent feeds it with
//! [`Proxy::update`]: the services in use on the host, their instances
//! and their [`Policy`]; nothing is ever regenerated or reloaded.
//!
//! Layout, in the order a connection meets it:
//! - [`listeners`]: which (VIP, port) serves which backend; opened and
//!   closed as the services change, without touching open connections.
//! - `accept`: client connections, registered with a thread's reactor
//!   only when they first have to wait.
//! - `workers`: the threads connections run on, one current-thread
//!   runtime each, so a request never crosses threads.
//! - `tcp` / `http`: a connection joined to an instance (L4), or HTTP/1.1
//!   and h2c requests forwarded over pooled connections with deadlines
//!   and budgeted retries (L7); `first_bytes` tells h2c from HTTP/1.1,
//!   and `body` keeps what a retry sends again.
//! - `backend`: one service's instances, policy snapshot, limits, retry
//!   budget and pools.
//! - `pool`: the connections to instances kept open between requests,
//!   one pool per backend and worker thread.
//! - `balance` and `endpoint`: which instance (health, panic threshold,
//!   zone, P2C peak-EWMA / round robin / rendezvous hash) and what was
//!   learned about each (latency, load, consecutive failures, ejection).
//! - `breaker`: the automatic circuit breaker (and the operator's
//!   forced state).
//! - `rate`: the token bucket of an operator's rate limit.
//! - [`error`]: failures classified by origin, retryability and status.
//! - [`metrics`]: per service and instance.

mod accept;
mod backend;
mod balance;
mod body;
mod breaker;
mod endpoint;
pub mod error;
mod first_bytes;
mod http;
mod idle;
mod listeners;
pub mod mesh;
pub mod metrics;
mod pool;
mod rate;
mod tcp;
mod workers;

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use signpost_core::model::Protocol;
use signpost_core::policy::Policy;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use arc_swap::ArcSwap;

use crate::backend::Backend;
pub use crate::endpoint::Endpoint;
pub use crate::http::{ATTEMPT_HEADER, ERROR_HEADER};
use crate::listeners::{BackendKey, Open, Tasks};
pub use crate::metrics::{ProxyMetrics, TrafficTotals};

/// The proxy's settings from the agent's configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The agent's zone, preferred when balancing.
    pub zone: String,
    /// The extra port of HTTP services' VIPs (0: none).
    pub http_port: u16,
    /// Idle pooled connections to instances close after this.
    pub pool_idle_timeout: Duration,
    /// A client's HTTP connection that starts no request for this long
    /// closes once its current exchange ends (zero: never).
    pub client_idle_timeout: Duration,
    /// A client's HTTP connection that sends nothing for this long after
    /// it opened closes (zero: never).
    pub client_first_byte_timeout: Duration,
    /// How connections to instances notice a host that is gone.
    pub liveness: Liveness,
    /// A log line per request (L7) or connection (L4).
    pub access_log: bool,
    /// Threads connections run on (at least one).
    pub threads: usize,
    /// Where VIP listeners' sockets come from when a previous process
    /// handed them over, and where they are recorded for a successor.
    pub sockets: Arc<signpost_core::sockets::Sockets>,
}

/// How a connection to an instance notices that the instance's host is
/// gone without a word (stopped, or cut off by the network): with no
/// reset, a connection would otherwise wait forever while idle (an L4
/// connection, a tunnel) or for some 15 minutes of retransmissions.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    /// TCP keep-alive probes, this far apart, once the connection has
    /// carried nothing for this long (zero: none).
    pub keepalive: Duration,
    /// Data or probes left unacknowledged this long close the connection
    /// (`TCP_USER_TIMEOUT`; zero: the kernel's retransmission limits).
    pub user_timeout: Duration,
}

/// One name the proxy serves: a service, or a tag-filtered view of one,
/// with its VIP.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// The VIP's name: `web`, or `v2.web` for the instances tagged `v2`.
    pub name: String,
    /// The catalog service it reaches.
    pub service: String,
    pub vip: Ipv4Addr,
    /// What the instances registered; the policy may override it.
    pub protocol: Protocol,
    /// Every instance, whatever its health (the proxy decides).
    pub endpoints: Vec<Endpoint>,
    pub policy: Policy,
}

/// A local meshed instance the inbound listener serves.
#[derive(Debug, Clone)]
pub struct InboundSpec {
    pub service: String,
    /// The port it registered: callers name it by it.
    pub port: u16,
    /// Where it listens on this host.
    pub addr: SocketAddr,
    pub protocol: Protocol,
    pub policy: Policy,
}

/// What every backend shares.
pub(crate) struct Shared {
    zone: String,
    pool_idle_timeout: Duration,
    client_idle_timeout: Duration,
    client_first_byte_timeout: Duration,
    liveness: Liveness,
    access_log: bool,
    metrics: Arc<ProxyMetrics>,
    on_use: Box<dyn Fn(&str) + Send + Sync>,
    started: std::time::Instant,
    /// How many worker threads (each gets its own pools).
    workers: usize,
    /// The mesh as the agent last gave it.
    mesh: ArcSwap<mesh::MeshView>,
    /// The local instances the inbound listener serves.
    inbound: mesh::inbound::Inbound,
}

struct Inner {
    backends: HashMap<BackendKey, Arc<Backend>>,
    listeners: HashMap<SocketAddr, Open>,
    /// Listeners that could not be opened last time (logged once).
    failed: HashSet<SocketAddr>,
    /// The instances with metric series: (VIP name, address). Several
    /// backends of one name share an instance's series.
    instances: HashSet<(String, SocketAddr)>,
    /// The VIP names with metric series.
    names: HashSet<String>,
}

/// The running proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    http_port: u16,
    inner: Mutex<Inner>,
    tasks: Tasks,
}

impl Proxy {
    /// A proxy with no listeners yet. `on_use` is called with a service's
    /// name when connections or requests use it (at most once a second
    /// per service), so the agent keeps its instances up to date.
    pub fn new(
        settings: Settings,
        metrics: Arc<ProxyMetrics>,
        on_use: impl Fn(&str) + Send + Sync + 'static,
    ) -> std::io::Result<Proxy> {
        let workers = Arc::new(workers::Workers::start(settings.threads)?);
        Ok(Proxy {
            shared: Arc::new(Shared {
                zone: settings.zone,
                pool_idle_timeout: settings.pool_idle_timeout,
                client_idle_timeout: settings.client_idle_timeout,
                client_first_byte_timeout: settings.client_first_byte_timeout,
                liveness: settings.liveness,
                access_log: settings.access_log,
                metrics,
                on_use: Box::new(on_use),
                started: std::time::Instant::now(),
                workers: workers.count(),
                mesh: ArcSwap::from_pointee(mesh::MeshView::default()),
                inbound: mesh::inbound::Inbound::default(),
            }),
            http_port: settings.http_port,
            inner: Mutex::new(Inner {
                backends: HashMap::new(),
                listeners: HashMap::new(),
                failed: HashSet::new(),
                instances: HashSet::new(),
                names: HashSet::new(),
            }),
            tasks: Tasks {
                tracker: TaskTracker::new(),
                workers,
                drain: CancellationToken::new(),
                stop: CancellationToken::new(),
                sockets: settings.sockets,
            },
        })
    }

    /// Serves exactly `services` from now on: backends are updated in
    /// place (keeping what was learned about instances), listeners opened
    /// and closed as needed. Returns how many listeners could not be
    /// opened; call again later to retry them. Must be called within a
    /// Tokio runtime.
    pub fn update(&self, services: Vec<ServiceSpec>) -> usize {
        let mut inner = lock(&self.inner);
        let inner = &mut *inner;
        let mut wanted_backends: HashMap<BackendKey, Arc<Backend>> = HashMap::new();
        let mut wanted_listeners: HashMap<SocketAddr, BackendKey> = HashMap::new();
        for spec in services {
            let protocol = spec.policy.protocol.unwrap_or(spec.protocol);
            let plan = listeners::plan(&spec, protocol, self.http_port);
            for (key, endpoints) in plan.backends {
                let backend = match inner.backends.remove(&key) {
                    Some(b) => {
                        b.update(endpoints, protocol, spec.policy.clone());
                        b
                    }
                    None => Arc::new(Backend::new(
                        &spec.name,
                        &spec.service,
                        endpoints,
                        protocol,
                        spec.policy.clone(),
                        self.shared.clone(),
                    )),
                };
                wanted_backends.insert(key, backend);
            }
            for (addr, key) in plan.listeners {
                if let Some(other) = wanted_listeners.insert(addr, key) {
                    tracing::error!(%addr, service = %other.0, "two services want the same VIP and port");
                }
            }
        }
        inner.backends = wanted_backends;
        // Series of services and instances no backend has any more go.
        let mut instances = HashSet::new();
        let mut names = HashSet::new();
        for backend in inner.backends.values() {
            let snapshot = backend.snapshot();
            let members = snapshot.members.iter();
            instances.extend(members.map(|m| (backend.name.clone(), m.endpoint.addr)));
            names.insert(backend.name.clone());
        }
        for (name, addr) in inner.instances.difference(&instances) {
            self.shared.metrics.remove_instance(name, &addr.to_string());
        }
        for name in inner.names.difference(&names) {
            self.shared.metrics.remove_service(name);
        }
        inner.instances = instances;
        inner.names = names;

        inner.listeners.retain(|addr, open| {
            let keep = wanted_listeners.contains_key(addr);
            if !keep {
                tracing::info!(%addr, service = %open.key.0, "closing listener; open connections carry on");
                open.close();
            }
            keep
        });
        let mut failures = 0;
        for (addr, key) in wanted_listeners {
            let Some(backend) = inner.backends.get(&key).cloned() else {
                continue;
            };
            if let Some(open) = inner.listeners.get_mut(&addr) {
                if open.key != key {
                    open.target.store(backend);
                    open.key = key;
                }
                continue;
            }
            match listeners::open(addr, key.clone(), backend, &self.tasks) {
                Ok(open) => {
                    tracing::info!(%addr, service = %key.0, "listening");
                    inner.failed.remove(&addr);
                    inner.listeners.insert(addr, open);
                }
                Err(error) => {
                    failures += 1;
                    self.shared.metrics.listen_error();
                    if inner.failed.insert(addr) {
                        tracing::error!(%addr, service = %key.0, %error, "cannot listen on the service's VIP; retrying");
                    }
                }
            }
        }
        inner.failed.retain(|a| !inner.listeners.contains_key(a));
        self.shared
            .metrics
            .listeners()
            .set(i64::try_from(inner.listeners.len()).unwrap_or(i64::MAX));
        failures
    }

    /// The mesh from now on: new connections and requests use it, and
    /// open inbound connections that its intentions now deny outright
    /// are closed.
    pub fn set_mesh(&self, view: mesh::MeshView) {
        let view = Arc::new(view);
        self.shared.mesh.store(view.clone());
        mesh::inbound::recheck(&self.shared.inbound, &view, &self.shared);
    }

    /// The local meshed instances the inbound listener serves from now
    /// on, each through a backend of its own (updated in place, as the
    /// VIPs' are).
    pub fn update_inbound(&self, targets: Vec<InboundSpec>) {
        let old = self.shared.inbound.targets.load_full();
        let mut new = HashMap::new();
        for spec in targets {
            let key = (spec.service.to_ascii_lowercase(), spec.port);
            let endpoint = Endpoint {
                addr: spec.addr,
                zone: self.shared.zone.clone(),
                tags: Vec::new(),
                health: signpost_core::model::Health::Passing,
                weights: signpost_core::model::Weights::default(),
                host_gone: false,
                mesh: None,
            };
            let backend = match old.get(&key) {
                Some(b) => {
                    b.update(vec![endpoint], spec.protocol, spec.policy);
                    b.clone()
                }
                None => Arc::new(Backend::new(
                    &format!("inbound/{}", spec.service),
                    &spec.service,
                    vec![endpoint],
                    spec.protocol,
                    spec.policy,
                    self.shared.clone(),
                )),
            };
            new.insert(key, backend);
        }
        self.shared.inbound.targets.store(Arc::new(new));
    }

    /// Serves the mesh's inbound listener on `listener` until shutdown.
    /// Must be called within a Tokio runtime.
    pub fn serve_inbound(&self, listener: tokio::net::TcpListener) {
        let (shared, tasks) = (self.shared.clone(), self.tasks.clone());
        self.tasks
            .tracker
            .spawn(mesh::inbound::accept(listener, shared, tasks));
    }

    /// What is in flight (requests and L4 connections) to instances that
    /// are not passing (drained: new requests go elsewhere), by service
    /// and instance address; what has nothing in flight is left out.
    pub fn draining(&self) -> HashMap<String, Vec<(SocketAddr, u32)>> {
        let inner = lock(&self.inner);
        let mut by_service: HashMap<String, std::collections::BTreeMap<SocketAddr, u32>> =
            HashMap::new();
        for backend in inner.backends.values() {
            for member in &backend.snapshot().members {
                if member.endpoint.health == signpost_core::model::Health::Passing {
                    continue;
                }
                let active = member.stats.active();
                if active > 0 {
                    let count = by_service
                        .entry(backend.service.clone())
                        .or_default()
                        .entry(member.endpoint.addr)
                        .or_default();
                    *count = count.saturating_add(active);
                }
            }
        }
        by_service
            .into_iter()
            .map(|(service, by_addr)| (service, by_addr.into_iter().collect()))
            .collect()
    }

    /// The addresses listened on.
    pub fn listening(&self) -> Vec<SocketAddr> {
        let inner = lock(&self.inner);
        inner.listeners.keys().copied().collect()
    }

    /// Stops accepting, lets HTTP connections finish their requests and
    /// L4 connections run for up to `grace`, then closes what is left.
    pub async fn shutdown(&self, grace: Duration) {
        {
            let mut inner = lock(&self.inner);
            for open in inner.listeners.values() {
                open.stop();
            }
            inner.listeners.clear();
        }
        self.tasks.drain.cancel();
        self.tasks.tracker.close();
        if tokio::time::timeout(grace, self.tasks.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("proxy connections still open after the grace period: closing them");
            self.tasks.stop.cancel();
            self.tasks.tracker.wait().await;
        }
        self.tasks.workers.stop().await;
    }
}

/// Locks `mutex`, also after a panic while it was held elsewhere: every
/// state the proxy keeps under a lock is whole between its statements.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Connects to an instance within `timeout`, with TCP_NODELAY and the
/// `liveness` checks set; the error is the reason, for
/// [`error::ProxyError::Connect`].
async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    liveness: Liveness,
) -> Result<TcpStream, String> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            nodelay(&stream);
            let socket = socket2::SockRef::from(&stream);
            if !liveness.keepalive.is_zero() {
                let probes = socket2::TcpKeepalive::new()
                    .with_time(liveness.keepalive)
                    .with_interval(liveness.keepalive);
                if let Err(error) = socket.set_tcp_keepalive(&probes) {
                    tracing::debug!(%addr, %error, "cannot set TCP keep-alive");
                }
            }
            if !liveness.user_timeout.is_zero()
                && let Err(error) = socket.set_tcp_user_timeout(Some(liveness.user_timeout))
            {
                tracing::debug!(%addr, %error, "cannot set TCP_USER_TIMEOUT");
            }
            Ok(stream)
        }
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("timed out after {timeout:?}")),
    }
}

/// Sets TCP_NODELAY: a proxy must not hold back small writes.
fn nodelay(stream: &impl std::os::fd::AsFd) {
    if let Err(error) = socket2::SockRef::from(stream).set_tcp_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
}
