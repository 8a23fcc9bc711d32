//! The agent as one value: local state, check runners, persistence and
//! service-file reports, with the operations the API and the file watcher
//! call. Every registration path goes through here, so the rules (exec
//! allowed or not, which source owns what, when to persist) live once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use signpost_core::config::AgentConfig;
use signpost_core::model::{
    CheckDefinition, CheckId, CheckKind, Health, ModelError, ServiceDefinition, ServiceId,
};
use tokio::sync::Notify;

use crate::checks::{self, Supervisor};
use crate::metrics::Metrics;
use crate::state::{LocalState, RunnerChanges, Source, StateError, StatusChange};

/// Why an operation on the agent was refused.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Invalid(#[from] ModelError),
    #[error(
        "exec checks are disabled on this agent: set `checks.enable_exec: true` in the agent configuration to allow them"
    )]
    ExecDisabled,
}

/// The last load of one service file.
#[derive(Debug, Clone, Default)]
pub struct FileReport {
    /// The services this file currently serves (its last good version).
    pub services: Vec<ServiceId>,
    /// Why the current content was refused, if it was.
    pub error: Option<String>,
}

/// What an API change replaced, to put back when the change cannot be
/// saved: memory stays as it was, as in Consul.
pub(crate) enum Undo {
    /// A service (with its checks), or none.
    Service {
        id: ServiceId,
        before: Option<ServiceDefinition>,
    },
    /// A check registered through the API, or none.
    Check {
        id: CheckId,
        before: Option<CheckDefinition>,
    },
    ServiceMaintenance {
        id: ServiceId,
        before: Option<String>,
    },
    NodeMaintenance {
        before: Option<String>,
    },
}

pub struct Agent {
    /// The configuration the agent started with, for what only a restart
    /// changes. What a reload applies is read from `live` ([`crate::reload`]).
    pub config: AgentConfig,
    /// The configuration in force.
    pub(crate) live: crate::reload::Live,
    pub state: Arc<LocalState>,
    pub metrics: Arc<Metrics>,
    supervisor: Supervisor,
    persist: Notify,
    persist_lazy: Notify,
    files: Mutex<BTreeMap<PathBuf, FileReport>>,
    /// Set once a new process took over (`handover`): `data_dir` is its
    /// now, and this one writes nothing more there.
    handed_over: std::sync::atomic::AtomicBool,
}

