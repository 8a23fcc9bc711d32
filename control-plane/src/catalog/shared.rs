//! The catalog of a replica that shares its store with others (etcd):
//! nodes, their presence (an agent holds a stream on some replica) and
//! their failures come from the store, applied here at the store's
//! revision, so that every replica publishes the same change at the same
//! index. The replica elected leader probes unreachable nodes and reaps
//! failed ones, but does not apply its verdicts itself: it hands them to
//! the store as [`Decision`]s and applies them when they come back, like
//! every other replica.

use std::collections::{HashMap, HashSet};

use super::*;

/// What the leader decided, for the store to record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Decision {
    /// No peer reaches the node.
    Failed { node: String, at_unix_ms: u64 },
    /// Failed for `node_reap_after`: remove it and its registrations.
    Reap { node: String },
    /// Ask `peers`, whose agents are on other replicas, whether they
    /// reach `node` at `address`; they answer through the store.
    Probe {
        id: u64,
        node: String,
        address: String,
        peers: Vec<String>,
    },
    /// Probe `id` is concluded: its records can go.
    ProbeDone { id: u64 },
}

#[derive(Default)]
pub(super) struct SharedState {
    /// Nodes whose agent holds a stream on some replica.
    present: HashSet<String>,
    /// Nodes recorded failed, and since when (Unix ms).
    failed: HashMap<String, u64>,
    /// Whether this replica probes and reaps.
    leader: bool,
    decisions: Vec<Decision>,
    /// Probes another replica's leader asked this one's agents, and when.
    relayed: HashMap<u64, Instant>,
    /// Drains asked and answered across replicas.
    pub(super) drains: super::drains::Drains,
}

impl Catalog {
    /// An empty catalog that follows a shared store.
    pub fn shared() -> Catalog {
        let catalog = Catalog::default();
        let mut inner = catalog.lock();
        inner.shared = Some(SharedState::default());
        // Probe ids are seen by every replica: each leader its own range.
        inner.next_probe = u64::from(rand::random::<u32>()) << 24;
        drop(inner);
        catalog
    }

    /// The leader asks the agents among `peers` that are on this replica
    /// whether they reach `node` (their answers go to the store).
    pub fn relay_probe(&self, id: u64, node: &str, address: &str, peers: &[String]) {
        let mut inner = self.lock();
        let now = Instant::now();
        let mut asked = false;
        for peer in peers {
            if let Some(session) = inner.session_of(peer) {
                inner.send(session, super::liveness::probe_request(id, node, address));
                asked = true;
            }
        }
        if let Some(shared) = inner.shared.as_mut() {
            shared
                .relayed
                .retain(|_, at| now.duration_since(*at) < Duration::from_secs(60));
            if asked {
                shared.relayed.insert(id, now);
            }
        }
    }

    /// Whether this replica relayed probe `id` to its agents: their
    /// answers go to the store for the leader.
    pub fn relayed(&self, id: u64) -> bool {
        self.lock()
            .shared
            .as_ref()
            .is_some_and(|s| s.relayed.contains_key(&id))
    }

    /// A node's record in the store at `revision` (`None`: deleted).
    pub fn store_node(&self, node: &str, record: Option<NodeSnapshot>, revision: u64) {
        let mut inner = self.lock();
        inner.revision = Some(revision);
        let record = record.and_then(|r| r.hello.map(|h| (h, r.instances, r.node_checks)));
        inner.set_record(node, record, |inner, hello| {
            if hello.external {
                Liveness::alive()
            } else {
                inner.shared_liveness(node)
            }
        });
        inner.revision = None;
    }

    /// Whether some replica holds a stream of `node`'s agent, at `revision`.
    pub fn store_presence(&self, node: &str, present: bool, revision: u64) {
        self.store_liveness(node, revision, |s| {
            if present {
                s.present.insert(node.to_string());
            } else {
                s.present.remove(node);
                s.drains.forget_holder(node);
            }
        });
    }

    /// When `node` failed (`None`: it has not, or is back), at `revision`.
    pub fn store_failed(&self, node: &str, at_unix_ms: Option<u64>, revision: u64) {
        self.store_liveness(node, revision, |s| match at_unix_ms {
            Some(at) => {
                s.failed.insert(node.to_string(), at);
            }
            None => {
                s.failed.remove(node);
            }
        });
    }

