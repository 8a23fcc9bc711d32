//! The host's local state: its services, their checks and the node's own
//! checks, with the modification indexes blocking queries wait on.
//!
//! One lock guards the maps; it is never held across an `.await` or any
//! I/O. Every change that readers could notice bumps the global index and
//! publishes it on a `watch` channel, which is how blocking queries, the
//! sync, DNS and the proxy learn that something changed. Output-only
//! updates of a check whose status is steady are visible to readers but do
//! not bump an index, as in Consul.
//!
//! Indexes come from the agent's one [`IndexClock`], which the fleet view
//! draws from too: an answer made of local and remote instances carries
//! the larger of their indexes, and that grows whenever either part
//! changes, whatever the control plane's own indexes do (a restart, a
//! fail-over).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use signpost_core::model::{
    CheckDefinition, CheckId, CheckKind, Health, ServiceDefinition, ServiceId, ServiceName,
};
use tokio::sync::watch;

mod inner;

/// Where a registration came from; only its owner may change or remove it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file in `services_dir`.
    File(PathBuf),
    /// The local HTTP API (persisted in `data_dir`).
    Api,
}

impl Source {
    pub fn describe(&self) -> String {
        match self {
            Source::File(path) => format!("file {}", path.display()),
            Source::Api => "the HTTP API".to_string(),
        }
    }
}

/// A registration the state refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("service id \"{id}\" is already defined by {owner}")]
    ServiceOwned { id: ServiceId, owner: String },
    #[error("check id \"{id}\" is already defined by {owner}")]
    CheckOwned { id: CheckId, owner: String },
    #[error("ServiceID \"{0}\" does not exist")]
    UnknownServiceForCheck(ServiceId),
    #[error(
        "Unknown service ID \"{0}\". Ensure that the service ID is passed, not the service name."
    )]
    UnknownService(ServiceId),
    #[error("Unknown check ID \"{0}\". Ensure that the check ID is passed, not the check name.")]
    UnknownCheck(CheckId),
    #[error("CheckID \"{0}\" does not have associated TTL")]
    NotTtl(CheckId),
}

/// A registered service instance.
#[derive(Debug, Clone)]
pub struct ServiceEntry {
    /// The definition without its checks (they live in the check map).
    pub def: ServiceDefinition,
    pub source: Source,
    pub create_index: u64,
    pub modify_index: u64,
}

/// What a check entry is: a probe the agent runs, or a maintenance marker.
#[derive(Debug, Clone)]
pub enum CheckRole {
    Probe(Box<CheckDefinition>),
    Maintenance,
    /// The node's liveness as the cluster sees it (Consul's `serfHealth`).
    NodeHealth,
}

#[derive(Debug, Clone)]
pub struct CheckEntry {
    pub id: CheckId,
    pub name: String,
    pub notes: String,
    pub service_id: Option<ServiceId>,
    pub role: CheckRole,
    pub status: Health,
    pub output: String,
    pub source: Source,
    pub create_index: u64,
    pub modify_index: u64,
    /// Distinguishes successive registrations of the same id, so that a
    /// runner of a replaced definition cannot report into its successor.
    pub generation: u64,
    pub critical_since: Option<Instant>,
    pub ttl_deadline: Option<Instant>,
}

impl CheckEntry {
    pub fn definition(&self) -> Option<&CheckDefinition> {
        match &self.role {
            CheckRole::Probe(def) => Some(def),
            _ => None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match &self.role {
            CheckRole::Probe(def) => def.kind.type_name(),
            CheckRole::Maintenance => "maintenance",
            CheckRole::NodeHealth => "serf",
        }
    }
}

/// A check the supervisor should (re)start because it was registered.
#[derive(Debug, Clone)]
pub struct StartCheck {
    pub id: CheckId,
    pub generation: u64,
    pub def: CheckDefinition,
}

/// What a mutation means for the check runners.
#[derive(Debug, Default)]
pub struct RunnerChanges {
    pub start: Vec<StartCheck>,
    pub stop: Vec<CheckId>,
}

impl RunnerChanges {
    fn merge(&mut self, other: RunnerChanges) {
        self.start.extend(other.start);
        self.stop.extend(other.stop);
    }
}

/// Facts about the node itself.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub id: String,
    pub address: String,
    pub datacenter: String,
    pub zone: String,
    pub meta: BTreeMap<String, String>,
    /// This host takes part in the mesh (`mesh.enabled`).
    pub mesh: bool,
    /// Services that say nothing are meshed (`mesh.connect_by_default`).
    pub connect_by_default: bool,
}

