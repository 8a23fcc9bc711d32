//! Drains across replicas (etcd): an agent's `signpost drain` asks the
//! replica its stream is on which subscribed agents applied the change
//! and what they still have in flight, but the agents that use the
//! service may be on any replica.
//!
//! The asked replica records the question in the store (`drains/<service>`,
//! on its lease, for as long as it is asked and [`ASK_HOLD`] after); while
//! it is there, every replica answers with its own subscribed agents'
//! acknowledgements and in-flight counts (`drain-acks/<service>/<replica>`,
//! written when they change). The asked replica merges the answers of
//! every replica that holds agents' streams with its own sessions; a
//! replica that has not answered yet counts as pending, so a drain never
//! ends on a partial view.

use serde::{Deserialize, Serialize};

use super::*;

/// How long a drain stays asked in the store after its last question.
pub const ASK_HOLD: Duration = Duration::from_secs(10);
/// The most agents one replica's answer lists (far above any fleet; the
/// rest are counted in [`DrainAnswer::more`] and keep the drain pending).
const MAX_ANSWER_NODES: usize = 20_000;

/// One subscribed agent's state for a service being drained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAck {
    pub node: String,
    /// The service index its agent applied.
    pub acked: u64,
    /// What its proxy has in flight to the service's instances that are
    /// not passing: address and count.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_flight: Vec<(String, u32)>,
}

/// A replica's answer to a drain: its subscribed agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainAnswer {
    /// The revision the drain's key was created at: an answer to an
    /// earlier question does not count.
    pub asked: u64,
    pub nodes: Vec<NodeAck>,
    /// Agents left out of `nodes` (more than the record may hold).
    #[serde(default)]
    pub more: u32,
}

/// What the store needs for drains: keys to put (relative, with their
/// value) and keys to delete (with `Some(value)`: only while it holds
/// that value).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DrainWork {
    pub puts: Vec<(String, Vec<u8>)>,
    pub deletes: Vec<(String, Option<Vec<u8>>)>,
}

#[derive(Default)]
pub(super) struct Drains {
    /// This replica's name in the store.
    replica: String,
    /// Services asked about through this replica, and when last.
    asking: HashMap<String, Instant>,
    /// Drains in the store: the revision each one's key was created at.
    live: HashMap<String, u64>,
    /// Every replica's answers, this one's included: service, replica.
    answers: HashMap<String, HashMap<String, DrainAnswer>>,
    /// The replica that holds each present node's stream.
    holders: HashMap<String, String>,
}

impl Drains {
    pub(super) fn forget_holder(&mut self, node: &str) {
        self.holders.remove(node);
    }

    pub(super) fn holder(&self, node: &str) -> Option<&str> {
        self.holders.get(node).map(String::as_str)
    }
}

fn ask_key(service: &str) -> String {
    format!("drains/{service}")
}

fn answer_key(service: &str, replica: &str) -> String {
    format!("drain-acks/{service}/{replica}")
}

impl Catalog {
    /// This replica's name in the store (its answers' keys).
    pub fn set_replica(&self, replica: &str) {
        if let Some(shared) = self.lock().shared.as_mut() {
            shared.drains.replica = replica.to_string();
        }
    }

    /// Which replica holds `node`'s stream (`None`: none).
    pub fn store_holder(&self, node: &str, replica: Option<&str>) {
        if let Some(shared) = self.lock().shared.as_mut() {
            match replica {
                Some(r) => shared
                    .drains
                    .holders
                    .insert(node.to_string(), r.to_string()),
                None => shared.drains.holders.remove(node),
            };
        }
    }

    /// A drain in the store (`None`: gone), by the revision its key was
    /// created at.
    pub fn store_drain(&self, service: &str, created: Option<u64>) {
        if let Some(shared) = self.lock().shared.as_mut() {
            let drains = &mut shared.drains;
            match created {
                Some(at) => {
                    drains.live.insert(service.to_string(), at);
                }
                None => {
                    drains.live.remove(service);
                    drains.answers.remove(service);
                }
            }
        }
    }

