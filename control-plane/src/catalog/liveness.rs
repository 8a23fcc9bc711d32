//! Node liveness: alive while its agent holds a stream; unreachable when
//! the stream drops (its instances stay routable) while up to 3 peers,
//! same zone first, probe its liveness listener; failed when the peers
//! asked could not reach it. The verdict is revisited: an unreachable node
//! is probed again with back-off until it reconnects or fails, and a node
//! restored from the store that does not reconnect within the grace period
//! takes the same path. A failed node's registrations are reaped after
//! `node_reap_after`, counted from when it failed (which survives a
//! restart).
//!
//! The transitions are driven by [`Catalog::tick`] with the time passed
//! in, so they are tested without waiting.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use signpost_core::model::Health;
use signpost_proto::{Check, ControlMessage, ProbeRequest, control_message::Body};

use super::{Catalog, Inner, NodeEntry, SessionId};

/// Peers asked to probe a node whose stream dropped.
const PROBE_PEERS: usize = 3;
/// Peers have this long to answer a probe request (they give up on the
/// node itself after 1 s).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The first re-probe of a node that peers reach but the control plane
/// does not; each later one waits twice as long, up to [`REPROBE_MAX`].
const REPROBE_MIN: Duration = Duration::from_secs(2);
const REPROBE_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeStatus {
    /// Its agent holds a session.
    Alive,
    /// Its agent's session dropped (or it was restored from the store and
    /// has not reconnected yet); its instances stay routable.
    Unreachable,
    /// No peer could reach it either: its instances are critical.
    Failed,
}

impl NodeStatus {
    pub const ALL: [NodeStatus; 3] = [
        NodeStatus::Alive,
        NodeStatus::Unreachable,
        NodeStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Alive => "alive",
            NodeStatus::Unreachable => "unreachable",
            NodeStatus::Failed => "failed",
        }
    }
}

/// Where a node stands in the liveness cycle.
#[derive(Debug, Clone)]
pub struct Liveness {
    pub status: NodeStatus,
    /// When it failed (wall clock, kept in the store for the reaper).
    pub failed_at: Option<SystemTime>,
    /// When an unreachable node is probed next (none while a round runs).
    next_probe: Option<Instant>,
    /// How long the re-probe after next waits.
    reprobe: Duration,
}

impl Liveness {
    pub(super) fn alive() -> Liveness {
        Liveness {
            status: NodeStatus::Alive,
            failed_at: None,
            next_probe: None,
            reprobe: REPROBE_MIN,
        }
    }

    /// A node loaded from the store: failed stays failed; any other is
    /// unreachable and probed once `grace` has passed without its agent.
    pub(super) fn restored(failed_at_unix_ms: u64, now: Instant, grace: Duration) -> Liveness {
        if failed_at_unix_ms > 0 {
            return Liveness {
                status: NodeStatus::Failed,
                failed_at: Some(UNIX_EPOCH + Duration::from_millis(failed_at_unix_ms)),
                next_probe: None,
                reprobe: REPROBE_MIN,
            };
        }
        Liveness {
            status: NodeStatus::Unreachable,
            failed_at: None,
            next_probe: Some(now + grace),
            reprobe: REPROBE_MIN,
        }
    }

    /// When it failed, for the store (0: it has not).
    pub(super) fn failed_at_unix_ms(&self) -> u64 {
        self.failed_at.map_or(0, unix_ms)
    }

    /// Failed at `at_unix_ms`, as the shared store says.
    pub(super) fn failed(at_unix_ms: u64) -> Liveness {
        Liveness {
            status: NodeStatus::Failed,
            failed_at: Some(UNIX_EPOCH + Duration::from_millis(at_unix_ms)),
            next_probe: None,
            reprobe: REPROBE_MIN,
        }
    }

    /// Unreachable, probed at `next_probe` (none: not by this replica).
    pub(super) fn unreachable(next_probe: Option<Instant>) -> Liveness {
        Liveness {
            status: NodeStatus::Unreachable,
            failed_at: None,
            next_probe,
            reprobe: REPROBE_MIN,
        }
    }