impl NodeInfo {
    /// Whether `def` is meshed on this host.
    pub fn meshed(&self, def: &ServiceDefinition) -> bool {
        self.mesh && def.connect.unwrap_or(self.connect_by_default)
    }
}

pub const NODE_HEALTH_CHECK: &str = "serfHealth";

/// The agent's one source of modification indexes; each is greater than
/// every one handed out before.
#[derive(Debug)]
pub struct IndexClock(AtomicU64);

impl Default for IndexClock {
    /// A clock whose first index is 2: 1 is what an unchanged resource has.
    fn default() -> IndexClock {
        IndexClock(AtomicU64::new(1))
    }
}

impl IndexClock {
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

pub struct Inner {
    pub node: NodeInfo,
    /// The highest index handed out; never 0.
    pub index: u64,
    pub node_create_index: u64,
    pub services: BTreeMap<ServiceId, ServiceEntry>,
    pub checks: BTreeMap<CheckId, CheckEntry>,
    /// Last index at which anything about a service name changed; kept for
    /// names that are gone, so a watcher of a deleted service wakes once.
    name_index: HashMap<ServiceName, u64>,
    next_generation: u64,
    clock: std::sync::Arc<IndexClock>,
}

pub struct LocalState {
    inner: Mutex<Inner>,
    changes: watch::Sender<u64>,
    /// The last index published on `changes`, for lock-free readers (DNS
    /// reads it for every query).
    published: AtomicU64,
}

/// A status change, for logs and metrics.
#[derive(Debug, Clone)]
pub struct StatusChange {
    pub check: CheckId,
    pub service: Option<ServiceId>,
    pub from: Health,
    pub to: Health,
}

impl LocalState {
    pub fn new(node: NodeInfo) -> Self {
        let mut checks = BTreeMap::new();
        let id = CheckId::new(NODE_HEALTH_CHECK);
        checks.insert(
            id.clone(),
            CheckEntry {
                id,
                name: "Serf Health Status".to_string(),
                notes: String::new(),
                service_id: None,
                role: CheckRole::NodeHealth,
                status: Health::Passing,
                output: "Agent alive and reachable".to_string(),
                source: Source::Api,
                create_index: 1,
                modify_index: 1,
                generation: 0,
                critical_since: None,
                ttl_deadline: None,
            },
        );
        let (changes, _) = watch::channel(1);
        LocalState {
            inner: Mutex::new(Inner {
                node,
                index: 1,
                node_create_index: 1,
                services: BTreeMap::new(),
                checks,
                name_index: HashMap::new(),
                next_generation: 1,
                clock: std::sync::Arc::default(),
            }),
            changes,
            published: AtomicU64::new(1),
        }
    }

    /// Read access for answering queries; keep the closure free of I/O.
    pub fn read<R>(&self, f: impl FnOnce(&Inner) -> R) -> R {
        f(&self.lock())
    }

    /// The clock local changes take their indexes from, for the fleet view.
    pub fn clock(&self) -> std::sync::Arc<IndexClock> {
        self.lock().clock.clone()
    }