    /// A replica's answer to the drain of `service` (`None`: gone).
    pub fn store_drain_answer(&self, service: &str, replica: &str, answer: Option<DrainAnswer>) {
        if let Some(shared) = self.lock().shared.as_mut() {
            let answers = &mut shared.drains.answers;
            match answer {
                Some(a) => {
                    answers
                        .entry(service.to_string())
                        .or_default()
                        .insert(replica.to_string(), a);
                }
                None => {
                    if let Some(by) = answers.get_mut(service) {
                        by.remove(replica);
                        if by.is_empty() {
                            answers.remove(service);
                        }
                    }
                }
            }
        }
    }

    /// Forgets every drain and answer (the store is read again).
    pub fn reset_drains(&self) {
        if let Some(shared) = self.lock().shared.as_mut() {
            shared.drains.live.clear();
            shared.drains.answers.clear();
        }
    }

    /// What this replica must write for drains now: the questions asked
    /// through it that the store lacks, those nobody asked for
    /// [`ASK_HOLD`] (removed), its answers to every drain in the store
    /// where they changed, and its answers to drains that ended.
    pub fn drain_work(&self, now: Instant) -> DrainWork {
        let mut inner = self.lock();
        let mut work = DrainWork::default();
        let Some(shared) = inner.shared.as_mut() else {
            return work;
        };
        let drains = &mut shared.drains;
        let me = drains.replica.clone();
        let mut released = Vec::new();
        drains.asking.retain(|service, at| {
            let held = now.duration_since(*at) < ASK_HOLD;
            if !held {
                released.push(service.clone());
            }
            held
        });
        for service in released {
            if drains.live.contains_key(&service) {
                work.deletes
                    .push((ask_key(&service), Some(me.clone().into_bytes())));
            }
        }
        for service in drains.asking.keys() {
            if !drains.live.contains_key(service) {
                work.puts.push((ask_key(service), me.clone().into_bytes()));
            }
        }
        for (service, answers) in &drains.answers {
            if !drains.live.contains_key(service) && answers.contains_key(&me) {
                work.deletes.push((answer_key(service, &me), None));
            }
        }
        let live: Vec<(String, u64)> = drains.live.iter().map(|(s, a)| (s.clone(), *a)).collect();
        for (service, asked) in live {
            let mut nodes = inner.local_acks(&service, None);
            nodes.sort_unstable_by(|a, b| a.node.cmp(&b.node));
            let more = nodes.len().saturating_sub(MAX_ANSWER_NODES);
            nodes.truncate(MAX_ANSWER_NODES);
            let answer = DrainAnswer {
                asked,
                nodes,
                more: u32::try_from(more).unwrap_or(u32::MAX),
            };
            let written = inner
                .shared
                .as_ref()
                .and_then(|s| s.drains.answers.get(&service))
                .and_then(|a| a.get(&me));
            if written != Some(&answer) {
                match serde_json::to_vec(&answer) {
                    Ok(bytes) => work.puts.push((answer_key(&service, &me), bytes)),
                    Err(error) => tracing::error!(%service, %error, "cannot encode a drain answer"),
                }
            }
        }
        work
    }
}

impl Inner {
    /// The agents on this replica subscribed to `service`, but the one on
    /// `except`: what each applied and has in flight.
    pub(super) fn local_acks(&self, service: &str, except: Option<SessionId>) -> Vec<NodeAck> {
        let Some(subscribers) = self.subscribers.get(service) else {
            return Vec::new();
        };
        subscribers
            .iter()
            .filter(|id| Some(**id) != except)
            .filter_map(|id| self.sessions.get(id))
            .map(|s| NodeAck {
                node: s.node.clone(),
                acked: s.acked.get(service).copied().unwrap_or(0),
                in_flight: s
                    .in_flight
                    .get(service)
                    .into_iter()
                    .flatten()
                    .map(|f| (f.address.clone(), f.count))
                    .collect(),
            })
            .collect()
    }

