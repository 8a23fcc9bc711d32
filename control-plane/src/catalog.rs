//! The fleet catalog: every agent's instances, the sessions subscribed to
//! each service, and the fan-out of changes to exactly those sessions.
//!
//! One lock guards it; sending to a session is a non-blocking `try_send`
//! on its bounded queue, so no I/O happens under the lock. A session whose
//! queue is full is too slow to follow: it is dropped, and its agent
//! reconnects and resynchronises from the indexes it has.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Mutex;

use signpost_core::proto::{
    AckQuery, AckStatus, CatalogInstance, CatalogSnapshot, Check, ControlMessage, Delta, FullState,
    Hello, Instance, InstanceRef, NodeSnapshot, ProbeRequest, ServiceNames, ServiceUpdate, Tags,
    control_message::Body,
};
use tokio::sync::{mpsc, watch};

pub type SessionId = u64;

/// Messages a session may queue before it counts as too slow.
pub const SESSION_QUEUE: usize = 4096;
/// Peers asked to probe a node whose stream dropped.
const PROBE_PEERS: usize = 3;

/// A node's liveness as Consul's `serfHealth` check.
pub fn liveness(node: &NodeEntry) -> Check {
    let (status, output) = match node.status {
        NodeStatus::Alive => ("passing", "Agent alive and reachable"),
        NodeStatus::Unreachable => (
            "passing",
            "Agent stream to the control plane dropped; peers can reach it or are being asked",
        ),
        NodeStatus::Failed => (
            "critical",
            "Agent not reachable by the control plane nor by its peers",
        ),
    };
    Check {
        id: "serfHealth".to_string(),
        name: "Serf Health Status".to_string(),
        status: status.to_string(),
        output: output.to_string(),
        notes: String::new(),
        r#type: String::new(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeStatus {
    /// Its agent holds a session.
    Alive,
    /// Its agent's session dropped; its instances stay routable.
    Unreachable,
    /// No peer could reach it either: its instances are critical.
    Failed,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Alive => "alive",
            NodeStatus::Unreachable => "unreachable",
            NodeStatus::Failed => "failed",
        }
    }
}

pub struct NodeEntry {
    pub hello: Hello,
    pub instances: BTreeMap<String, Instance>,
    pub node_checks: Vec<Check>,
    pub session: Option<SessionId>,
    pub status: NodeStatus,
    pub failed_at: Option<std::time::Instant>,
}

/// A question to peers about an unreachable node.
struct PendingProbe {
    node: String,
    outstanding: usize,
}

/// How a probe round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeVerdict {
    /// A peer reached it: the control plane is what is cut off.
    Reachable,
    /// Nobody reached it: the node failed.
    Failed,
}

struct Session {
    node: String,
    tx: mpsc::Sender<ControlMessage>,
    subscriptions: HashSet<String>,
    /// The index of each service this session's agent applied.
    acked: HashMap<String, u64>,
}

#[derive(Default)]
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
}

pub struct Catalog {
    inner: Mutex<Inner>,
    /// Bumped on every change worth keeping on disk.
    changes: watch::Sender<u64>,
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog {
            inner: Mutex::new(Inner::default()),
            changes: watch::channel(0).0,
        }
    }
}

/// What one change does to one service.
#[derive(Default)]
struct ServiceChange {
    upserts: Vec<CatalogInstance>,
    removed: Vec<InstanceRef>,
}

