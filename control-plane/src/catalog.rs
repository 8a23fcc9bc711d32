//! The fleet catalog: every agent's instances, the sessions subscribed to
//! each service, and the fan-out of changes to exactly those sessions.
//!
//! One lock guards it; sending to a session is a non-blocking `try_send`
//! on its bounded queue, so no I/O happens under the lock. A session whose
//! queue is full is too slow to follow: it is dropped, and its agent
//! reconnects and resynchronises from the indexes it has.
//!
//! Here: the data (nodes, their instances and checks, indexes, service
//! names) and how an agent's report changes it. `fanout`: sessions, their
//! subscriptions, snapshots and deltas to subscribers only, acks.
//! `liveness`: whether each node is alive, unreachable or failed, the
//! peer probes that decide it, and the reaper.

mod drains;
mod fanout;
mod liveness;
mod shared;
#[cfg(test)]
mod test_agent;
mod traffic;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use signpost_proto::{
    AckQuery, AckStatus, CatalogInstance, CatalogSnapshot, Check, ControlMessage, Delta, FullState,
    Hello, Instance, InstanceRef, NodeInFlight, NodeSnapshot, ServiceNames, ServiceUpdate, Tags,
    control_message::Body,
};
use tokio::sync::{mpsc, watch};

pub use self::drains::{ASK_HOLD, DrainAnswer, DrainWork, NodeAck};
use self::liveness::PendingProbe;
pub use self::liveness::{
    Liveness, NodeStatus, PeerAnswer, ProbeRound, ProbeVerdict, liveness_check,
};
pub use self::shared::Decision;
use self::shared::SharedState;
pub use self::traffic::TrafficSummary;

pub type SessionId = u64;

/// Messages a session may queue before it counts as too slow.
pub const SESSION_QUEUE: usize = 4096;
pub struct NodeEntry {
    pub hello: Hello,
    pub instances: BTreeMap<String, Instance>,
    pub node_checks: Vec<Check>,
    pub session: Option<SessionId>,
    pub liveness: Liveness,
    /// When this replica last had its agent's stream (none: it has it,
    /// or never had).
    pub last_contact: Option<std::time::SystemTime>,
    /// When each of its checks last changed status (Unix ms), as this
    /// control plane learned of it; by check ID.
    pub check_changed: HashMap<String, u64>,
}

struct Session {
    node: String,
    tx: mpsc::Sender<ControlMessage>,
    subscriptions: HashSet<String>,
    /// The index of each service this session's agent applied.
    acked: HashMap<String, u64>,
    /// What its proxy has in flight to each service's instances that are
    /// not passing (being drained), as it last said.
    in_flight: HashMap<String, Vec<signpost_proto::InFlight>>,
}

pub struct Inner {
    pub index: u64,
    pub nodes: BTreeMap<String, NodeEntry>,
    service_index: HashMap<String, u64>,
    subscribers: HashMap<String, HashSet<SessionId>>,
    sessions: HashMap<SessionId, Session>,
    names: BTreeMap<String, BTreeSet<String>>,
    next_session: SessionId,
    probes: HashMap<u64, PendingProbe>,
    next_probe: u64,
    /// Each node's last concluded probe round: who was asked, what they
    /// saw.
    pub last_probes: HashMap<String, ProbeRound>,
    /// Until when a control plane that started without its catalog waits
    /// for agents to report ([`Catalog::warm_up`]).
    warm_up_until: Option<Instant>,
    /// Set when replicas share a store: what the store says of each node,
    /// and the decisions this replica took for the store to record.
    shared: Option<SharedState>,
    /// Each service's protocol from its `service-defaults` config entry:
    /// the protocol of its instances that were registered without one
    /// (TCP, the default).
    protocols: HashMap<String, i32>,
    /// The index of the change being published (the store's revision);
    /// without one, the next index is the last plus one.
    revision: Option<u64>,
    stats: CatalogStats,
}

