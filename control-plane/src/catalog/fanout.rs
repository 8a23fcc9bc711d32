//! Sessions and the fan-out: what each agent subscribed to, the
//! snapshots and deltas sent to subscribers only (queued without waiting
//! on any one agent), acknowledgements, and the service names every agent
//! gets.

use super::*;

/// The most pending nodes (and nodes with requests in flight) an
/// acknowledgement status names.
const MAX_PENDING_NAMED: usize = 100;
/// The most in-flight entries (draining instances) kept per service and
/// session.
const MAX_IN_FLIGHT_ENTRIES: usize = 64;

impl Catalog {
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
                let mut snapshot = inner.snapshot(&service);
                // On a shared store, an agent that comes from another
                // replica may know a later index for the same state (that
                // replica saw the revision that last changed it; this one
                // loaded it): its index must not go backwards.
                if inner.shared.is_some()
                    && let Some(Body::Update(update)) = &mut snapshot.body
                {
                    update.index = update.index.max(known);
                }
                inner.send(session, snapshot);
            }
        }
    }

    /// How many services a session is subscribed to.
    pub fn subscription_count(&self, session: SessionId) -> usize {
        self.lock()
            .sessions
            .get(&session)
            .map_or(0, |s| s.subscriptions.len())
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

    /// Records what a session's agent applied, and what it has in flight
    /// to the service's draining instances (at most
    /// [`MAX_IN_FLIGHT_ENTRIES`] kept).
    pub fn ack(&self, session: SessionId, ack: signpost_proto::Ack) {
        let mut inner = self.lock();
        if let Some(s) = inner.sessions.get_mut(&session) {
            let signpost_proto::Ack {
                service,
                index,
                mut in_flight,
            } = ack;
            in_flight.truncate(MAX_IN_FLIGHT_ENTRIES);
            if in_flight.is_empty() {
                s.in_flight.remove(&service);
            } else if s.subscriptions.contains(&service) {
                s.in_flight.insert(service.clone(), in_flight);
            }
            let acked = s.acked.entry(service).or_default();
            *acked = (*acked).max(index);
        }
    }

    /// How many other agents subscribed to `service` applied `min_index`
    /// (0: the current index), and the nodes of those that did not, up to
    /// [`MAX_PENDING_NAMED`]; with an address, which of them still have
    /// requests or connections in flight to it. Answered to the asking
    /// session. On a shared store the agents on every replica count
    /// (see `drains`).
    pub fn ack_query(&self, session: SessionId, query: AckQuery) {
        let mut inner = self.lock();
        let index = if query.min_index == 0 {
            inner.service_index(&query.service)
        } else {
            query.min_index
        };
        let asker = inner
            .sessions
            .get(&session)
            .map(|s| s.node.clone())
            .unwrap_or_default();
        let mut acks = inner.local_acks(&query.service, Some(session));
        let (missing, more) = inner.remote_acks(&query.service, &asker, &mut acks);
        let mut pending: Vec<String> = acks
            .iter()
            .filter(|a| a.acked < index)
            .map(|a| a.node.clone())
            .collect();
        let acked = acks.len() - pending.len();
        pending.sort_unstable();
        // Agents a replica has not told about yet are pending too.
        pending.extend(
            missing
                .iter()
                .map(|r| format!("agents on replica {r} (no answer yet)")),
        );
        if more > 0 {
            pending.push(format!("{more} more agents"));
        }
        pending.truncate(MAX_PENDING_NAMED);
        let subscribers = acks.len() + missing.len() + usize::try_from(more).unwrap_or(0);
        let mut in_flight: Vec<NodeInFlight> = Vec::new();
        if !query.address.is_empty() {
            for a in &acks {
                let count = a
                    .in_flight
                    .iter()
                    .filter(|(address, _)| *address == query.address)
                    .fold(0u32, |sum, (_, count)| sum.saturating_add(*count));
                if count > 0 {
                    in_flight.push(NodeInFlight {
                        node: a.node.clone(),
                        count,
                    });
                }
            }
            in_flight.sort_unstable_by(|a, b| a.node.cmp(&b.node));
            in_flight.truncate(MAX_PENDING_NAMED);
        }
        let status = ControlMessage {
            body: Some(Body::AckStatus(AckStatus {
                query_id: query.query_id,
                index,
                subscribers: u32::try_from(subscribers).unwrap_or(u32::MAX),
                acked: u32::try_from(acked).unwrap_or(u32::MAX),
                pending,
                in_flight,
            })),
        };
        inner.send(session, status);
    }

    pub fn session_count(&self) -> usize {
        self.lock().sessions.len()
    }
}