    /// An unreachable node this replica does not probe (it is not the
    /// leader) gets probed from `at` on.
    pub(super) fn probe_from(&mut self, at: Instant) {
        if self.status == NodeStatus::Unreachable && self.next_probe.is_none() {
            self.next_probe = Some(at);
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Asks an agent whether it reaches `node` at `address`.
pub(super) fn probe_request(id: u64, node: &str, address: &str) -> ControlMessage {
    ControlMessage {
        body: Some(Body::Probe(ProbeRequest {
            probe_id: id,
            node: node.to_string(),
            address: address.to_string(),
        })),
    }
}

/// A node's liveness as Consul's `serfHealth` check.
pub fn liveness_check(node: &NodeEntry) -> Check {
    let (status, output) = match node.liveness.status {
        NodeStatus::Alive => (Health::Passing, "Agent alive and reachable"),
        NodeStatus::Unreachable => (
            Health::Passing,
            "Agent stream to the control plane dropped; peers can reach it or are being asked",
        ),
        NodeStatus::Failed => (
            Health::Critical,
            "Agent not reachable by the control plane nor by its peers",
        ),
    };
    let mut check = Check {
        id: "serfHealth".to_string(),
        name: "Serf Health Status".to_string(),
        output: output.to_string(),
        ..Check::default()
    };
    check.set_health(status);
    check
}

/// A question to peers about an unreachable node.
pub(super) struct PendingProbe {
    node: String,
    /// The peers' answers so far.
    answers: Vec<PeerAnswer>,
    /// Peers asked that have not answered yet.
    outstanding: usize,
    /// Peers asked: with none, nothing can be concluded.
    asked: usize,
    deadline: Instant,
}

/// What a peer said when asked whether it reaches a node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct PeerAnswer {
    pub peer: String,
    pub reachable: bool,
    /// What it saw when it could not (empty: not told).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// The last probe round of a node, and when it ended (Unix ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeRound {
    pub at_unix_ms: u64,
    pub answers: Vec<PeerAnswer>,
}

/// How a probe round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeVerdict {
    /// A peer reached it: the control plane is what is cut off.
    Reachable,
    /// The peers asked could not reach it: the node failed.
    Failed,
    /// No peer was connected to ask: probed again later.
    Unknown,
}

impl ProbeVerdict {
    /// As the metrics label it.
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeVerdict::Reachable => "reachable",
            ProbeVerdict::Failed => "failed",
            ProbeVerdict::Unknown => "no_peer",
        }
    }
}

impl Catalog {
    /// The session ended: the node's instances stay, the node is
    /// unreachable, and peers are asked to probe it at once.
    pub fn disconnect(&self, session: SessionId) {
        self.disconnect_at(session, Instant::now());
    }

    fn disconnect_at(&self, session: SessionId, now: Instant) {
        let mut inner = self.lock();
        if let Some(s) = inner.sessions.get(&session) {
            let node = s.node.clone();
            if let Some(entry) = inner.nodes.get_mut(&node)
                && entry.session == Some(session)
            {
                entry.last_contact = Some(SystemTime::now());
                entry.session = None;
                entry.liveness.status = NodeStatus::Unreachable;
                entry.liveness.next_probe = None;
                entry.liveness.reprobe = REPROBE_MIN;
                inner.drop_session(session);
                inner.start_probe(&node, now);
            }
        }
        inner.drop_session(session);
        drop(inner);
        self.changed();
    }

    /// A peer's answer to a probe request; returns the verdict once known.
    pub fn probe_result(
        &self,
        probe_id: u64,
        answer: PeerAnswer,
    ) -> Option<(String, ProbeVerdict)> {
        self.probe_result_at(probe_id, answer, Instant::now(), SystemTime::now())
    }