impl Inner {
    /// Agents with a stream open now.
    pub fn connected(&self) -> usize {
        self.sessions.len()
    }

    /// Agents subscribed to `service` now.
    pub fn subscribers(&self, service: &str) -> usize {
        self.subscribers.get(service).map_or(0, HashSet::len)
    }

    /// On a shared store, the replica that holds `node`'s agent's stream.
    pub fn holder_of(&self, node: &str) -> Option<&str> {
        self.shared.as_ref().and_then(|s| s.drains.holder(node))
    }

    /// The deepest queue of messages waiting for an agent now.
    pub fn queue_depth_max(&self) -> usize {
        self.sessions
            .values()
            .map(|s| SESSION_QUEUE.saturating_sub(s.tx.capacity()))
            .max()
            .unwrap_or(0)
    }

    /// The nodes of the agents subscribed to `service` now, sorted.
    pub fn subscriber_nodes(&self, service: &str) -> Vec<String> {
        let mut nodes: Vec<String> = self
            .subscribers
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|id| self.sessions.get(id).map(|s| s.node.clone()))
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        nodes
    }
}

pub struct Catalog {
    inner: Mutex<Inner>,
    /// Bumped on every change worth keeping on disk.
    changes: watch::Sender<u64>,
    /// What agents' proxies send each service (for the console).
    traffic: traffic::TrafficReports,
}

/// What the catalog counts as it works, for the metrics.
#[derive(Clone)]
pub struct CatalogStats {
    /// How long queueing one change for every subscriber of its services
    /// took.
    pub fanout_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Sessions dropped because their agent could not keep up.
    pub sessions_dropped: prometheus_client::metrics::counter::Counter,
    /// Peer probes of unreachable nodes, by verdict.
    pub probes: prometheus_client::metrics::family::Family<
        crate::metrics::OutcomeLabels,
        prometheus_client::metrics::counter::Counter,
    >,
}

impl Default for CatalogStats {
    fn default() -> Self {
        CatalogStats {
            fanout_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.000_01, 4.0, 12),
            ),
            sessions_dropped: Default::default(),
            probes: Default::default(),
        }
    }
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog {
            // Index 1 is what a service nobody registered has: the first
            // change of anything must be above it.
            inner: Mutex::new(Inner {
                index: 1,
                nodes: BTreeMap::new(),
                service_index: HashMap::new(),
                subscribers: HashMap::new(),
                sessions: HashMap::new(),
                names: BTreeMap::new(),
                warm_up_until: None,
                next_session: 0,
                probes: HashMap::new(),
                next_probe: 0,
                last_probes: HashMap::new(),
                shared: None,
                revision: None,
                stats: CatalogStats::default(),
                protocols: HashMap::new(),
            }),
            changes: watch::channel(0).0,
            traffic: Default::default(),
        }
    }
}

/// What one change does to one service.
#[derive(Default)]
struct ServiceChange {
    upserts: Vec<CatalogInstance>,
    removed: Vec<InstanceRef>,
    /// The ids of the node's instances to send as upserts.
    changed: BTreeSet<String>,
}