    /// The global index, without taking any lock.
    pub fn index(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    /// A receiver of the global index, woken on every indexed change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves maps that are still
        // consistent (every mutation is a few inserts), so keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mutate<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut inner = self.lock();
        let before = inner.index;
        let out = f(&mut inner);
        let after = inner.index;
        drop(inner);
        if after != before {
            self.published.store(after, Ordering::Release);
            self.changes.send_replace(after);
        }
        out
    }

    /// Registers (or replaces) a service and its checks.
    ///
    /// `replace_existing_checks` removes the service's checks the new
    /// definition does not list; otherwise they stay, as in Consul.
    pub fn register_service(
        &self,
        mut def: ServiceDefinition,
        source: Source,
        replace_existing_checks: bool,
    ) -> Result<RunnerChanges, StateError> {
        self.mutate(|inner| {
            if let Some(existing) = inner.services.get(&def.id)
                && existing.source != source
            {
                return Err(StateError::ServiceOwned {
                    id: def.id.clone(),
                    owner: existing.source.describe(),
                });
            }
            let new_checks = std::mem::take(&mut def.checks);
            for check in &new_checks {
                let id = check.effective_id();
                if let Some(existing) = inner.checks.get(&id)
                    && (existing.source != source || existing.service_id.as_ref() != Some(&def.id))
                {
                    return Err(StateError::CheckOwned {
                        id,
                        owner: existing.source.describe(),
                    });
                }
            }
            let index = inner.bump();
            let mut changes = RunnerChanges::default();
            if let Some(old) = inner.services.get(&def.id)
                && old.def.name != def.name
            {
                let old_name = old.def.name.clone();
                inner.name_index.insert(old_name, index);
            }
            let create_index = inner
                .services
                .get(&def.id)
                .map(|s| s.create_index)
                .unwrap_or(index);
            inner.name_index.insert(def.name.clone(), index);
            let service_id = def.id.clone();
            inner.services.insert(
                service_id.clone(),
                ServiceEntry {
                    def,
                    source: source.clone(),
                    create_index,
                    modify_index: index,
                },
            );
            if replace_existing_checks {
                let keep: Vec<CheckId> = new_checks.iter().map(|c| c.effective_id()).collect();
                let stale: Vec<CheckId> = inner
                    .checks
                    .values()
                    .filter(|c| {
                        c.service_id.as_ref() == Some(&service_id)
                            && matches!(c.role, CheckRole::Probe(_))
                            && !keep.contains(&c.id)
                    })
                    .map(|c| c.id.clone())
                    .collect();
                for id in stale {
                    inner.checks.remove(&id);
                    changes.stop.push(id);
                }
            }
            for check in new_checks {
                changes.merge(inner.put_check(check, source.clone(), index));
            }
            // Tags and names feed the checks' ServiceName/ServiceTags.
            for check in inner.checks.values_mut() {
                if check.service_id.as_ref() == Some(&service_id) {
                    check.modify_index = check.modify_index.max(index);
                }
            }
            Ok(changes)
        })
    }

    /// Removes a service and every check bound to it. Unknown ids are a
    /// no-op, as in Consul.
    pub fn deregister_service(
        &self,
        id: &ServiceId,
        source: &Source,
    ) -> Result<RunnerChanges, StateError> {
        self.mutate(|inner| {
            let Some(existing) = inner.services.get(id) else {
                return Err(StateError::UnknownService(id.clone()));
            };
            if &existing.source != source {
                return Err(StateError::ServiceOwned {
                    id: id.clone(),
                    owner: existing.source.describe(),
                });
            }
            Ok(inner.remove_service(id))
        })
    }

    /// Removes a service whatever its source (the critical-check reaper).
    pub fn reap_service(&self, id: &ServiceId) -> RunnerChanges {
        self.mutate(|inner| {
            if inner.services.contains_key(id) {
                inner.remove_service(id)
            } else {
                RunnerChanges::default()
            }
        })
    }