impl Agent {
    pub fn new(
        config: AgentConfig,
        state: Arc<LocalState>,
        metrics: Arc<Metrics>,
        supervisor: Supervisor,
    ) -> Self {
        Agent {
            live: crate::reload::Live::new(&config),
            config,
            state,
            metrics,
            supervisor,
            persist: Notify::new(),
            persist_lazy: Notify::new(),
            files: Mutex::new(BTreeMap::new()),
            handed_over: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether a new process took over `data_dir` (see `handover`).
    pub(crate) fn handed_over(&self) -> bool {
        self.handed_over.load(std::sync::atomic::Ordering::Acquire)
    }

    /// From now on `data_dir` is a new process's.
    pub(crate) fn hand_over(&self) {
        self.handed_over
            .store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn register_service(
        &self,
        mut def: ServiceDefinition,
        source: Source,
        replace_existing_checks: bool,
    ) -> Result<(), AgentError> {
        def.validate()?;
        for check in &def.checks {
            self.allowed(check)?;
        }
        let changes = self
            .state
            .register_service(def, source, replace_existing_checks)?;
        self.apply(changes);
        Ok(())
    }

    pub fn deregister_service(&self, id: &ServiceId, source: &Source) -> Result<(), AgentError> {
        let changes = self.state.deregister_service(id, source)?;
        self.apply(changes);
        Ok(())
    }

    /// Deregisters a service whatever its source (critical for too long).
    pub(crate) fn reap_service(&self, id: &ServiceId) {
        let changes = self.state.reap_service(id);
        self.apply(changes);
    }

    pub fn register_check(&self, def: CheckDefinition, source: Source) -> Result<(), AgentError> {
        def.validate()?;
        self.allowed(&def)?;
        let changes = self.state.register_check(def, source)?;
        self.apply(changes);
        Ok(())
    }

    pub fn deregister_check(&self, id: &CheckId, source: &Source) -> Result<(), AgentError> {
        let changes = self.state.deregister_check(id, source)?;
        self.apply(changes);
        Ok(())
    }

    pub fn update_ttl(
        &self,
        id: &CheckId,
        status: Health,
        output: String,
    ) -> Result<(), AgentError> {
        let max = self.state.read(|i| {
            i.checks
                .get(id)
                .and_then(|c| c.definition())
                .map_or(signpost_core::model::DEFAULT_OUTPUT_MAX_SIZE, |d| {
                    d.output_max_size
                })
        });
        let output = checks::truncate_output(output, max);
        match self.state.update_ttl(id, status, output.clone())? {
            Some(change) => {
                self.reported(&change, &output);
                self.persist_soon();
            }
            // A heartbeat only moves the deadline: write it lazily, so a
            // thousand TTL checks do not rewrite the file a thousand times.
            None => self.persist_lazy.notify_one(),
        }
        Ok(())
    }

    pub fn set_service_maintenance(
        &self,
        id: &ServiceId,
        reason: Option<String>,
    ) -> Result<(), AgentError> {
        let enabled = reason.is_some();
        if self.state.set_service_maintenance(id, reason)? {
            tracing::info!(service = %id, enabled, "service maintenance mode changed");
            self.persist_soon();
        }
        Ok(())
    }

    pub fn set_node_maintenance(&self, reason: Option<String>) {
        let enabled = reason.is_some();
        if self.state.set_node_maintenance(reason) {
            tracing::info!(enabled, "node maintenance mode changed");
            self.persist_soon();
        }
    }

    /// What to put back should a change of service `id` not be saved: the
    /// service as registered now (its checks embedded), if any.
    pub(crate) fn undo_service(&self, id: &ServiceId) -> Undo {
        let before = self.state.read(|inner| {
            let entry = inner.services.get(id)?;
            let mut def = entry.def.clone();
            def.checks = inner
                .checks_of(id)
                .filter_map(|c| {
                    let mut check = c.definition()?.clone();
                    check.id = Some(c.id.clone());
                    Some(check)
                })
                .collect();
            Some(def)
        });
        Undo::Service {
            id: id.clone(),
            before,
        }
    }

    /// What to put back should a change of check `id` not be saved.
    pub(crate) fn undo_check(&self, id: &CheckId) -> Undo {
        let before = self.state.read(|inner| {
            let entry = inner.checks.get(id)?;
            let mut def = entry.definition()?.clone();
            def.id = Some(entry.id.clone());
            def.service_id.clone_from(&entry.service_id);
            Some(def)
        });
        Undo::Check {
            id: id.clone(),
            before,
        }
    }

    /// What to put back should a maintenance change (of service `id`, or
    /// of the node) not be saved.
    pub(crate) fn undo_maintenance(&self, service: Option<&ServiceId>) -> Undo {
        let check = service.map_or_else(CheckId::node_maintenance, CheckId::service_maintenance);
        let before = self
            .state
            .read(|inner| inner.checks.get(&check).map(|c| c.notes.clone()));
        match service {
            Some(id) => Undo::ServiceMaintenance {
                id: id.clone(),
                before,
            },
            None => Undo::NodeMaintenance { before },
        }
    }

    /// Puts back what an API change replaced (it could not be saved).
    pub(crate) fn undo(&self, undo: Undo) {
        let restored = match undo {
            Undo::Service { id, before: None } => self.deregister_service(&id, &Source::Api),
            Undo::Service {
                before: Some(def), ..
            } => self.register_service(def, Source::Api, true),
            Undo::Check { id, before: None } => self.deregister_check(&id, &Source::Api),
            Undo::Check {
                before: Some(def), ..
            } => self.register_check(def, Source::Api),
            Undo::ServiceMaintenance { id, before } => self.set_service_maintenance(&id, before),
            Undo::NodeMaintenance { before } => {
                self.set_node_maintenance(before);
                Ok(())
            }
        };
        if let Err(e) = restored {
            tracing::error!(error = %e, "cannot put back what an unsaved change replaced");
        }
    }

    /// Runs the checks with `settings` from now on (a reload).
    pub(crate) fn reconfigure_checks(&self, settings: checks::CheckSettings) {
        self.supervisor.reconfigure(settings);
    }

    pub(crate) async fn stop_checks(&self) {
        self.supervisor.wait().await;
    }

    /// Asks the persister to write the state file soon.
    pub fn persist_soon(&self) {
        self.persist.notify_one();
    }

    /// Waits until a write is asked for; `true` when it may wait a while.
    pub(crate) async fn persist_requested(&self) -> bool {
        tokio::select! {
            _ = self.persist.notified() => false,
            _ = self.persist_lazy.notified() => true,
        }
    }

    pub(crate) async fn persist_urgent(&self) {
        self.persist.notified().await;
    }

    pub fn set_file_report(&self, path: PathBuf, report: Option<FileReport>) {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        match report {
            Some(r) => {
                files.insert(path, r);
            }
            None => {
                files.remove(&path);
            }
        }
        let errors = files.values().filter(|r| r.error.is_some()).count();
        self.metrics.set_file_errors(errors);
    }

    pub fn file_reports(&self) -> BTreeMap<PathBuf, FileReport> {
        self.files.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn allowed(&self, check: &CheckDefinition) -> Result<(), AgentError> {
        if matches!(check.kind, CheckKind::Exec { .. }) && !self.config.checks.enable_exec {
            return Err(AgentError::ExecDisabled);
        }
        Ok(())
    }

    fn apply(&self, changes: RunnerChanges) {
        for id in &changes.stop {
            self.supervisor.stop(id);
        }
        for check in changes.start {
            self.supervisor.start(check);
        }
        self.persist_soon();
    }

    fn reported(&self, change: &StatusChange, output: &str) {
        checks::report_change(&self.metrics, change, output);
    }
}