    fn probe_result_at(
        &self,
        probe_id: u64,
        answer: PeerAnswer,
        now: Instant,
        wall: SystemTime,
    ) -> Option<(String, ProbeVerdict)> {
        let mut inner = self.lock();
        let pending = inner.probes.get_mut(&probe_id)?;
        pending.outstanding = pending.outstanding.saturating_sub(1);
        let reachable = answer.reachable;
        pending.answers.push(answer);
        let verdict = if reachable {
            ProbeVerdict::Reachable
        } else if pending.outstanding == 0 {
            ProbeVerdict::Failed
        } else {
            return None;
        };
        let concluded = inner.conclude(probe_id, verdict, now, wall);
        drop(inner);
        // Only a failure is worth keeping on disk.
        if matches!(concluded, Some((_, ProbeVerdict::Failed))) {
            self.changed();
        }
        concluded
    }

    /// Moves liveness on to `now`: probe rounds whose time is up are
    /// concluded (a peer that did not answer could not reach the node),
    /// unreachable nodes due for a probe are probed, and nodes failed
    /// for `reap_after` are removed with their registrations. Returns the
    /// nodes reaped.
    pub fn tick(&self, reap_after: Duration) -> Vec<String> {
        self.tick_at(Instant::now(), SystemTime::now(), reap_after)
    }

    fn tick_at(&self, now: Instant, wall: SystemTime, reap_after: Duration) -> Vec<String> {
        let mut inner = self.lock();
        inner.end_warm_up(now);
        // Whether a node failed or was reaped: worth keeping on disk.
        let mut changed = false;
        let expired: Vec<u64> = inner
            .probes
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let asked = inner.probes.get(&id).map_or(0, |p| p.asked);
            let verdict = if asked == 0 {
                ProbeVerdict::Unknown
            } else {
                ProbeVerdict::Failed
            };
            let concluded = inner.conclude(id, verdict, now, wall);
            changed |= matches!(concluded, Some((_, ProbeVerdict::Failed)));
        }
        let due: Vec<String> = inner
            .nodes
            .values()
            .filter(|n| {
                n.liveness.status == NodeStatus::Unreachable
                    && n.liveness.next_probe.is_some_and(|at| at <= now)
            })
            .map(|n| n.hello.node.clone())
            .collect();
        for node in due {
            inner.start_probe(&node, now);
        }
        let reaped: Vec<String> = inner
            .nodes
            .values()
            .filter(|n| {
                n.liveness
                    .failed_at
                    .is_some_and(|t| wall.duration_since(t).is_ok_and(|d| d >= reap_after))
            })
            .map(|n| n.hello.node.clone())
            .collect();
        for node in &reaped {
            if inner.shared.is_some() {
                inner.decide(super::Decision::Reap { node: node.clone() });
            } else {
                inner.reap(node);
            }
        }
        drop(inner);
        if changed || !reaped.is_empty() {
            self.changed();
        }
        reaped
    }
}

// === impl Inner ===

impl Inner {
    /// Asks up to 3 connected agents, same zone first, to probe `node`.
    /// On a shared store the peers are agents connected to any replica:
    /// those on another replica are asked through the store
    /// ([`super::Decision::Probe`]).
    fn start_probe(&mut self, node: &str, now: Instant) {
        self.next_probe += 1;
        let id = self.next_probe;
        let Some(entry) = self.nodes.get_mut(node) else {
            return;
        };
        entry.liveness.next_probe = None;
        let zone = entry.hello.zone.clone();
        let address = entry.hello.probe_address.clone();
        let peers = if address.is_empty() {
            Vec::new()
        } else {
            self.probe_peers(node, &zone)
        };
        let asked = peers.len();
        self.probes.insert(
            id,
            PendingProbe {
                node: node.to_string(),
                answers: Vec::new(),
                outstanding: asked,
                asked,
                deadline: now + PROBE_TIMEOUT,
            },
        );
        tracing::info!(
            node,
            peers = asked,
            "agent not connected: asking peers to probe it"
        );
        let mut remote = Vec::new();
        for peer in peers {
            match self.session_of(&peer) {
                Some(session) => {
                    let request = probe_request(id, node, &address);
                    self.send(session, request);
                }
                None => remote.push(peer),
            }
        }
        if !remote.is_empty() {
            self.decide(super::Decision::Probe {
                id,
                node: node.to_string(),
                address,
                peers: remote,
            });
        }
    }