impl Catalog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn read<R>(&self, f: impl FnOnce(&Inner) -> R) -> R {
        f(&self.lock())
    }

    /// What the catalog counts, to register with the metrics.
    pub fn stats(&self) -> CatalogStats {
        self.lock().stats.clone()
    }

    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    /// What is kept on disk: every node with its instances.
    pub fn snapshot(&self) -> CatalogSnapshot {
        let inner = self.lock();
        CatalogSnapshot {
            nodes: inner
                .nodes
                .values()
                .map(|n| NodeSnapshot {
                    hello: Some(n.hello.clone()),
                    instances: n.instances.values().cloned().collect(),
                    node_checks: n.node_checks.clone(),
                    failed_at_unix_ms: n.liveness.failed_at_unix_ms(),
                })
                .collect(),
        }
    }

    /// Loads a kept catalog at start: a failed node stays failed; every
    /// other node is unreachable, its instances routable, until its agent
    /// reconnects, or is probed like any dropped node once `grace` has
    /// passed without it.
    pub fn restore(&self, snapshot: CatalogSnapshot, grace: Duration) {
        self.restore_at(snapshot, Instant::now(), grace);
    }

    fn restore_at(&self, snapshot: CatalogSnapshot, now: Instant, grace: Duration) {
        let mut inner = self.lock();
        for node in snapshot.nodes {
            let Some(hello) = node.hello else { continue };
            let external = hello.external;
            inner.nodes.insert(
                hello.node.clone(),
                NodeEntry {
                    hello,
                    // Kept by an earlier version: statuses and
                    // protocols as text only.
                    instances: node
                        .instances
                        .into_iter()
                        .map(|mut i| {
                            i.normalize();
                            (i.id.clone(), i)
                        })
                        .collect(),
                    node_checks: node
                        .node_checks
                        .into_iter()
                        .map(|mut c| {
                            c.normalize();
                            c
                        })
                        .collect(),
                    session: None,
                    liveness: if external {
                        Liveness::alive()
                    } else {
                        Liveness::restored(node.failed_at_unix_ms, now, grace)
                    },
                    last_contact: None,
                    check_changed: HashMap::new(),
                },
            );
        }
        inner.names = inner.compute_names();
    }

    /// Started without a kept catalog: for `window`, what agents are sent
    /// is added to what they know rather than replacing it (snapshots go
    /// out as deltas, names as partial), so that consumers keep the
    /// instances of providers that have not reconnected yet. Once the
    /// window ends every subscriber gets real snapshots: what no agent
    /// reported by then is gone.
    pub fn warm_up(&self, window: Duration) {
        self.lock().warm_up_until = Some(Instant::now() + window);
    }

    /// How much of the warm-up window is left, if any.
    pub fn warming_up(&self) -> Option<Duration> {
        let until = self.lock().warm_up_until?;
        Some(until.saturating_duration_since(Instant::now()))
    }

    /// Sets an external node (`/v1/catalog/register`, no agent) to
    /// `record`, or removes it (`None`), on a catalog of its own (on a
    /// shared store the record goes to the store and comes back through
    /// [`Catalog::store_node`]).
    pub fn put_external(&self, node: &str, record: Option<NodeSnapshot>) {
        let mut inner = self.lock();
        let record = record.and_then(|r| r.hello.map(|h| (h, r.instances, r.node_checks)));
        inner.set_record(node, record, |_, _| Liveness::alive());
        drop(inner);
        self.changed();
    }

    /// Applies the `service-defaults` protocols (see [`Inner::set_protocols`]).
    pub fn set_protocols(&self, protocols: HashMap<String, i32>) {
        self.lock().set_protocols(protocols);
        self.changed();
    }

    /// Opens a session for the agent that said `hello`; a previous session
    /// of the same node is closed.
    pub fn connect(&self, hello: Hello, tx: mpsc::Sender<ControlMessage>) -> SessionId {
        let mut inner = self.lock();
        inner.next_session += 1;
        let id = inner.next_session;
        let node = hello.node.clone();
        let mut was_failed = false;
        let previous = match inner.nodes.get_mut(&node) {
            Some(entry) => {
                entry.hello = hello;
                was_failed = entry.liveness.status == NodeStatus::Failed;
                entry.liveness = Liveness::alive();
                entry.session.replace(id)
            }
            None => {
                inner.nodes.insert(
                    node.clone(),
                    NodeEntry {
                        hello,
                        instances: BTreeMap::new(),
                        node_checks: Vec::new(),
                        session: Some(id),
                        liveness: Liveness::alive(),
                        last_contact: None,
                        check_changed: HashMap::new(),
                    },
                );
                None
            }
        };
        if let Some(previous) = previous {
            inner.drop_session(previous);
        }
        inner.sessions.insert(
            id,
            Session {
                node: node.clone(),
                tx,
                subscriptions: HashSet::new(),
                acked: HashMap::new(),
                in_flight: HashMap::new(),
            },
        );
        let names = inner.names_message();
        inner.send(id, names);
        if was_failed {
            tracing::info!(node = %node, "failed node is back");
            inner.node_changed(&node);
        }
        drop(inner);
        self.changed();
        id
    }

    /// The agent's whole local state: replaces what the catalog had.
    pub fn full_state(&self, session: SessionId, state: FullState) {
        let mut inner = self.lock();
        let Some(node) = inner.sessions.get(&session).map(|s| s.node.clone()) else {
            return;
        };
        let removed: Vec<String> = inner
            .nodes
            .get(&node)
            .map(|n| {
                n.instances
                    .keys()
                    .filter(|id| !state.instances.iter().any(|i| &i.id == *id))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        inner.apply(
            &node,
            Delta {
                upserts: state.instances,
                removed,
                node_checks_changed: true,
                node_checks: state.node_checks,
            },
        );
        drop(inner);
        self.changed();
    }

    pub fn delta(&self, session: SessionId, delta: Delta) {
        let mut inner = self.lock();
        let Some(node) = inner.sessions.get(&session).map(|s| s.node.clone()) else {
            return;
        };
        inner.apply(&node, delta);
        drop(inner);
        self.changed();
    }
}

// === impl Inner ===

impl Inner {
    fn catalog_instance(
        protocols: &HashMap<String, i32>,
        entry: &NodeEntry,
        instance: &Instance,
    ) -> CatalogInstance {
        let mut instance = instance.clone();
        if let Some(protocol) = protocols.get(&instance.name)
            && matches!(
                instance.proxy_protocol(),
                None | Some(signpost_core::model::Protocol::Tcp)
            )
        {
            instance.protocol = *protocol;
            instance.protocol_text = String::new();
        }
        CatalogInstance {
            node: entry.hello.node.clone(),
            node_id: entry.hello.node_id.clone(),
            node_address: entry.hello.address.clone(),
            node_zone: entry.hello.zone.clone(),
            node_checks: std::iter::once(liveness_check(entry))
                .chain(entry.node_checks.iter().cloned())
                .collect(),
            instance: Some(instance),
            node_inbound: entry.hello.inbound_address.clone(),
        }
    }

    /// Sets every service's protocol from the `service-defaults` config
    /// entries; the instances of a service whose protocol changed go to
    /// its subscribers again.
    pub(crate) fn set_protocols(&mut self, protocols: HashMap<String, i32>) {
        let changed: Vec<String> = protocols
            .iter()
            .filter(|(name, p)| self.protocols.get(*name) != Some(*p))
            .map(|(name, _)| name.clone())
            .chain(
                self.protocols
                    .keys()
                    .filter(|name| !protocols.contains_key(*name))
                    .cloned(),
            )
            .collect();
        self.protocols = protocols;
        let mut changes: BTreeMap<String, ServiceChange> = BTreeMap::new();
        for service in changed {
            let upserts: Vec<CatalogInstance> = self
                .instances_of(&service)
                .map(|(n, i)| Self::catalog_instance(&self.protocols, n, i))
                .collect();
            if !upserts.is_empty() {
                changes.entry(service).or_default().upserts = upserts;
            }
        }
        if !changes.is_empty() {
            self.publish(changes);
        }
    }

    /// Sets `node` to what its record says (its Hello, instances and
    /// node checks), a new node with the liveness `new` gives it; `None`
    /// removes it with its instances.
    pub(crate) fn set_record(
        &mut self,
        node: &str,
        record: Option<(Hello, Vec<Instance>, Vec<Check>)>,
        new: impl FnOnce(&Inner, &Hello) -> Liveness,
    ) {
        match record {
            Some((hello, instances, node_checks)) => {
                if !self.nodes.contains_key(node) {
                    let liveness = new(self, &hello);
                    self.nodes.insert(
                        node.to_string(),
                        NodeEntry {
                            hello: hello.clone(),
                            instances: BTreeMap::new(),
                            node_checks: Vec::new(),
                            session: None,
                            liveness,
                            last_contact: None,
                            check_changed: HashMap::new(),
                        },
                    );
                }
                let removed = self.nodes.get(node).map_or_else(Vec::new, |n| {
                    n.instances
                        .keys()
                        .filter(|id| !instances.iter().any(|i| &i.id == *id))
                        .cloned()
                        .collect()
                });
                let hello_changed = self.nodes.get_mut(node).is_some_and(|n| {
                    let changed = n.hello != hello;
                    n.hello = hello;
                    changed
                });
                self.apply(
                    node,
                    Delta {
                        upserts: instances,
                        removed,
                        node_checks_changed: true,
                        node_checks,
                    },
                );
                // The node's address or zone is part of every instance.
                if hello_changed {
                    self.node_changed(node);
                }
            }
            None => {
                let ids: Vec<String> = self
                    .nodes
                    .get(node)
                    .map(|n| n.instances.keys().cloned().collect())
                    .unwrap_or_default();
                self.apply(
                    node,
                    Delta {
                        removed: ids,
                        ..Delta::default()
                    },
                );
                self.nodes.remove(node);
            }
        }
    }

    /// Sends every instance of `node` again (its liveness changed).
    fn node_changed(&mut self, node: &str) {
        let Some(entry) = self.nodes.get(node).filter(|n| !n.instances.is_empty()) else {
            return;
        };
        let mut changes: BTreeMap<String, ServiceChange> = BTreeMap::new();
        for instance in entry.instances.values() {
            changes
                .entry(instance.name.clone())
                .or_default()
                .upserts
                .push(Self::catalog_instance(&self.protocols, entry, instance));
        }
        self.publish(changes);
    }

    /// Every instance of `service` in the fleet.
    pub fn instances_of<'a>(
        &'a self,
        service: &'a str,
    ) -> impl Iterator<Item = (&'a NodeEntry, &'a Instance)> {
        self.nodes.values().flat_map(move |n| {
            n.instances
                .values()
                .filter(move |i| i.name == service)
                .map(move |i| (n, i))
        })
    }

    pub fn service_index(&self, service: &str) -> u64 {
        self.service_index.get(service).copied().unwrap_or(1)
    }

    /// Ends the warm-up if its window is over at `now`: every session gets
    /// the whole names list and a real snapshot of each of its services.
    pub(crate) fn end_warm_up(&mut self, now: Instant) {
        if self.warm_up_until.is_none_or(|until| until > now) {
            return;
        }
        self.warm_up_until = None;
        tracing::info!(
            nodes = self.nodes.len(),
            "warm-up over: agents now get the catalog as reported"
        );
        let names = self.names_message();
        let sessions: Vec<(SessionId, Vec<String>)> = self
            .sessions
            .iter()
            .map(|(id, s)| (*id, s.subscriptions.iter().cloned().collect()))
            .collect();
        for (session, services) in sessions {
            self.send(session, names.clone());
            for service in services {
                let snapshot = self.snapshot(&service);
                self.send(session, snapshot);
            }
        }
    }

    /// Applies one node's changes and sends each affected service's delta
    /// to its subscribers (and the name list to everyone if it changed).
    fn apply(&mut self, node: &str, delta: Delta) {
        let Some(entry) = self.nodes.get_mut(node) else {
            return;
        };
        let mut changes: BTreeMap<String, ServiceChange> = BTreeMap::new();
        for id in &delta.removed {
            if let Some(old) = entry.instances.remove(id) {
                changes
                    .entry(old.name.clone())
                    .or_default()
                    .removed
                    .push(InstanceRef {
                        node: node.to_string(),
                        id: id.clone(),
                    });
            }
        }
        for instance in delta.upserts {
            if entry.instances.get(&instance.id) == Some(&instance) {
                continue;
            }
            if let Some(old) = entry.instances.get(&instance.id)
                && old.name != instance.name
            {
                changes
                    .entry(old.name.clone())
                    .or_default()
                    .removed
                    .push(InstanceRef {
                        node: node.to_string(),
                        id: instance.id.clone(),
                    });
            }
            changes
                .entry(instance.name.clone())
                .or_default()
                .changed
                .insert(instance.id.clone());
            let before = entry
                .instances
                .get(&instance.id)
                .map(|i| i.checks.as_slice());
            note_check_changes(&mut entry.check_changed, before, &instance.checks);
            entry.instances.insert(instance.id.clone(), instance);
        }
        if delta.node_checks_changed && entry.node_checks != delta.node_checks {
            note_check_changes(
                &mut entry.check_changed,
                Some(&entry.node_checks),
                &delta.node_checks,
            );
            entry.node_checks = delta.node_checks;
            // Node checks are part of every instance's health.
            for instance in entry.instances.values() {
                changes
                    .entry(instance.name.clone())
                    .or_default()
                    .changed
                    .insert(instance.id.clone());
            }
        }
        if changes.is_empty() {
            return;
        }
        // Upserts carry the changed instances as stored now (with the
        // node's checks); the node's others are unchanged.
        let entry = &self.nodes[node];
        for change in changes.values_mut() {
            change.upserts = change
                .changed
                .iter()
                .filter_map(|id| entry.instances.get(id))
                .map(|i| Self::catalog_instance(&self.protocols, entry, i))
                .collect();
        }
        // Names first: an agent that sees a new service's instances already
        // lists the service.
        let names = self.compute_names();
        if names != self.names {
            self.names = names;
            let message = self.names_message();
            let sessions: Vec<SessionId> = self.sessions.keys().copied().collect();
            for session in sessions {
                self.send(session, message.clone());
            }
        }
        self.publish(changes);
    }

    fn compute_names(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for node in self.nodes.values() {
            for instance in node.instances.values() {
                names
                    .entry(instance.name.clone())
                    .or_default()
                    .extend(instance.tags.iter().cloned());
            }
        }
        names
    }

    pub fn names(&self) -> &BTreeMap<String, BTreeSet<String>> {
        &self.names
    }
}