    /// Registers a standalone check (bound to a service or to the node).
    pub fn register_check(
        &self,
        def: CheckDefinition,
        source: Source,
    ) -> Result<RunnerChanges, StateError> {
        self.mutate(|inner| {
            if let Some(service) = &def.service_id
                && !inner.services.contains_key(service)
            {
                return Err(StateError::UnknownServiceForCheck(service.clone()));
            }
            let id = def.effective_id();
            if let Some(existing) = inner.checks.get(&id)
                && (existing.source != source || !matches!(existing.role, CheckRole::Probe(_)))
            {
                return Err(StateError::CheckOwned {
                    id,
                    owner: existing.source.describe(),
                });
            }
            let index = inner.bump();
            Ok(inner.put_check(def, source, index))
        })
    }

    pub fn deregister_check(
        &self,
        id: &CheckId,
        source: &Source,
    ) -> Result<RunnerChanges, StateError> {
        self.mutate(|inner| {
            let Some(existing) = inner.checks.get(id) else {
                return Err(StateError::UnknownCheck(id.clone()));
            };
            if !matches!(existing.role, CheckRole::Probe(_)) || &existing.source != source {
                return Err(StateError::CheckOwned {
                    id: id.clone(),
                    owner: existing.source.describe(),
                });
            }
            let index = inner.bump();
            if let Some(removed) = inner.checks.remove(id) {
                inner.touch_service_of(removed.service_id.as_ref(), index);
            }
            Ok(RunnerChanges {
                start: vec![],
                stop: vec![id.clone()],
            })
        })
    }

    /// Records a probe result from a check runner. Returns the change of
    /// status, if any; stale generations are ignored.
    pub fn record_result(
        &self,
        id: &CheckId,
        generation: u64,
        status: Health,
        output: String,
    ) -> Option<StatusChange> {
        self.mutate(|inner| {
            let entry = inner.checks.get(id)?;
            if entry.generation != generation {
                return None;
            }
            inner.set_status(id, status, output)
        })
    }

    /// A TTL update from the application (`/v1/agent/check/pass|warn|fail|update`).
    pub fn update_ttl(
        &self,
        id: &CheckId,
        status: Health,
        output: String,
    ) -> Result<Option<StatusChange>, StateError> {
        self.mutate(|inner| {
            let Some(entry) = inner.checks.get_mut(id) else {
                return Err(StateError::UnknownCheck(id.clone()));
            };
            let ttl = match entry.definition().map(|d| &d.kind) {
                Some(CheckKind::Ttl { ttl }) => *ttl,
                _ => return Err(StateError::NotTtl(id.clone())),
            };
            // None (beyond the clock's range): it never expires.
            entry.ttl_deadline = Instant::now().checked_add(ttl);
            Ok(inner.set_status(id, status, output))
        })
    }

    /// Turns TTL checks whose deadline passed critical. Returns the changes
    /// and the next deadline to wake up for.
    pub fn expire_ttls(&self, now: Instant) -> (Vec<StatusChange>, Option<Instant>) {
        self.mutate(|inner| {
            let expired: Vec<CheckId> = inner
                .checks
                .values()
                .filter(|c| c.ttl_deadline.is_some_and(|d| d <= now))
                .map(|c| c.id.clone())
                .collect();
            let mut changes = Vec::new();
            for id in expired {
                let Some(entry) = inner.checks.get_mut(&id) else {
                    continue;
                };
                entry.ttl_deadline = None;
                let output = if entry.output.is_empty() {
                    "TTL expired".to_string()
                } else {
                    format!(
                        "TTL expired (last output before timeout follows): {}",
                        entry.output
                    )
                };
                if let Some(change) = inner.set_status(&id, Health::Critical, output) {
                    changes.push(change);
                }
            }
            let next = inner.checks.values().filter_map(|c| c.ttl_deadline).min();
            (changes, next)
        })
    }