    /// Up to [`PROBE_PEERS`] nodes with an agent connected (to this
    /// replica, or on a shared store to any), same zone first.
    fn probe_peers(&self, node: &str, zone: &str) -> Vec<String> {
        let connected: Vec<&str> = match self.shared_present() {
            Some(present) => present.collect(),
            None => self.sessions.values().map(|s| s.node.as_str()).collect(),
        };
        let mut peers: Vec<(bool, &str)> = connected
            .into_iter()
            .filter(|peer| *peer != node)
            .map(|peer| {
                let same_zone = self.nodes.get(peer).is_some_and(|n| n.hello.zone == zone);
                (!same_zone, peer)
            })
            .collect();
        peers.sort_unstable();
        peers.dedup();
        peers
            .into_iter()
            .take(PROBE_PEERS)
            .map(|(_, peer)| peer.to_string())
            .collect()
    }

    /// This replica's session of `node`'s agent, if it has one.
    pub(super) fn session_of(&self, node: &str) -> Option<SessionId> {
        self.sessions
            .iter()
            .find(|(_, s)| s.node == node)
            .map(|(id, _)| *id)
    }

    fn conclude(
        &mut self,
        probe_id: u64,
        verdict: ProbeVerdict,
        now: Instant,
        wall: SystemTime,
    ) -> Option<(String, ProbeVerdict)> {
        let pending = self.probes.remove(&probe_id)?;
        if self.shared.is_some() {
            self.decide(super::Decision::ProbeDone { id: probe_id });
        }
        self.last_probes.insert(
            pending.node.clone(),
            ProbeRound {
                at_unix_ms: unix_ms(wall),
                answers: pending.answers.clone(),
            },
        );
        self.stats
            .probes
            .get_or_create(&crate::metrics::OutcomeLabels {
                outcome: verdict.as_str(),
            })
            .inc();
        let entry = self.nodes.get_mut(&pending.node)?;
        // Reconnected meanwhile: nothing to decide.
        if entry.liveness.status != NodeStatus::Unreachable {
            return None;
        }
        let liveness = &mut entry.liveness;
        match verdict {
            ProbeVerdict::Reachable | ProbeVerdict::Unknown => {
                if verdict == ProbeVerdict::Reachable {
                    tracing::info!(node = %pending.node, again_in = ?liveness.reprobe, "peers reach the node: a control-plane partition, its instances stay");
                } else {
                    tracing::info!(node = %pending.node, again_in = ?liveness.reprobe, "no connected peer to probe the node: its instances stay");
                }
                liveness.next_probe = Some(now + liveness.reprobe);
                liveness.reprobe = (liveness.reprobe * 2).min(REPROBE_MAX);
            }
            ProbeVerdict::Failed if self.shared.is_some() => {
                // Every replica marks it failed when the store says so;
                // probed again if the store never does.
                tracing::warn!(node = %pending.node, "no peer reaches the node: recording it failed");
                liveness.next_probe = Some(now + REPROBE_MAX);
                let decision = super::Decision::Failed {
                    node: pending.node.clone(),
                    at_unix_ms: unix_ms(wall),
                };
                self.decide(decision);
            }
            ProbeVerdict::Failed => {
                tracing::warn!(node = %pending.node, "no peer reaches the node: marking it failed");
                liveness.status = NodeStatus::Failed;
                liveness.failed_at = Some(wall);
                liveness.next_probe = None;
                let node = pending.node.clone();
                self.node_changed(&node);
            }
        }
        Some((pending.node, verdict))
    }