/// Most check status changes remembered per node (its checks' last ones).
const MAX_CHECK_CHANGES: usize = 1024;

/// Notes when each check in `now` changed status (or appeared) since
/// `before`, for the console's "last change" (as this control plane
/// learned of it).
fn note_check_changes(changed: &mut HashMap<String, u64>, before: Option<&[Check]>, now: &[Check]) {
    let at = signpost_core::command::now_millis();
    for check in now {
        let was = before
            .and_then(|b| b.iter().find(|c| c.id == check.id))
            .map(Check::health);
        if was != Some(check.health()) {
            if changed.len() >= MAX_CHECK_CHANGES && !changed.contains_key(&check.id) {
                continue;
            }
            changed.insert(check.id.clone(), at);
        }
    }
}

#[cfg(test)]
mod tests {
    use signpost_core::model::Health;

    use super::*;

    fn check(id: &str, health: Health) -> Check {
        let mut c = Check {
            id: id.to_string(),
            ..Check::default()
        };
        c.set_health(health);
        c
    }

    #[test]
    fn a_check_changes_when_its_status_does_not_when_only_its_output_does() {
        let mut changed = HashMap::new();
        let first = vec![check("a", Health::Passing), check("b", Health::Passing)];
        note_check_changes(&mut changed, None, &first);
        assert_eq!(changed.len(), 2, "new checks");
        changed.clear();
        let mut same = first.clone();
        same[0].output = "still fine".to_string();
        note_check_changes(&mut changed, Some(&first), &same);
        assert!(changed.is_empty(), "output alone is no change: {changed:?}");
        let failing = vec![check("a", Health::Critical), check("b", Health::Passing)];
        note_check_changes(&mut changed, Some(&first), &failing);
        assert_eq!(changed.keys().collect::<Vec<_>>(), ["a"]);
    }
}