    /// Services whose check has been critical for longer than its
    /// `deregister_critical_after`, and the next time to look again.
    pub fn critical_too_long(&self, now: Instant) -> (Vec<(ServiceId, CheckId)>, Option<Instant>) {
        self.read(|inner| {
            let mut due = Vec::new();
            let mut next: Option<Instant> = None;
            for check in inner.checks.values() {
                let (Some(since), Some(service), Some(def)) =
                    (check.critical_since, &check.service_id, check.definition())
                else {
                    continue;
                };
                let Some(after) = def.deregister_critical_after else {
                    continue;
                };
                // A deadline beyond the clock's range is never reached.
                let Some(at) = since.checked_add(after) else {
                    continue;
                };
                if at <= now {
                    due.push((service.clone(), check.id.clone()));
                } else {
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
            }
            (due, next)
        })
    }

    /// Puts a service in (or out of) maintenance mode.
    pub fn set_service_maintenance(
        &self,
        id: &ServiceId,
        reason: Option<String>,
    ) -> Result<bool, StateError> {
        self.mutate(|inner| {
            if !inner.services.contains_key(id) {
                return Err(StateError::UnknownService(id.clone()));
            }
            let check = CheckId::service_maintenance(id);
            Ok(inner.set_maintenance(
                check,
                Some(id.clone()),
                reason.map(|r| {
                    if r.is_empty() {
                        "Maintenance mode is enabled for this service, but no reason was provided. This is a default message.".to_string()
                    } else {
                        r
                    }
                }),
                "Service Maintenance Mode",
            ))
        })
    }

    /// Puts the whole node in (or out of) maintenance mode.
    pub fn set_node_maintenance(&self, reason: Option<String>) -> bool {
        self.mutate(|inner| {
            inner.set_maintenance(
                CheckId::node_maintenance(),
                None,
                reason.map(|r| {
                    if r.is_empty() {
                        "Maintenance mode is enabled for this node, but no reason was provided. This is a default message.".to_string()
                    } else {
                        r
                    }
                }),
                "Node Maintenance Mode",
            )
        })
    }

    /// Restores a persisted TTL status, with its remaining time.
    pub fn restore_ttl(&self, id: &CheckId, status: Health, output: String, remaining: Duration) {
        self.mutate(|inner| {
            if let Some(entry) = inner.checks.get_mut(id)
                && matches!(
                    entry.definition().map(|d| &d.kind),
                    Some(CheckKind::Ttl { .. })
                )
            {
                entry.ttl_deadline = Instant::now().checked_add(remaining);
                inner.set_status(id, status, output);
            }
        });
    }

    /// Sets a probed check's status as the last run before a restart
    /// left it (see `persist`), until its own runs say otherwise.
    pub fn restore_status(&self, id: &CheckId, status: Health, output: String) {
        self.mutate(|inner| {
            if inner.checks.get(id).and_then(|e| e.definition()).is_some() {
                inner.set_status(id, status, output);
            }
        });
    }
}

// === impl Inner ===

#[cfg(test)]
mod tests {
    use super::*;
    use signpost_core::model::{Protocol, Weights};

    fn node() -> NodeInfo {
        NodeInfo {
            name: "n1".into(),
            id: "id".into(),
            address: "127.0.0.1".into(),
            datacenter: "dc1".into(),
            zone: "a".into(),
            meta: BTreeMap::new(),
            mesh: true,
            connect_by_default: false,
        }
    }

    fn web(id: &str, checks: Vec<CheckDefinition>) -> ServiceDefinition {
        let mut def = ServiceDefinition {
            id: id.into(),
            name: "web".into(),
            address: String::new(),
            port: 80,
            tags: vec![],
            meta: BTreeMap::new(),
            tagged_addresses: BTreeMap::new(),
            zone: None,
            weights: Weights::default(),
            protocol: Protocol::Http,
            enable_tag_override: false,
            checks,
            connect: None,
            drain: None,
        };
        def.validate().unwrap();
        def
    }

    fn ttl() -> CheckDefinition {
        CheckDefinition::new(
            CheckKind::Ttl {
                ttl: Duration::from_secs(30),
            },
            Duration::ZERO,
        )
    }