impl Catalog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn read<R>(&self, f: impl FnOnce(&Inner) -> R) -> R {
        f(&self.lock())
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
                })
                .collect(),
        }
    }

    /// Loads a kept catalog at start: every node is unreachable until its
    /// agent reconnects, and its instances stay routable meanwhile.
    pub fn restore(&self, snapshot: CatalogSnapshot) {
        let mut inner = self.lock();
        for node in snapshot.nodes {
            let Some(hello) = node.hello else { continue };
            inner.nodes.insert(
                hello.node.clone(),
                NodeEntry {
                    hello,
                    instances: node
                        .instances
                        .into_iter()
                        .map(|i| (i.id.clone(), i))
                        .collect(),
                    node_checks: node.node_checks,
                    session: None,
                    status: NodeStatus::Unreachable,
                    failed_at: None,
                },
            );
        }
        inner.index = 1;
        inner.names = inner.compute_names();
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
                was_failed = entry.status == NodeStatus::Failed;
                entry.status = NodeStatus::Alive;
                entry.failed_at = None;
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
                        status: NodeStatus::Alive,
                        failed_at: None,
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

    /// The session ended: the node's instances stay, the node is
    /// unreachable, and up to 3 other agents (same zone first) are asked to
    /// probe it. Returns the probe round to conclude after a timeout.
    pub fn disconnect(&self, session: SessionId) -> Option<u64> {
        let mut inner = self.lock();
        let mut probe = None;
        if let Some(s) = inner.sessions.get(&session) {
            let node = s.node.clone();
            if let Some(entry) = inner.nodes.get_mut(&node)
                && entry.session == Some(session)
            {
                entry.session = None;
                entry.status = NodeStatus::Unreachable;
                inner.drop_session(session);
                probe = Some(inner.start_probe(&node));
            }
        }
        inner.drop_session(session);
        drop(inner);
        self.changed();
        probe
    }

    /// A peer's answer to a probe request; returns the verdict once known.
    pub fn probe_result(&self, probe_id: u64, reachable: bool) -> Option<(String, ProbeVerdict)> {
        let mut inner = self.lock();
        let pending = inner.probes.get_mut(&probe_id)?;
        pending.outstanding = pending.outstanding.saturating_sub(1);
        if reachable {
            return inner.conclude(probe_id, ProbeVerdict::Reachable);
        }
        if pending.outstanding == 0 {
            let verdict = inner.conclude(probe_id, ProbeVerdict::Failed);
            drop(inner);
            self.changed();
            return verdict;
        }
        None
    }

    /// The probe timeout ran out: whoever did not answer could not reach it.
    pub fn probe_timeout(&self, probe_id: u64) -> Option<(String, ProbeVerdict)> {
        let mut inner = self.lock();
        let verdict = inner.conclude(probe_id, ProbeVerdict::Failed);
        drop(inner);
        self.changed();
        verdict
    }

    /// Removes nodes failed for longer than `after`, with their instances.
    pub fn reap(&self, after: std::time::Duration) -> Vec<String> {
        let mut inner = self.lock();
        let due: Vec<String> = inner
            .nodes
            .values()
            .filter(|n| n.failed_at.is_some_and(|t| t.elapsed() >= after))
            .map(|n| n.hello.node.clone())
            .collect();
        for node in &due {
            let ids: Vec<String> = inner.nodes[node].instances.keys().cloned().collect();
            inner.apply(
                node,
                Delta {
                    upserts: Vec::new(),
                    removed: ids,
                    node_checks_changed: false,
                    node_checks: Vec::new(),
                },
            );
            inner.nodes.remove(node);
        }
        drop(inner);
        if !due.is_empty() {
            self.changed();
        }
        due
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

    /// Subscribes a session to services; each gets a snapshot unless the
    /// agent already has the current index.
    pub fn subscribe(&self, session: SessionId, services: HashMap<String, u64>) {
        let mut inner = self.lock();
        for (service, known) in services {
            let Some(s) = inner.sessions.get_mut(&session) else {
                return;
            };
            s.subscriptions.insert(service.clone());
            inner
                .subscribers
                .entry(service.clone())
                .or_default()
                .insert(session);
            let current = inner.service_index.get(&service).copied().unwrap_or(1);
            if known != current {
                let snapshot = inner.snapshot(&service);
                inner.send(session, snapshot);
            }
        }
    }

    pub fn unsubscribe(&self, session: SessionId, services: Vec<String>) {
        let mut inner = self.lock();
        for service in services {
            if let Some(s) = inner.sessions.get_mut(&session) {
                s.subscriptions.remove(&service);
            }
            if let Some(set) = inner.subscribers.get_mut(&service) {
                set.remove(&session);
            }
        }
    }

    pub fn ack(&self, session: SessionId, service: String, index: u64) {
        let mut inner = self.lock();
        if let Some(s) = inner.sessions.get_mut(&session) {
            let acked = s.acked.entry(service).or_default();
            *acked = (*acked).max(index);
        }
    }

    /// How many other sessions subscribed to `service` applied `min_index`
    /// (0: the current index); answered to the asking session.
    pub fn ack_query(&self, session: SessionId, query: AckQuery) {
        let mut inner = self.lock();
        let index = if query.min_index == 0 {
            inner.service_index(&query.service)
        } else {
            query.min_index
        };
        let subscribers: Vec<SessionId> = inner
            .subscribers
            .get(&query.service)
            .map(|s| s.iter().copied().filter(|id| *id != session).collect())
            .unwrap_or_default();
        let acked = subscribers
            .iter()
            .filter(|id| {
                inner
                    .sessions
                    .get(id)
                    .and_then(|s| s.acked.get(&query.service))
                    .is_some_and(|a| *a >= index)
            })
            .count();
        let status = ControlMessage {
            body: Some(Body::AckStatus(AckStatus {
                query_id: query.query_id,
                index,
                subscribers: u32::try_from(subscribers.len()).unwrap_or(u32::MAX),
                acked: u32::try_from(acked).unwrap_or(u32::MAX),
            })),
        };
        inner.send(session, status);
    }

    pub fn session_count(&self) -> usize {
        self.lock().sessions.len()
    }
}

// === impl Inner ===

impl Inner {
    fn drop_session(&mut self, session: SessionId) {
        if let Some(s) = self.sessions.remove(&session) {
            for service in s.subscriptions {
                if let Some(set) = self.subscribers.get_mut(&service) {
                    set.remove(&session);
                }
            }
        }
    }

    /// Queues a message; a session that cannot keep up is dropped.
    fn send(&mut self, session: SessionId, message: ControlMessage) {
        let Some(s) = self.sessions.get(&session) else {
            return;
        };
        if let Err(e) = s.tx.try_send(message) {
            let node = s.node.clone();
            match e {
                mpsc::error::TrySendError::Full(_) => {
                    tracing::warn!(node = %node, "agent session too slow to follow changes: dropping it (the agent will resync)");
                }
                mpsc::error::TrySendError::Closed(_) => {}
            }
            self.drop_session(session);
        }
    }

    fn catalog_instance(entry: &NodeEntry, instance: &Instance) -> CatalogInstance {
        CatalogInstance {
            node: entry.hello.node.clone(),
            node_id: entry.hello.node_id.clone(),
            node_address: entry.hello.address.clone(),
            node_zone: entry.hello.zone.clone(),
            node_checks: std::iter::once(liveness(entry))
                .chain(entry.node_checks.iter().cloned())
                .collect(),
            instance: Some(instance.clone()),
        }
    }

    /// Asks up to 3 connected agents, same zone first, to probe `node`.
    fn start_probe(&mut self, node: &str) -> u64 {
        self.next_probe += 1;
        let id = self.next_probe;
        let (zone, address) = self
            .nodes
            .get(node)
            .map(|n| (n.hello.zone.clone(), n.hello.probe_address.clone()))
            .unwrap_or_default();
        let mut peers: Vec<(bool, SessionId)> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.node != node)
            .map(|(id, s)| {
                let same_zone = self
                    .nodes
                    .get(&s.node)
                    .is_some_and(|n| n.hello.zone == zone);
                (!same_zone, *id)
            })
            .collect();
        peers.sort();
        peers.truncate(PROBE_PEERS);
        let asked = if address.is_empty() { 0 } else { peers.len() };
        self.probes.insert(
            id,
            PendingProbe {
                node: node.to_string(),
                outstanding: asked,
            },
        );
        tracing::info!(
            node,
            peers = asked,
            "agent stream dropped: asking peers to probe it"
        );
        if asked > 0 {
            for (_, session) in peers {
                let request = ControlMessage {
                    body: Some(Body::Probe(ProbeRequest {
                        probe_id: id,
                        node: node.to_string(),
                        address: address.clone(),
                    })),
                };
                self.send(session, request);
            }
        }
        id
    }

    fn conclude(&mut self, probe_id: u64, verdict: ProbeVerdict) -> Option<(String, ProbeVerdict)> {
        let pending = self.probes.remove(&probe_id)?;
        let entry = self.nodes.get_mut(&pending.node)?;
        // Reconnected meanwhile: nothing to decide.
        if entry.status != NodeStatus::Unreachable {
            return None;
        }
        match verdict {
            ProbeVerdict::Reachable => {
                tracing::info!(node = %pending.node, "peers reach the node: a control-plane partition, its instances stay");
            }
            ProbeVerdict::Failed => {
                tracing::warn!(node = %pending.node, "no peer reaches the node: marking it failed");
                entry.status = NodeStatus::Failed;
                entry.failed_at = Some(std::time::Instant::now());
                let node = pending.node.clone();
                self.node_changed(&node);
            }
        }
        Some((pending.node, verdict))
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
                .push(Self::catalog_instance(entry, instance));
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

    fn snapshot(&self, service: &str) -> ControlMessage {
        let upserts = self
            .instances_of(service)
            .map(|(n, i)| Self::catalog_instance(n, i))
            .collect();
        ControlMessage {
            body: Some(Body::Update(ServiceUpdate {
                service: service.to_string(),
                index: self.service_index(service),
                snapshot: true,
                upserts,
                removed: Vec::new(),
            })),
        }
    }

    fn names_message(&self) -> ControlMessage {
        ControlMessage {
            body: Some(Body::Names(ServiceNames {
                index: self.index.max(1),
                services: self
                    .names
                    .iter()
                    .map(|(name, tags)| {
                        (
                            name.clone(),
                            Tags {
                                tags: tags.iter().cloned().collect(),
                            },
                        )
                    })
                    .collect(),
            })),
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
            entry
                .instances
                .insert(instance.id.clone(), instance.clone());
            changes.entry(instance.name.clone()).or_default();
        }
        if delta.node_checks_changed && entry.node_checks != delta.node_checks {
            entry.node_checks = delta.node_checks;
            // Node checks are part of every instance's health.
            for instance in entry.instances.values() {
                changes.entry(instance.name.clone()).or_default();
            }
        }
        if changes.is_empty() {
            return;
        }
        // Upserts carry the instance as stored now (with the node's checks).
        let entry = &self.nodes[node];
        for (service, change) in changes.iter_mut() {
            change.upserts = entry
                .instances
                .values()
                .filter(|i| &i.name == service)
                .map(|i| Self::catalog_instance(entry, i))
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

    /// Gives each changed service a new index and sends its delta to its
    /// subscribers, and only to them.
    fn publish(&mut self, changes: BTreeMap<String, ServiceChange>) {
        self.index += 1;
        let index = self.index;
        for (service, change) in changes {
            self.service_index.insert(service.clone(), index);
            let message = ControlMessage {
                body: Some(Body::Update(ServiceUpdate {
                    service: service.clone(),
                    index,
                    snapshot: false,
                    upserts: change.upserts,
                    removed: change.removed,
                })),
            };
            let sessions: Vec<SessionId> = self
                .subscribers
                .get(&service)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default();
            for session in sessions {
                self.send(session, message.clone());
            }
        }
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
