//! The agent's view of the fleet: the services it subscribed to, as the
//! control plane sent them (snapshot, then deltas), and the list of service
//! names. It keeps serving its last view when the control plane is gone,
//! and keeps it on disk (`data_dir/fleet.pb`) for a restart without one.
//! Instances are checked and converted to [`RemoteInstance`]s as updates
//! arrive; what fails the checks is refused, logged and counted there.

mod remote;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use signpost_core::command::Command;
use signpost_proto::{AckQuery, AckStatus, FleetSnapshot, InFlight, ServiceNames, ServiceUpdate};
use tokio::sync::{Notify, watch};

pub use self::remote::{RemoteCheck, RemoteInstance};
use crate::state::IndexClock;

pub struct CachedService {
    /// The control plane's index of the service (for resuming).
    pub index: u64,
    /// The agent's index of what the API shows of the service: other
    /// nodes' instances (from the agent's [`IndexClock`]).
    pub view_index: u64,
    /// Keyed by (node, instance id).
    pub instances: BTreeMap<(String, String), RemoteInstance>,
}

#[derive(Default)]
pub struct FleetInner {
    pub services: HashMap<String, CachedService>,
    pub names: Option<ServiceNames>,
    /// The agent's index of the service names (from its [`IndexClock`]).
    pub names_index: u64,
    pub connected: bool,
    pub last_contact: Option<Instant>,
    /// Services something on this host uses.
    pub subscriptions: HashMap<String, Instant>,
    /// Total changes applied, for blocking queries.
    pub version: u64,
    /// The control plane's epoch the indexes belong to.
    pub epoch: String,
    /// The operator commands last received (the agent expires them).
    pub commands: Vec<Command>,
}

pub struct FleetCache {
    inner: Mutex<FleetInner>,
    /// This node: its own instances come back from the control plane, but
    /// the API answers them from the local state, so their echo changes
    /// no view index.
    node: String,
    clock: Arc<IndexClock>,
    changes: watch::Sender<u64>,
    /// The last version published on `changes`, for lock-free readers.
    published: AtomicU64,
    /// Poked when a new subscription needs sending.
    pub subscribe: Notify,
    /// Questions for the control plane: how many agents applied a change
    /// (to the sync session running now, see [`FleetCache::ack_queries`]).
    ack_queries: Mutex<tokio::sync::mpsc::UnboundedSender<AckRequest>>,
    /// What the proxy has in flight to a service's instances that are not
    /// passing (set once the proxy runs), and what was last told the
    /// control plane of it, by service.
    in_flight: std::sync::OnceLock<InFlightSource>,
    reported: Mutex<HashMap<String, Vec<InFlight>>>,
    /// What the proxy sent each service since it started (set once the
    /// proxy runs), and the totals the last traffic report was taken
    /// from.
    traffic: std::sync::OnceLock<TrafficSource>,
    traffic_reported: Mutex<Option<HashMap<String, signpost_proxy::TrafficTotals>>>,
}

/// The proxy's traffic totals, by service.
pub type TrafficSource = Box<dyn Fn() -> Vec<signpost_proxy::TrafficTotals> + Send + Sync>;

/// The proxy's in-flight counts to draining instances, by service.
pub type InFlightSource =
    Box<dyn Fn() -> HashMap<String, Vec<(std::net::SocketAddr, u32)>> + Send + Sync>;

/// An [`AckQuery`] and where its answer goes.
pub struct AckRequest {
    pub query: AckQuery,
    pub reply: tokio::sync::oneshot::Sender<AckStatus>,
}

impl FleetCache {
    /// The cache of node `node`'s view, with indexes from `clock`.
    pub fn new(upstreams: &[String], node: &str, clock: Arc<IndexClock>) -> Self {
        let now = Instant::now();
        let inner = FleetInner {
            subscriptions: upstreams.iter().map(|u| (u.clone(), now)).collect(),
            ..FleetInner::default()
        };
        let (ack_queries, _) = tokio::sync::mpsc::unbounded_channel();
        FleetCache {
            inner: Mutex::new(inner),
            node: node.to_string(),
            clock,
            changes: watch::channel(0).0,
            published: AtomicU64::new(0),
            subscribe: Notify::new(),
            ack_queries: Mutex::new(ack_queries),
            in_flight: std::sync::OnceLock::new(),
            traffic: std::sync::OnceLock::new(),
            traffic_reported: Mutex::new(None),
            reported: Mutex::new(HashMap::new()),
        }
    }