    /// On a shared store, notes that `service` is asked about here and
    /// adds to `acks` the agents other replicas hold (but `asker`'s node
    /// and those in `acks`); the replicas whose answer is missing, and
    /// how many agents they left out.
    pub(super) fn remote_acks(
        &mut self,
        service: &str,
        asker: &str,
        acks: &mut Vec<NodeAck>,
    ) -> (Vec<String>, u32) {
        let Some(shared) = self.shared.as_mut() else {
            return (Vec::new(), 0);
        };
        let drains = &mut shared.drains;
        drains.asking.insert(service.to_string(), Instant::now());
        let mut replicas: Vec<&String> = drains
            .holders
            .values()
            .filter(|r| **r != drains.replica)
            .collect();
        replicas.sort_unstable();
        replicas.dedup();
        let local: HashSet<String> = acks.iter().map(|a| a.node.clone()).collect();
        let (mut missing, mut more) = (Vec::new(), 0u32);
        for replica in replicas {
            let answer = drains.live.get(service).and_then(|asked| {
                drains
                    .answers
                    .get(service)
                    .and_then(|a| a.get(replica))
                    .filter(|a| a.asked >= *asked)
            });
            let Some(answer) = answer else {
                missing.push(replica.clone());
                continue;
            };
            more = more.saturating_add(answer.more);
            acks.extend(
                answer
                    .nodes
                    .iter()
                    // A node that moved is counted where it is now.
                    .filter(|n| drains.holders.get(&n.node) == Some(replica))
                    .filter(|n| n.node != asker && !local.contains(&n.node))
                    .cloned(),
            );
        }
        (missing, more)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_agent::Agent;
    use super::*;

    fn answer(asked: u64, nodes: &[(&str, u64, u32)]) -> DrainAnswer {
        DrainAnswer {
            asked,
            nodes: nodes
                .iter()
                .map(|(node, acked, in_flight)| NodeAck {
                    node: node.to_string(),
                    acked: *acked,
                    in_flight: if *in_flight > 0 {
                        vec![("198.18.0.1:80".to_string(), *in_flight)]
                    } else {
                        Vec::new()
                    },
                })
                .collect(),
            more: 0,
        }
    }

    fn ask(catalog: &Catalog, agent: &mut Agent, index: u64) -> AckStatus {
        catalog.ack_query(
            agent.session,
            AckQuery {
                query_id: 1,
                service: "web".to_string(),
                min_index: index,
                address: "198.18.0.1:80".to_string(),
            },
        );
        agent.ack_statuses().pop().expect("an ack status")
    }

    #[test]
    fn a_drain_waits_for_every_replica_and_counts_their_agents() {
        let catalog = Catalog::shared();
        catalog.set_replica("r1");
        let mut asker = Agent::attach(&catalog, "a");
        let local = Agent::attach(&catalog, "b");
        catalog.subscribe(local.session, HashMap::from([("web".to_string(), 0)]));
        catalog.ack(
            local.session,
            signpost_proto::Ack {
                service: "web".to_string(),
                index: 50,
                in_flight: Vec::new(),
            },
        );
        for (node, replica) in [("a", "r1"), ("b", "r1"), ("c", "r2"), ("d", "r2")] {
            catalog.store_holder(node, Some(replica));
        }

        // Asked: the question goes to the store; replica 2 has not
        // answered, so the drain is pending on it.
        let first = ask(&catalog, &mut asker, 50);
        assert_eq!(first.subscribers, 2, "{first:?}");
        assert_eq!(first.acked, 1);
        assert_eq!(first.pending, vec!["agents on replica r2 (no answer yet)"]);
        let work = catalog.drain_work(Instant::now());
        assert_eq!(work.puts, vec![("drains/web".to_string(), b"r1".to_vec())]);

        // In the store at revision 60; an answer to an older question
        // does not count.
        catalog.store_drain("web", Some(60));
        catalog.store_drain_answer("web", "r2", Some(answer(59, &[("c", 50, 0)])));
        assert_eq!(ask(&catalog, &mut asker, 50).acked, 1);

        // Replica 2's agents: c applied, d did not and has 2 in flight.
        catalog.store_drain_answer("web", "r2", Some(answer(60, &[("c", 50, 0), ("d", 49, 2)])));
        let s = ask(&catalog, &mut asker, 50);
        assert_eq!((s.subscribers, s.acked), (3, 2), "{s:?}");
        assert_eq!(s.pending, vec!["d"]);
        assert_eq!(s.in_flight.len(), 1);
        assert_eq!(
            (s.in_flight[0].node.as_str(), s.in_flight[0].count),
            ("d", 2)
        );

        // d applied and finished; d then moved to replica 1 (counted
        // there, by its session, once: not twice).
        catalog.store_drain_answer("web", "r2", Some(answer(60, &[("c", 50, 0), ("d", 50, 0)])));
        let s = ask(&catalog, &mut asker, 50);
        assert_eq!((s.subscribers, s.acked), (3, 3));
        assert!(s.in_flight.is_empty());
        catalog.store_holder("d", Some("r1"));
        let s = ask(&catalog, &mut asker, 50);
        assert_eq!((s.subscribers, s.acked), (2, 2), "d is not on r2 any more");
    }

    #[test]
    fn every_replica_answers_a_drain_in_the_store_and_the_question_ends() {
        let catalog = Catalog::shared();
        catalog.set_replica("r2");
        let user = Agent::attach(&catalog, "c");
        catalog.subscribe(user.session, HashMap::from([("web".to_string(), 0)]));
        assert_eq!(catalog.drain_work(Instant::now()), DrainWork::default());

        catalog.store_drain("web", Some(60));
        let work = catalog.drain_work(Instant::now());
        assert_eq!(work.puts.len(), 1);
        let (key, value) = &work.puts[0];
        assert_eq!(key, "drain-acks/web/r2");
        let written: DrainAnswer = serde_json::from_slice(value).unwrap();
        assert_eq!(written.asked, 60);
        assert_eq!(written.nodes.len(), 1);
        assert_eq!(written.nodes[0].node, "c");
        // Once the store has it, nothing more to write until it changes.
        catalog.store_drain_answer("web", "r2", Some(written));
        assert_eq!(catalog.drain_work(Instant::now()), DrainWork::default());
        catalog.ack(
            user.session,
            signpost_proto::Ack {
                service: "web".to_string(),
                index: 61,
                in_flight: Vec::new(),
            },
        );
        assert_eq!(catalog.drain_work(Instant::now()).puts.len(), 1);

        // The drain ends: the answer goes.
        catalog.store_drain("web", None);
        catalog.store_drain_answer("web", "r2", Some(answer(60, &[])));
        let work = catalog.drain_work(Instant::now());
        assert_eq!(work.deletes, vec![("drain-acks/web/r2".to_string(), None)]);
    }

    #[test]
    fn a_question_nobody_repeats_is_taken_back() {
        let catalog = Catalog::shared();
        catalog.set_replica("r1");
        let mut asker = Agent::attach(&catalog, "a");
        ask(&catalog, &mut asker, 0);
        catalog.store_drain("web", Some(60));
        let later = Instant::now() + ASK_HOLD + Duration::from_secs(1);
        let work = catalog.drain_work(later);
        assert!(
            work.deletes
                .contains(&("drains/web".to_string(), Some(b"r1".to_vec()))),
            "{work:?}"
        );
        assert!(work.puts.iter().all(|(k, _)| k != "drains/web"));
    }
}