    #[test]
    fn indexes_move_per_service_name() {
        let state = LocalState::new(node());
        state
            .register_service(web("web-1", vec![ttl()]), Source::Api, false)
            .unwrap();
        let web_index = state.read(|i| i.service_name_index("web"));
        assert!(web_index > 1);
        assert_eq!(state.read(|i| i.service_name_index("db")), 1);
        let change = state
            .update_ttl(&"service:web-1".into(), Health::Passing, "ok".into())
            .unwrap();
        assert_eq!(change.map(|c| c.to), Some(Health::Passing));
        assert!(state.read(|i| i.service_name_index("web")) > web_index);
        // Output-only updates do not move the index.
        let before = state.read(|i| i.index);
        state
            .update_ttl(&"service:web-1".into(), Health::Passing, "still ok".into())
            .unwrap();
        assert_eq!(state.read(|i| i.index), before);
    }

    #[test]
    fn other_sources_cannot_take_over_a_service() {
        let state = LocalState::new(node());
        state
            .register_service(web("web-1", vec![]), Source::File("a.yaml".into()), false)
            .unwrap();
        let err = state
            .register_service(web("web-1", vec![]), Source::Api, false)
            .unwrap_err();
        assert!(err.to_string().contains("a.yaml"), "{err}");
        assert!(
            state
                .deregister_service(&"web-1".into(), &Source::Api)
                .is_err()
        );
    }

    #[test]
    fn maintenance_makes_the_service_critical_and_back() {
        let state = LocalState::new(node());
        let mut check = ttl();
        check.initial_status = Some(Health::Passing);
        state
            .register_service(web("web-1", vec![check]), Source::Api, false)
            .unwrap();
        assert_eq!(
            state.read(|i| i.service_health(&"web-1".into())),
            Health::Passing
        );
        state
            .set_service_maintenance(&"web-1".into(), Some(String::new()))
            .unwrap();
        assert_eq!(
            state.read(|i| i.service_health(&"web-1".into())),
            Health::Critical
        );
        state
            .set_service_maintenance(&"web-1".into(), None)
            .unwrap();
        assert_eq!(
            state.read(|i| i.service_health(&"web-1".into())),
            Health::Passing
        );
        assert!(state.set_node_maintenance(Some("kernel upgrade".into())));
        assert_eq!(
            state.read(|i| i.service_health(&"web-1".into())),
            Health::Critical
        );
    }

    #[test]
    fn ttl_expiry_turns_critical_with_consul_output() {
        let state = LocalState::new(node());
        state
            .register_service(web("web-1", vec![ttl()]), Source::Api, false)
            .unwrap();
        state
            .update_ttl(&"service:web-1".into(), Health::Passing, "fine".into())
            .unwrap();
        let (changes, _) = state.expire_ttls(Instant::now() + Duration::from_secs(31));
        assert_eq!(changes.len(), 1);
        let output = state.read(|i| i.checks[&CheckId::new("service:web-1")].output.clone());
        assert_eq!(
            output,
            "TTL expired (last output before timeout follows): fine"
        );
    }

    #[test]
    fn replace_existing_checks_removes_unlisted_ones() {
        let state = LocalState::new(node());
        let mut a = ttl();
        a.id = Some("a".into());
        let mut b = ttl();
        b.id = Some("b".into());
        state
            .register_service(web("web-1", vec![a.clone(), b]), Source::Api, false)
            .unwrap();
        let changes = state
            .register_service(web("web-1", vec![a.clone()]), Source::Api, true)
            .unwrap();
        assert_eq!(changes.stop.iter().filter(|c| c.as_str() == "b").count(), 1);
        assert!(state.read(|i| !i.checks.contains_key("b")));
        let changes = state
            .register_service(web("web-1", vec![]), Source::Api, false)
            .unwrap();
        assert!(changes.stop.is_empty());
        assert!(state.read(|i| i.checks.contains_key("a")));
    }
}