    /// Where in-flight counts come from: the proxy, once it runs.
    pub fn set_traffic_source(&self, source: TrafficSource) {
        if self.traffic.set(source).is_err() {
            tracing::debug!("the traffic source was set already");
        }
    }

    /// What the proxy sent each service since the last call (the first
    /// call only takes the totals it counts from): the services that got
    /// requests, or none.
    pub fn traffic_since_last(&self) -> Vec<signpost_proto::ServiceTraffic> {
        let Some(source) = self.traffic.get() else {
            return Vec::new();
        };
        let now: HashMap<String, signpost_proxy::TrafficTotals> = source()
            .into_iter()
            .map(|t| (t.service.clone(), t))
            .collect();
        let mut last = self
            .traffic_reported
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(before) = last.replace(now.clone()) else {
            return Vec::new();
        };
        let mut out: Vec<signpost_proto::ServiceTraffic> = now
            .values()
            .filter_map(|t| {
                // A service whose backend went and came back starts over.
                let zero = signpost_proxy::TrafficTotals {
                    service: t.service.clone(),
                    requests: 0,
                    errors: 0,
                    buckets: Vec::new(),
                };
                let b = before
                    .get(&t.service)
                    .filter(|b| b.requests <= t.requests)
                    .unwrap_or(&zero);
                let requests = t.requests - b.requests;
                (requests > 0).then(|| signpost_proto::ServiceTraffic {
                    service: t.service.clone(),
                    requests,
                    errors: t.errors.saturating_sub(b.errors).min(requests),
                    duration_buckets: t
                        .buckets
                        .iter()
                        .enumerate()
                        .map(|(i, n)| n.saturating_sub(b.buckets.get(i).copied().unwrap_or(0)))
                        .collect(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.service.cmp(&b.service));
        out.truncate(signpost_proto::reported::MAX_TRAFFIC_SERVICES);
        out
    }

    pub fn set_in_flight_source(&self, source: InFlightSource) {
        if self.in_flight.set(source).is_err() {
            tracing::debug!("the in-flight source was set already");
        }
    }

    /// What the proxy has in flight to draining instances now, by
    /// service.
    fn in_flight_now(&self) -> HashMap<String, Vec<InFlight>> {
        let Some(source) = self.in_flight.get() else {
            return HashMap::new();
        };
        source()
            .into_iter()
            .map(|(service, counts)| {
                let counts = counts
                    .into_iter()
                    .map(|(addr, count)| InFlight {
                        address: addr.to_string(),
                        count,
                    })
                    .collect();
                (service, counts)
            })
            .collect()
    }

    /// What the proxy has in flight to `service`'s draining instances,
    /// recorded as told the control plane.
    pub fn in_flight_of(&self, service: &str) -> Vec<InFlight> {
        let now = self.in_flight_now().remove(service).unwrap_or_default();
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        if now.is_empty() {
            reported.remove(service);
        } else {
            reported.insert(service.to_string(), now.clone());
        }
        now
    }

    /// The services whose in-flight counts changed since they were last
    /// told the control plane (one that dropped to nothing: an empty
    /// list), recorded as told.
    pub fn in_flight_changes(&self) -> Vec<(String, Vec<InFlight>)> {
        let mut now = self.in_flight_now();
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed: Vec<(String, Vec<InFlight>)> = reported
            .keys()
            .filter(|s| !now.contains_key(*s))
            .map(|s| (s.clone(), Vec::new()))
            .collect();
        for (service, counts) in now.drain() {
            if reported.get(&service) != Some(&counts) {
                changed.push((service, counts));
            }
        }
        for (service, counts) in &changed {
            if counts.is_empty() {
                reported.remove(service);
            } else {
                reported.insert(service.clone(), counts.clone());
            }
        }
        changed
    }

    /// The queue of acknowledgement questions for the sync session to
    /// forward to the control plane; a new session takes a new one (the
    /// questions a previous one left are answered "unknown").
    pub fn ack_queries(&self) -> tokio::sync::mpsc::UnboundedReceiver<AckRequest> {
        // A new session: its control plane has heard no in-flight count.
        self.reported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *self.ack_queries.lock().unwrap_or_else(|e| e.into_inner()) = tx;
        rx
    }

    /// Asks how many agents subscribed to `service` applied its change
    /// `min_index` (0: the latest), and with `address`, what they have
    /// in flight to that instance; `None` if the sync has stopped.
    pub async fn ack_status(
        &self,
        service: &str,
        min_index: u64,
        address: &str,
    ) -> Option<AckStatus> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let (reply, answer) = tokio::sync::oneshot::channel();
        let query = AckQuery {
            query_id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            service: service.to_string(),
            min_index,
            address: address.to_string(),
        };
        self.ack_queries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(AckRequest { query, reply })
            .ok()?;
        answer.await.ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FleetInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn read<R>(&self, f: impl FnOnce(&FleetInner) -> R) -> R {
        f(&self.lock())
    }

    /// How many changes were applied (services, names, subscriptions),
    /// without taking any lock.
    pub fn version(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self, inner: &mut FleetInner) {
        inner.version += 1;
        self.published.store(inner.version, Ordering::Release);
        self.changes.send_replace(inner.version);
    }

    /// Marks `service` as used; a new one is subscribed to at once.
    pub fn touch(&self, service: &str) {
        let mut inner = self.lock();
        // The common case (every DNS lookup) allocates nothing.
        if let Some(used) = inner.subscriptions.get_mut(service) {
            *used = Instant::now();
            return;
        }
        inner
            .subscriptions
            .insert(service.to_string(), Instant::now());
        drop(inner);
        self.subscribe.notify_one();
    }

    /// Subscribes to `service` on its first use and waits up to `limit`
    /// for the control plane's snapshot, so that the first lookup already
    /// answers.
    pub async fn first_use(&self, service: &str, limit: std::time::Duration) {
        self.touch(service);
        // Known already, or cut off after contact (then the last view is the
        // answer); an agent still connecting waits for its first session too.
        let ready = |f: &FleetInner| {
            f.services.contains_key(service) || (!f.connected && f.last_contact.is_some())
        };
        if self.read(ready) {
            return;
        }
        let mut changes = self.subscribe_changes();
        let wait = async {
            while changes.changed().await.is_ok() {
                if self.read(ready) {
                    break;
                }
            }
        };
        if tokio::time::timeout(limit, wait).await.is_err() {
            tracing::debug!(
                service,
                "no snapshot from the control plane in time; answering with what is known"
            );
        }
    }

    /// Drops subscriptions unused for `idle`, except `keep`; returns them.
    pub fn expire_idle(&self, idle: std::time::Duration, keep: &[String]) -> Vec<String> {
        let mut inner = self.lock();
        let expired: Vec<String> = inner
            .subscriptions
            .iter()
            .filter(|(name, used)| used.elapsed() >= idle && !keep.contains(name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in &expired {
            inner.subscriptions.remove(name);
            inner.services.remove(name);
        }
        if !expired.is_empty() {
            self.changed(&mut inner);
        }
        expired
    }

    /// The subscriptions with the index held for each (0: none).
    pub fn subscriptions(&self) -> HashMap<String, u64> {
        let inner = self.lock();
        inner
            .subscriptions
            .keys()
            .map(|s| (s.clone(), inner.services.get(s).map_or(0, |c| c.index)))
            .collect()
    }

    pub fn set_connected(&self, connected: bool) {
        let mut inner = self.lock();
        if inner.connected != connected {
            inner.connected = connected;
            if connected {
                inner.last_contact = Some(Instant::now());
            }
            self.changed(&mut inner);
        }
    }

    /// Applies a service's snapshot or delta; returns how many of its
    /// instances were refused (each is logged).
    pub fn apply_update(&self, update: ServiceUpdate) -> usize {
        let mut inner = self.lock();
        inner.last_contact = Some(Instant::now());
        let clock = &self.clock;
        let service = inner
            .services
            .entry(update.service.clone())
            .or_insert_with(|| CachedService {
                index: 0,
                // A service seen anew (also after it was unsubscribed from)
                // never answers with an index it had before.
                view_index: clock.next(),
                instances: BTreeMap::new(),
            });
        let own = self.node.as_str();
        let remote = |key: &(String, String)| key.0 != own;
        let before = update
            .snapshot
            .then(|| std::mem::take(&mut service.instances));
        let mut changed = false;
        for removed in update.removed {
            let key = (removed.node, removed.id);
            changed |= service.instances.remove(&key).is_some() && remote(&key);
        }
        let mut refused = 0;
        for upsert in update.upserts {
            let instance = match RemoteInstance::from_wire(upsert) {
                Ok(instance) => instance,
                Err(error) => {
                    tracing::warn!(service = %update.service, %error, "instance from the control plane refused");
                    refused += 1;
                    // What it had of that instance is no longer true:
                    // never keep routing to it on stale health.
                    let key = (error.node, error.id);
                    changed |= service.instances.remove(&key).is_some() && remote(&key);
                    continue;
                }
            };
            let key = (instance.node.clone(), instance.id.clone());
            let was = service.instances.insert(key.clone(), instance);
            changed |= remote(&key) && was.as_ref() != service.instances.get(&key);
        }
        if let Some(before) = before {
            let others = before.iter().filter(|(k, _)| remote(k));
            changed = !others.eq(service.instances.iter().filter(|(k, _)| remote(k)));
        }
        if changed {
            service.view_index = clock.next();
        }
        service.index = update.index;
        self.changed(&mut inner);
        refused
    }

    pub fn apply_names(&self, mut names: ServiceNames) {
        let mut inner = self.lock();
        inner.last_contact = Some(Instant::now());
        // A warming-up control plane's names add to what is known.
        if names.partial
            && let Some(known) = &inner.names
        {
            for (name, tags) in &known.services {
                names
                    .services
                    .entry(name.clone())
                    .or_insert_with(|| tags.clone());
            }
        }
        if inner
            .names
            .as_ref()
            .is_none_or(|n| n.services != names.services)
        {
            inner.names_index = self.clock.next();
        }
        inner.names = Some(names);
        self.changed(&mut inner);
    }

    pub fn contact(&self) {
        self.lock().last_contact = Some(Instant::now());
    }

    /// A control plane said hello: indexes from another epoch (it
    /// restarted) cannot be resumed from, so they are forgotten (the
    /// instances stay until its snapshots replace them).
    pub fn welcome(&self, epoch: &str) {
        let mut inner = self.lock();
        inner.last_contact = Some(Instant::now());
        if inner.epoch != epoch {
            inner.epoch = epoch.to_string();
            for service in inner.services.values_mut() {
                service.index = 0;
            }
        }
    }

    /// What is kept on disk.
    pub fn snapshot(&self) -> FleetSnapshot {
        let inner = self.lock();
        FleetSnapshot {
            epoch: inner.epoch.clone(),
            services: inner
                .services
                .iter()
                .map(|(name, s)| ServiceUpdate {
                    service: name.clone(),
                    index: s.index,
                    snapshot: true,
                    upserts: s.instances.values().map(RemoteInstance::to_wire).collect(),
                    removed: Vec::new(),
                })
                .collect(),
            names: inner.names.clone(),
            commands: inner
                .commands
                .iter()
                .filter_map(|c| serde_json::to_string(c).ok())
                .collect(),
        }
    }

    /// Replaces the operator commands with the control plane's set;
    /// returns the ids taken. A command that cannot be read is reported
    /// and left out.
    pub fn set_commands(&self, json: &[String]) -> Vec<String> {
        let commands = parse_commands(json);
        let ids = commands.iter().map(|c| c.id.clone()).collect();
        let mut inner = self.lock();
        inner.commands = commands;
        self.changed(&mut inner);
        ids
    }

    /// Loads what a previous run kept on disk; the services in it are
    /// subscribed to again.
    pub fn restore(&self, snapshot: FleetSnapshot) {
        {
            let mut inner = self.lock();
            inner.epoch = snapshot.epoch;
            inner.names = snapshot.names;
            inner.commands = parse_commands(&snapshot.commands);
            let now = Instant::now();
            for update in &snapshot.services {
                inner
                    .subscriptions
                    .entry(update.service.clone())
                    .or_insert(now);
            }
            self.changed(&mut inner);
        }
        for update in snapshot.services {
            self.apply_update(update);
        }
        // Restored knowledge is not contact with the control plane.
        self.lock().last_contact = None;
    }
}

fn parse_commands(json: &[String]) -> Vec<Command> {
    json.iter()
        .filter_map(|text| match serde_json::from_str::<Command>(text) {
            Ok(command) => Some(command),
            Err(error) => {
                tracing::error!(%error, "unreadable operator command ignored");
                None
            }
        })
        .collect()
}

/// The file the fleet view is kept in.
pub(crate) fn cache_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("fleet.pb")
}

/// Loads the kept view, if any; a corrupt file is reported, set aside and
/// not used.
pub(crate) fn load(fleet: &FleetCache, data_dir: &std::path::Path) {
    use prost::Message as _;
    let path = cache_path(data_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot read the fleet cache; starting without it");
            return;
        }
    };
    match FleetSnapshot::decode(bytes.as_slice()) {
        Ok(snapshot) => {
            tracing::info!(path = %path.display(), services = snapshot.services.len(), "fleet view restored from disk");
            fleet.restore(snapshot);
        }
        Err(e) => match signpost_daemon::fs::move_aside(&path) {
            Ok(aside) => {
                tracing::error!(path = %path.display(), aside = %aside.display(), error = %e, "fleet cache is corrupt; kept aside, starting without it")
            }
            Err(moved) => {
                tracing::error!(path = %path.display(), error = %e, cannot_move = %moved, "fleet cache is corrupt; starting without it")
            }
        },
    }
}

/// Writes the view to disk after each change (coalesced), and at shutdown.
pub(crate) async fn keep(
    fleet: std::sync::Arc<FleetCache>,
    agent: std::sync::Arc<crate::agent::Agent>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut changes = fleet.subscribe_changes();
    let path = cache_path(&agent.config.data_dir);
    let coalesce = std::time::Duration::from_millis(200);
    while signpost_daemon::fs::next_write(&mut changes, coalesce, &shutdown).await {
        let (f, p) = (fleet.clone(), path.clone());
        if let Err(e) = tokio::task::spawn_blocking(move || write_cache(&f, &p)).await {
            tracing::error!(error = %e, "fleet cache writer failed");
        }
    }
    // After a handover the file is the new process's.
    if !agent.handed_over() {
        write_cache(&fleet, &path);
    }
}

/// Writes the view now (for a process taking over).
pub(crate) fn save(fleet: &FleetCache, data_dir: &std::path::Path) {
    write_cache(fleet, &cache_path(data_dir));
}

fn write_cache(fleet: &FleetCache, path: &std::path::Path) {
    use prost::Message as _;
    let bytes = fleet.snapshot().encode_to_vec();
    if let Err(e) = signpost_daemon::fs::write_atomic(path, &bytes) {
        tracing::error!(path = %path.display(), error = %e, "cannot write the fleet cache");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signpost_proto::{CatalogInstance, Check, Instance, InstanceRef};

    fn cache() -> FleetCache {
        let clock = Arc::new(IndexClock::default());
        FleetCache::new(&[], "here", clock)
    }

    /// An instance with one check, its status as text (as an earlier
    /// version of the control plane sends it).
    fn on(node: &str, id: &str, status: &str) -> CatalogInstance {
        CatalogInstance {
            node: node.to_string(),
            instance: Some(Instance {
                id: id.to_string(),
                name: "web".to_string(),
                checks: vec![Check {
                    id: format!("service:{id}"),
                    status_text: status.to_string(),
                    ..Check::default()
                }],
                ..Instance::default()
            }),
            ..CatalogInstance::default()
        }
    }

    fn update(index: u64, snapshot: bool, upserts: Vec<CatalogInstance>) -> ServiceUpdate {
        ServiceUpdate {
            service: "web".to_string(),
            index,
            snapshot,
            upserts,
            removed: Vec::new(),
        }
    }

    fn view_index(fleet: &FleetCache) -> u64 {
        fleet.read(|f| f.services["web"].view_index)
    }

    #[test]
    fn the_view_index_moves_once_per_change_of_other_nodes_instances() {
        let fleet = cache();
        // Subscribed before any instance exists: an empty snapshot.
        fleet.apply_update(update(1, true, Vec::new()));
        let empty = view_index(&fleet);
        // The first instance, on another node, even with the control
        // plane's index unchanged.
        fleet.apply_update(update(1, false, vec![on("a", "web-a", "passing")]));
        let first = view_index(&fleet);
        assert!(first > empty);
        // This node's own instance coming back changes nothing shown.
        fleet.apply_update(update(2, false, vec![on("here", "web-h", "passing")]));
        assert_eq!(view_index(&fleet), first);
        // The same instance again (a node-level resend) changes nothing.
        fleet.apply_update(update(3, false, vec![on("a", "web-a", "passing")]));
        assert_eq!(view_index(&fleet), first);
        // A health flip does.
        fleet.apply_update(update(4, false, vec![on("a", "web-a", "critical")]));
        let flipped = view_index(&fleet);
        assert!(flipped > first);
        // A reconnect's snapshot of the same content (the control plane
        // restarted: its indexes start over) changes nothing...
        fleet.welcome("another epoch");
        fleet.apply_update(update(
            2,
            true,
            vec![on("a", "web-a", "critical"), on("here", "web-h", "passing")],
        ));
        assert_eq!(view_index(&fleet), flipped);
        // ...and a removal does.
        let mut gone = update(3, false, Vec::new());
        gone.removed.push(InstanceRef {
            node: "a".to_string(),
            id: "web-a".to_string(),
        });
        fleet.apply_update(gone);
        assert!(view_index(&fleet) > flipped);
    }

    #[test]
    fn instances_that_fail_the_checks_are_refused_and_counted() {
        let fleet = cache();
        let mut no_status = on("b", "web-b", "fine");
        no_status.node = "b".to_string();
        let refused = fleet.apply_update(update(
            1,
            true,
            vec![on("a", "web-a", "warning"), no_status],
        ));
        assert_eq!(refused, 1);
        let kept: Vec<_> = fleet.read(|f| {
            f.services["web"]
                .instances
                .values()
                .map(|r| (r.node.clone(), r.health))
                .collect()
        });
        assert_eq!(
            kept,
            [("a".to_string(), signpost_core::model::Health::Warning)]
        );
        // A later report of web-a that cannot be read takes it out rather
        // than leaving its last health in place.
        let before = view_index(&fleet);
        assert_eq!(
            fleet.apply_update(update(2, false, vec![on("a", "web-a", "fine")])),
            1
        );
        assert!(fleet.read(|f| f.services["web"].instances.is_empty()));
        assert!(view_index(&fleet) > before);
        fleet.apply_update(update(3, false, vec![on("a", "web-a", "warning")]));
        // What is kept on disk reads back the same.
        let restored = cache();
        restored.restore(fleet.snapshot());
        let same = restored.read(|f| f.services["web"].instances.clone());
        assert_eq!(same, fleet.read(|f| f.services["web"].instances.clone()));
    }

    #[test]
    fn a_service_seen_anew_never_reuses_an_index() {
        let fleet = cache();
        fleet.apply_update(update(5, true, vec![on("a", "web-a", "passing")]));
        let before = view_index(&fleet);
        fleet.touch("web");
        assert_eq!(
            fleet.expire_idle(std::time::Duration::ZERO, &[]),
            vec!["web"]
        );
        fleet.apply_update(update(5, true, vec![on("a", "web-a", "passing")]));
        assert!(view_index(&fleet) > before);
    }

    #[test]
    fn the_names_index_moves_when_the_names_change() {
        let fleet = cache();
        let names = |list: &[&str], index: u64| ServiceNames {
            index,
            services: list
                .iter()
                .map(|n| (n.to_string(), Default::default()))
                .collect(),
            partial: false,
        };
        fleet.apply_names(names(&["web"], 7));
        let first = fleet.read(|f| f.names_index);
        fleet.apply_names(names(&["web"], 2));
        assert_eq!(fleet.read(|f| f.names_index), first);
        fleet.apply_names(names(&["web", "db"], 3));
        assert!(fleet.read(|f| f.names_index) > first);

        // A warming-up control plane's partial list adds to the names.
        let known = |fleet: &FleetCache| {
            fleet.read(|f| {
                f.names
                    .as_ref()
                    .unwrap()
                    .services
                    .keys()
                    .cloned()
                    .collect::<std::collections::BTreeSet<_>>()
            })
        };
        fleet.apply_names(ServiceNames {
            partial: true,
            ..names(&["api"], 4)
        });
        assert_eq!(known(&fleet), ["api", "db", "web"].map(String::from).into());
        fleet.apply_names(names(&["api"], 5));
        assert_eq!(
            known(&fleet),
            ["api"].map(String::from).into(),
            "a whole list replaces them"
        );
    }
}