    /// Removes a failed node and its registrations, telling subscribers.
    fn reap(&mut self, node: &str) {
        tracing::warn!(node, "failed node reaped: its registrations are removed");
        self.set_record(node, None, |_, _| Liveness::alive());
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::test_agent::{Agent, hello, instance};
    use super::*;
    use signpost_proto::{CatalogSnapshot, FullState, NodeSnapshot};

    const REAP: Duration = Duration::from_secs(600);

    /// A peer's answer.
    pub(crate) fn answer(reachable: bool) -> PeerAnswer {
        PeerAnswer {
            peer: "peer".to_string(),
            reachable,
            error: if reachable {
                String::new()
            } else {
                "connection refused".to_string()
            },
        }
    }

    fn status(catalog: &Catalog, node: &str) -> Option<NodeStatus> {
        catalog.read(|i| i.nodes.get(node).map(|n| n.liveness.status))
    }

    #[test]
    fn a_node_peers_cannot_reach_fails_and_is_reaped_after_the_delay() {
        let catalog = Catalog::default();
        let a = Agent::connect(&catalog, "a");
        catalog.full_state(
            a.session,
            FullState {
                instances: vec![instance("web-a", "web")],
                node_checks: Vec::new(),
            },
        );
        let mut b = Agent::connect(&catalog, "bb");
        let t0 = Instant::now();
        let wall = SystemTime::now();
        catalog.disconnect_at(a.session, t0);
        assert_eq!(status(&catalog, "a"), Some(NodeStatus::Unreachable));
        let asked = b.probes();
        assert_eq!(asked.len(), 1);
        assert_eq!(asked[0].address, "198.18.0.1:8301");
        assert_eq!(
            catalog.probe_result_at(asked[0].probe_id, answer(false), t0, wall),
            Some(("a".to_string(), ProbeVerdict::Failed))
        );
        assert_eq!(status(&catalog, "a"), Some(NodeStatus::Failed));
        assert!(catalog.tick_at(t0, wall + REAP / 2, REAP).is_empty());
        assert_eq!(
            catalog.tick_at(t0, wall + REAP, REAP),
            vec!["a".to_string()]
        );
        assert_eq!(status(&catalog, "a"), None);
        assert_eq!(catalog.read(|i| i.instances_of("web").count()), 0);
    }

    #[test]
    fn a_partitioned_node_is_probed_again_with_back_off_until_it_fails() {
        let catalog = Catalog::default();
        let a = Agent::connect(&catalog, "a");
        let mut b = Agent::connect(&catalog, "bb");
        let t0 = Instant::now();
        let wall = SystemTime::now();
        catalog.disconnect_at(a.session, t0);
        let first = b.probes().remove(0);
        catalog.probe_result_at(first.probe_id, answer(true), t0, wall);
        assert_eq!(status(&catalog, "a"), Some(NodeStatus::Unreachable));
        // Probed again after 2 s, then after 4 s more.
        catalog.tick_at(t0 + Duration::from_millis(1900), wall, REAP);
        assert!(b.probes().is_empty());
        let t1 = t0 + REPROBE_MIN;
        catalog.tick_at(t1, wall, REAP);
        let second = b.probes().remove(0);
        catalog.probe_result_at(second.probe_id, answer(true), t1, wall);
        catalog.tick_at(t1 + Duration::from_millis(3900), wall, REAP);
        assert!(b.probes().is_empty());
        let t2 = t1 + 2 * REPROBE_MIN;
        catalog.tick_at(t2, wall, REAP);
        let third = b.probes().remove(0);
        // Now it died: peers no longer reach it.
        catalog.probe_result_at(third.probe_id, answer(false), t2, wall);
        assert_eq!(status(&catalog, "a"), Some(NodeStatus::Failed));
    }

    #[test]
    fn peers_that_do_not_answer_in_time_fail_the_node_but_no_peer_at_all_does_not() {
        let catalog = Catalog::default();
        let a = Agent::connect(&catalog, "a");
        let mut b = Agent::connect(&catalog, "bb");
        let t0 = Instant::now();
        let wall = SystemTime::now();
        // B goes; A is asked about it and never answers.
        catalog.disconnect_at(b.session, t0);
        catalog.tick_at(t0 + PROBE_TIMEOUT - Duration::from_millis(1), wall, REAP);
        assert_eq!(status(&catalog, "bb"), Some(NodeStatus::Unreachable));
        catalog.tick_at(t0 + PROBE_TIMEOUT, wall, REAP);
        assert_eq!(status(&catalog, "bb"), Some(NodeStatus::Failed));
        assert!(b.probes().is_empty(), "a node is never asked about itself");

        // A goes too: nobody is left to ask, so nothing is concluded.
        catalog.disconnect_at(a.session, t0);
        catalog.tick_at(t0 + PROBE_TIMEOUT, wall, REAP);
        assert_eq!(status(&catalog, "a"), Some(NodeStatus::Unreachable));
        // Until a peer is back to ask.
        let mut c = Agent::connect(&catalog, "ccc");
        let t1 = t0 + PROBE_TIMEOUT + REPROBE_MIN;
        catalog.tick_at(t1, wall, REAP);
        let asked = c.probes();
        assert_eq!(asked.len(), 1);
        assert_eq!(asked[0].node, "a");
    }

    #[test]
    fn restored_nodes_get_a_grace_period_and_failed_ones_stay_failed() {
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let failed_at = wall - Duration::from_secs(500);
        let snapshot = CatalogSnapshot {
            nodes: vec![
                NodeSnapshot {
                    hello: Some(hello("a")),
                    instances: vec![instance("web-a", "web")],
                    failed_at_unix_ms: 0,
                    ..NodeSnapshot::default()
                },
                NodeSnapshot {
                    hello: Some(hello("dead")),
                    instances: vec![instance("web-dead", "web")],
                    failed_at_unix_ms: u64::try_from(
                        failed_at.duration_since(UNIX_EPOCH).unwrap().as_millis(),
                    )
                    .unwrap(),
                    ..NodeSnapshot::default()
                },
            ],
        };
        let catalog = Catalog::default();
        let grace = Duration::from_secs(30);
        catalog.restore_at(snapshot, t0, grace);
        assert_eq!(status(&catalog, "a"), Some(NodeStatus::Unreachable));
        assert_eq!(status(&catalog, "dead"), Some(NodeStatus::Failed));
        let kept = catalog.snapshot();
        assert!(kept.nodes.iter().any(|n| n.failed_at_unix_ms > 0));

        let mut b = Agent::connect(&catalog, "bb");
        catalog.tick_at(t0 + grace - Duration::from_secs(1), wall, REAP);
        assert!(b.probes().is_empty(), "no probe within the grace period");
        catalog.tick_at(t0 + grace, wall, REAP);
        let asked = b.probes();
        assert_eq!(asked.len(), 1, "a and only a is probed");
        assert_eq!(asked[0].node, "a");
        catalog.probe_result_at(asked[0].probe_id, answer(false), t0 + grace, wall);
        assert_eq!(status(&catalog, "a"), Some(NodeStatus::Failed));
        // The failed one is reaped counting from when it failed.
        let reaped = catalog.tick_at(t0 + grace, wall + Duration::from_secs(100), REAP);
        assert_eq!(reaped, vec!["dead".to_string()]);
    }

    #[test]
    fn a_failed_node_that_reconnects_is_alive_and_no_longer_probed() {
        let catalog = Catalog::default();
        let a = Agent::connect(&catalog, "a");
        let mut b = Agent::connect(&catalog, "bb");
        let t0 = Instant::now();
        let wall = SystemTime::now();
        catalog.disconnect_at(a.session, t0);
        let asked = b.probes().remove(0);
        catalog.probe_result_at(asked.probe_id, answer(false), t0, wall);
        let _a = Agent::connect(&catalog, "a");
        assert_eq!(status(&catalog, "a"), Some(NodeStatus::Alive));
        assert!(catalog.tick_at(t0, wall + REAP, REAP).is_empty());
        catalog.tick_at(t0 + REPROBE_MAX, wall, REAP);
        assert!(b.probes().is_empty());
    }
}
