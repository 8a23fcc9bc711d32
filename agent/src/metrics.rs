//! The agent's Prometheus metrics (`GET /metrics`, OpenMetrics text).
//!
//! Counters are updated where things happen; gauges that describe the
//! state (services, checks by status) are refreshed from it at scrape time.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use signpost_core::model::Health;

use crate::state::LocalState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    r#type: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    task: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    code: u16,
}

pub struct Metrics {
    registry: Registry,
    probes: Family<ProbeLabels, Counter>,
    status_changes: Family<StatusLabels, Counter>,
    fast_rechecks: Family<OutcomeLabels, Counter>,
    checks: Family<StatusLabels, Gauge>,
    services: Gauge,
    file_errors: Gauge,
    file_loads: Family<OutcomeLabels, Counter>,
    state_writes: Family<OutcomeLabels, Counter>,
    state_corrupt: Counter,
    api_requests: Family<RequestLabels, Counter>,
    sync_connected: Gauge,
    sync_updates: Counter,
    sync_refused: Counter,
    task_restarts: Family<TaskLabels, Counter>,
    acl_resolutions: Family<OutcomeLabels, Counter>,
    acl_refusals: Counter,
    config_reloads: Family<ResultLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// For the parts of the agent that keep their own metrics (DNS).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("signpost_agent");
        let probes = Family::<ProbeLabels, Counter>::default();
        registry.register(
            "check_probes",
            "Probes run by health checks, by check type and result",
            probes.clone(),
        );
        let status_changes = Family::<StatusLabels, Counter>::default();
        registry.register(
            "check_status_changes",
            "Check status changes, by the new status",
            status_changes.clone(),
        );
        let fast_rechecks = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "check_fast_rechecks",
            "Failures of passing checks re-checked at once: confirmed or a blip",
            fast_rechecks.clone(),
        );
        let checks = Family::<StatusLabels, Gauge>::default();
        registry.register("checks", "Registered checks by status", checks.clone());
        let services = Gauge::default();
        registry.register("services", "Registered service instances", services.clone());
        let file_errors = Gauge::default();
        registry.register(
            "service_file_errors",
            "Service files whose current content is refused (their last good version keeps serving)",
            file_errors.clone(),
        );
        let file_loads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "service_file_loads",
            "Service file loads, by outcome",
            file_loads.clone(),
        );
        let state_writes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "state_writes",
            "Writes of the state file in data_dir, by outcome",
            state_writes.clone(),
        );
        let state_corrupt = Counter::default();
        registry.register(
            "state_corrupt",
            "State files found corrupt at start and moved aside",
            state_corrupt.clone(),
        );
        let api_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "api_requests",
            "Local HTTP API requests, by method and status code",
            api_requests.clone(),
        );
        let task_restarts = Family::<TaskLabels, Counter>::default();
        registry.register(
            "task_restarts",
            "Background tasks started again after they stopped, failed or panicked, by task",
            task_restarts.clone(),
        );
        let sync_connected = Gauge::default();
        registry.register(
            "sync_connected",
            "1 while a session with the control plane is open, 0 while serving the last known view",
            sync_connected.clone(),
        );
        let sync_updates = Counter::default();
        registry.register(
            "sync_updates",
            "Service updates received from the control plane (snapshots and deltas)",
            sync_updates.clone(),
        );
        let sync_refused = Counter::default();
        registry.register(
            "sync_refused_instances",
            "Instances in service updates from the control plane that failed the agent's checks and were left out",
            sync_refused.clone(),
        );
        let acl_resolutions = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "acl_token_resolutions",
            "Tokens presented to the local API, by how they were resolved (cached: no round trip; resolved: asked the control plane; down: the control plane could not answer, down_policy decided)",
            acl_resolutions.clone(),
        );
        let acl_refusals = Counter::default();
        registry.register(
            "acl_refusals",
            "Local API requests refused for their token",
            acl_refusals.clone(),
        );
        let config_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Reloads of the configuration file (SIGHUP, PUT /v1/agent/reload): applied, or refused for a bad file",
            config_reloads.clone(),
        );
        Metrics {
            registry,
            config_reloads,
            acl_resolutions,
            acl_refusals,
            sync_connected,
            task_restarts,
            sync_updates,
            sync_refused,
            probes,
            status_changes,
            fast_rechecks,
            checks,
            services,
            file_errors,
            file_loads,
            state_writes,
            state_corrupt,
            api_requests,
        }
    }

    /// The counter of tokens resolved `outcome` (`cached`, `resolved`,
    /// `down`), to keep: the hot path then takes no lock.
    pub fn acl_resolutions(&self, outcome: &'static str) -> Counter {
        self.acl_resolutions
            .get_or_create(&OutcomeLabels { outcome })
            .clone()
    }

    /// A reload of the configuration file, applied or refused.
    pub fn config_reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "refused" };
        self.config_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn acl_refusal(&self) {
        self.acl_refusals.inc();
    }

    pub fn probe(&self, r#type: &'static str, result: Health) {
        self.probes
            .get_or_create(&ProbeLabels {
                r#type,
                result: result.as_str(),
            })
            .inc();
    }

    pub fn status_change(&self, to: Health) {
        self.status_changes
            .get_or_create(&StatusLabels {
                status: to.as_str(),
            })
            .inc();
    }

    pub fn fast_recheck(&self, outcome: &'static str) {
        self.fast_rechecks
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn file_load(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.file_loads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn set_file_errors(&self, n: usize) {
        self.file_errors.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn state_write(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.state_writes
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn state_corrupt(&self) {
        self.state_corrupt.inc();
    }

    pub fn api_request(&self, method: &str, code: u16) {
        self.api_requests
            .get_or_create(&RequestLabels {
                method: method.to_string(),
                code,
            })
            .inc();
    }

    pub fn task_restart(&self, task: &'static str) {
        self.task_restarts.get_or_create(&TaskLabels { task }).inc();
    }

    pub fn sync_connected(&self, connected: bool) {
        self.sync_connected.set(i64::from(connected));
    }

    /// A service update applied, with `refused` of its instances left out.
    pub fn sync_update(&self, refused: usize) {
        self.sync_refused.inc_by(refused as u64);
        self.sync_updates.inc();
    }

    /// Refreshes the state gauges and renders everything.
    pub fn render(&self, state: &LocalState) -> String {
        let (services, counts) = state.read(|inner| {
            let mut counts = [0i64; 3];
            for check in inner.checks.values() {
                counts[check.status as usize] += 1;
            }
            (inner.services.len(), counts)
        });
        self.services
            .set(i64::try_from(services).unwrap_or(i64::MAX));
        for (status, count) in [Health::Passing, Health::Warning, Health::Critical]
            .into_iter()
            .zip(counts)
        {
            self.checks
                .get_or_create(&StatusLabels {
                    status: status.as_str(),
                })
                .set(count);
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}