    fn store_liveness(&self, node: &str, revision: u64, change: impl FnOnce(&mut SharedState)) {
        let mut inner = self.lock();
        let Some(shared) = inner.shared.as_mut() else {
            return;
        };
        change(shared);
        let leader = shared.leader;
        let liveness = inner.shared_liveness(node);
        let Some(entry) = inner.nodes.get_mut(node) else {
            return;
        };
        let before = entry.liveness.status;
        if before == liveness.status {
            return;
        }
        if liveness.status == NodeStatus::Unreachable {
            tracing::info!(node, probing = leader, "agent not connected to any replica");
        }
        entry.liveness = liveness;
        // Failing and coming back change every instance's health.
        if before == NodeStatus::Failed || entry.liveness.status == NodeStatus::Failed {
            inner.revision = Some(revision);
            inner.node_changed(node);
            inner.revision = None;
        }
        drop(inner);
        self.changed();
    }

    /// Whether this replica is the one that probes and reaps. A new leader
    /// probes every unreachable node at once.
    pub fn set_leader(&self, leader: bool) {
        let mut inner = self.lock();
        let Some(shared) = inner.shared.as_mut() else {
            return;
        };
        shared.leader = leader;
        shared.decisions.clear();
        let now = Instant::now();
        for entry in inner.nodes.values_mut() {
            if leader {
                entry.liveness.probe_from(now);
            } else if entry.liveness.status == NodeStatus::Unreachable {
                entry.liveness = Liveness::unreachable(None);
            }
        }
        if !leader {
            inner.probes.clear();
        }
    }

    /// The nodes, present nodes and failed nodes as the store said.
    pub fn shared_keys(&self) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
        let inner = self.lock();
        let Some(shared) = &inner.shared else {
            return Default::default();
        };
        (
            inner.nodes.keys().cloned().collect(),
            shared.present.iter().cloned().collect(),
            shared.failed.keys().cloned().collect(),
        )
    }

    /// Whether this replica probes and reaps (a lone replica on files
    /// always does).
    pub fn is_leader(&self) -> bool {
        self.lock().shared.as_ref().is_none_or(|s| s.leader)
    }

    /// The decisions taken since the last call, for the store.
    pub fn take_decisions(&self) -> Vec<Decision> {
        self.lock()
            .shared
            .as_mut()
            .map(|s| std::mem::take(&mut s.decisions))
            .unwrap_or_default()
    }

    /// Opens a session of `node`'s agent on this replica: it gets the
    /// fan-out; the node's presence goes through the store.
    pub fn attach(&self, node: &str, tx: mpsc::Sender<ControlMessage>) -> SessionId {
        let mut inner = self.lock();
        inner.next_session += 1;
        let id = inner.next_session;
        inner.sessions.insert(
            id,
            Session {
                node: node.to_string(),
                tx,
                subscriptions: HashSet::new(),
                acked: HashMap::new(),
                in_flight: HashMap::new(),
            },
        );
        let names = inner.names_message();
        inner.send(id, names);
        id
    }

    /// Ends a session opened with [`Catalog::attach`].
    pub fn detach(&self, session: SessionId) {
        self.lock().drop_session(session);
    }

    /// `node` as the store has it now, with `hello` (what a replica that
    /// takes over the node's agent writes first).
    pub fn record_of(&self, hello: Hello) -> NodeSnapshot {
        let inner = self.lock();
        let entry = inner.nodes.get(&hello.node);
        NodeSnapshot {
            instances: entry.map_or_else(Vec::new, |n| n.instances.values().cloned().collect()),
            node_checks: entry.map_or_else(Vec::new, |n| n.node_checks.clone()),
            failed_at_unix_ms: 0,
            hello: Some(hello),
        }
    }
}

impl Inner {
    /// On a shared store, the nodes whose agents are connected to any
    /// replica.
    pub(super) fn shared_present(&self) -> Option<impl Iterator<Item = &str>> {
        self.shared
            .as_ref()
            .map(|s| s.present.iter().map(String::as_str))
    }

    /// A node's liveness from what the store says of it.
    fn shared_liveness(&self, node: &str) -> Liveness {
        let Some(shared) = &self.shared else {
            return Liveness::alive();
        };
        // No agent runs on an external node: nothing to probe.
        if self.nodes.get(node).is_some_and(|n| n.hello.external) {
            return Liveness::alive();
        }
        if let Some(at) = shared.failed.get(node) {
            Liveness::failed(*at)
        } else if shared.present.contains(node) {
            Liveness::alive()
        } else {
            Liveness::unreachable(shared.leader.then(Instant::now))
        }
    }