impl Inner {
    pub(super) fn drop_session(&mut self, session: SessionId) {
        if let Some(s) = self.sessions.remove(&session) {
            for service in s.subscriptions {
                if let Some(set) = self.subscribers.get_mut(&service) {
                    set.remove(&session);
                }
            }
        }
    }

    /// Queues a message; a session that cannot keep up is dropped.
    pub(super) fn send(&mut self, session: SessionId, message: ControlMessage) {
        let Some(s) = self.sessions.get(&session) else {
            return;
        };
        if let Err(e) = s.tx.try_send(message) {
            let node = s.node.clone();
            match e {
                mpsc::error::TrySendError::Full(_) => {
                    tracing::warn!(node = %node, "agent session too slow to follow changes: dropping it (the agent will resync)");
                    self.stats.sessions_dropped.inc();
                }
                mpsc::error::TrySendError::Closed(_) => {}
            }
            self.drop_session(session);
        }
    }

    pub(super) fn snapshot(&self, service: &str) -> ControlMessage {
        let upserts = self
            .instances_of(service)
            .map(|(n, i)| Self::catalog_instance(&self.protocols, n, i))
            .collect();
        ControlMessage {
            body: Some(Body::Update(ServiceUpdate {
                service: service.to_string(),
                index: self.service_index(service),
                snapshot: self.warm_up_until.is_none(),
                upserts,
                removed: Vec::new(),
            })),
        }
    }

    pub(super) fn names_message(&self) -> ControlMessage {
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
                partial: self.warm_up_until.is_some(),
            })),
        }
    }

    /// Gives each changed service a new index and sends its delta to its
    /// subscribers, and only to them.
    pub(super) fn publish(&mut self, changes: BTreeMap<String, ServiceChange>) {
        let started = Instant::now();
        self.index = match self.revision {
            // Every replica publishes a change of the shared store at its
            // revision: the same index on each.
            Some(revision) => self.index.max(revision),
            None => self.index + 1,
        };
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
        self.stats
            .fanout_seconds
            .observe(started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use signpost_proto::FullState;

    use super::super::test_agent::{Agent, instance};
    use super::*;

    #[test]
    fn changes_go_to_the_subscribers_of_the_service_only() {
        let catalog = Catalog::default();
        let mut web_user = Agent::connect(&catalog, "a");
        let mut db_user = Agent::connect(&catalog, "b");
        let provider = Agent::connect(&catalog, "c");
        catalog.subscribe(web_user.session, HashMap::from([("web".to_string(), 0)]));
        catalog.subscribe(db_user.session, HashMap::from([("db".to_string(), 0)]));
        // Each got its (empty) snapshot.
        let first = web_user.updates();
        assert_eq!(first.len(), 1);
        assert!(first[0].snapshot && first[0].upserts.is_empty());
        assert_eq!(db_user.updates().len(), 1);

        catalog.full_state(
            provider.session,
            FullState {
                instances: vec![instance("web-1", "web")],
                node_checks: Vec::new(),
            },
        );
        let updates = web_user.updates();
        assert_eq!(updates.len(), 1);
        assert!(!updates[0].snapshot, "a delta, not the whole service again");
        assert!(updates[0].index > first[0].index);
        let ids: Vec<_> = updates[0]
            .upserts
            .iter()
            .filter_map(|u| u.instance.as_ref().map(|i| i.id.as_str()))
            .collect();
        assert_eq!(ids, ["web-1"]);
        assert!(db_user.updates().is_empty(), "db did not change");
        assert_eq!(catalog.read(|i| i.subscribers("web")), 1);
    }

    #[test]
    fn an_agent_that_has_the_current_index_gets_no_snapshot_and_unsubscribing_stops_updates() {
        let catalog = Catalog::default();
        let provider = Agent::connect(&catalog, "c");
        catalog.full_state(
            provider.session,
            FullState {
                instances: vec![instance("web-1", "web")],
                node_checks: Vec::new(),
            },
        );
        let index = catalog.read(|i| i.service_index("web"));
        let mut user = Agent::connect(&catalog, "a");
        catalog.subscribe(user.session, HashMap::from([("web".to_string(), index)]));
        assert!(user.updates().is_empty(), "it has this index already");
        assert_eq!(catalog.subscription_count(user.session), 1);
        catalog.unsubscribe(user.session, vec!["web".to_string()]);
        catalog.delta(
            provider.session,
            Delta {
                upserts: vec![instance("web-2", "web")],
                ..Delta::default()
            },
        );
        assert!(user.updates().is_empty(), "unsubscribed");
        assert_eq!(catalog.subscription_count(user.session), 0);
    }
}