    pub(super) fn decide(&mut self, decision: Decision) {
        if let Some(shared) = self.shared.as_mut() {
            shared.decisions.push(decision);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_agent::{Agent, hello, instance};
    use super::*;

    fn record(node: &str, ids: &[&str]) -> NodeSnapshot {
        NodeSnapshot {
            hello: Some(hello(node)),
            instances: ids.iter().map(|id| instance(id, "web")).collect(),
            ..NodeSnapshot::default()
        }
    }

    #[test]
    fn changes_are_published_at_the_store_revision_and_failures_come_from_the_store() {
        let catalog = Catalog::shared();
        let mut user = Agent::attach(&catalog, "user");
        catalog.subscribe(user.session, HashMap::from([("web".to_string(), 0)]));
        assert_eq!(user.updates().len(), 1, "the empty snapshot");
        catalog.store_presence("a", true, 41);
        catalog.store_node("a", Some(record("a", &["web-1"])), 42);
        let updates = user.updates();
        assert_eq!(updates.len(), 1);
        assert_eq!(
            updates[0].index, 42,
            "the revision, the same on every replica"
        );
        assert_eq!(
            catalog.read(|i| i.nodes["a"].liveness.status),
            NodeStatus::Alive
        );
        // Its agent's stream is gone from every replica: unreachable, and
        // nothing changes for consumers.
        catalog.store_presence("a", false, 43);
        assert_eq!(
            catalog.read(|i| i.nodes["a"].liveness.status),
            NodeStatus::Unreachable
        );
        assert!(user.updates().is_empty());
        // A follower decides nothing, whatever time passes.
        assert!(catalog.tick(Duration::from_secs(1)).is_empty());
        assert!(catalog.take_decisions().is_empty());
        // The leader records failures in the store; they apply when the
        // store says so, at its revision.
        catalog.store_failed("a", Some(1_000), 50);
        let updates = user.updates();
        assert_eq!(updates.len(), 1);
        assert_eq!(updates[0].index, 50);
        let node_checks = &updates[0].upserts[0].node_checks;
        assert_eq!(
            node_checks[0].health(),
            Some(signpost_core::model::Health::Critical)
        );
        catalog.store_node("a", None, 60);
        let updates = user.updates();
        assert_eq!(updates[0].index, 60);
        assert_eq!(updates[0].removed.len(), 1);
        assert!(catalog.read(|i| i.nodes.is_empty()));
    }

    #[test]
    fn the_leader_hands_its_verdicts_to_the_store() {
        let catalog = Catalog::shared();
        let _peer = Agent::attach(&catalog, "peer");
        catalog.store_presence("peer", true, 2);
        catalog.store_node("peer", Some(record("peer", &[])), 3);
        catalog.store_node("a", Some(record("a", &["web-1"])), 4);
        catalog.set_leader(true);
        catalog.tick(Duration::from_secs(600));
        let probe = catalog.read(|i| i.probes.keys().copied().next());
        let probe = probe.expect("the leader probes the unreachable node");
        assert_eq!(
            catalog.probe_result(probe, super::super::liveness::tests::answer(false)),
            Some(("a".to_string(), ProbeVerdict::Failed))
        );
        let decisions = catalog.take_decisions();
        assert!(
            decisions
                .iter()
                .any(|d| matches!(d, Decision::Failed { node, .. } if node == "a")),
            "{decisions:?}"
        );
        assert!(
            !decisions
                .iter()
                .any(|d| matches!(d, Decision::Probe { .. })),
            "the peer is on this replica: asked directly"
        );
        assert_eq!(
            catalog.read(|i| i.nodes["a"].liveness.status),
            NodeStatus::Unreachable,
            "not failed until the store says so"
        );
        catalog.store_failed("a", Some(1), 5);
        catalog.tick(Duration::from_secs(600));
        assert_eq!(
            catalog.take_decisions(),
            [Decision::Reap {
                node: "a".to_string()
            }]
        );
    }

    #[test]
    fn peers_on_other_replicas_are_asked_through_the_store() {
        let catalog = Catalog::shared();
        // "peer" is present, but on another replica: no session here.
        catalog.store_presence("peer", true, 2);
        catalog.store_node("peer", Some(record("peer", &[])), 3);
        catalog.store_node("a", Some(record("a", &["web-1"])), 4);
        catalog.set_leader(true);
        catalog.tick(Duration::from_secs(600));
        let decisions = catalog.take_decisions();
        let Some(Decision::Probe {
            id, node, peers, ..
        }) = decisions
            .iter()
            .find(|d| matches!(d, Decision::Probe { .. }))
            .cloned()
        else {
            panic!("no probe through the store: {decisions:?}");
        };
        assert_eq!(
            (node.as_str(), peers.as_slice()),
            ("a", ["peer".to_string()].as_slice())
        );
        // The replica the peer is on relays it, and knows to send the
        // answer back through the store.
        let other = Catalog::shared();
        let mut peer = Agent::attach(&other, "peer");
        other.relay_probe(id, "a", "198.18.0.1:8301", &peers);
        assert_eq!(peer.probes().len(), 1);
        assert!(other.relayed(id));
        // The answer, through the store, concludes the leader's probe.
        assert_eq!(
            catalog.probe_result(id, super::super::liveness::tests::answer(false)),
            Some(("a".to_string(), ProbeVerdict::Failed))
        );
    }
}
