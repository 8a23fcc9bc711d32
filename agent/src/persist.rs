//! What survives a restart: services and checks registered through the
//! API, maintenance flags and TTL check status, in `data_dir/state.json`.
//!
//! Writes are atomic (temporary file, fsync, rename, fsync of the
//! directory) and coalesced. A state file that cannot be read is moved
//! aside and reported; the agent starts without it rather than crash-loop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use signpost_core::model::{
    CheckDefinition, CheckId, CheckKind, Health, ServiceDefinition, ServiceId,
};
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::state::{CheckRole, Source};

const STATE_FILE: &str = "state.json";
const FORMAT_VERSION: u32 = 1;
/// Changes within this window are written together.
const COALESCE: Duration = Duration::from_millis(50);
/// TTL heartbeats (which only move a deadline) are written at most this late.
const LAZY: Duration = Duration::from_secs(5);

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    version: u32,
    services: Vec<ServiceDefinition>,
    checks: Vec<CheckDefinition>,
    service_maintenance: BTreeMap<ServiceId, String>,
    node_maintenance: Option<String>,
    ttl: BTreeMap<CheckId, TtlState>,
    /// The other checks' last status, so that a restart does not start
    /// them over (critical, or the status they were defined with).
    #[serde(default)]
    last: BTreeMap<CheckId, LastStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
struct LastStatus {
    status: Health,
    output: String,
    /// When it was saved, in milliseconds since the Unix epoch.
    at_ms: u64,
}

/// A last status older than this is not restored: the check's own runs
/// say more than a status from that long ago.
const LAST_STATUS_FRESH: Duration = Duration::from_secs(600);

#[derive(Debug, Serialize, Deserialize)]
struct TtlState {
    status: Health,
    output: String,
    /// When the TTL runs out, in milliseconds since the Unix epoch.
    expires_at_ms: u64,
}

pub(crate) fn state_path(data_dir: &Path) -> PathBuf {
    data_dir.join(STATE_FILE)
}

/// Builds the snapshot of what must survive a restart.
fn snapshot(agent: &Agent) -> Snapshot {
    let now = Instant::now();
    let wall = SystemTime::now();
    agent.state.read(|inner| {
        let services = inner
            .services
            .values()
            .filter(|s| s.source == Source::Api)
            .map(|s| s.def.clone())
            .collect();
        let mut checks = Vec::new();
        let mut ttl = BTreeMap::new();
        let mut last = BTreeMap::new();
        let saved_at = unix_ms(wall);
        let mut service_maintenance = BTreeMap::new();
        let mut node_maintenance = None;
        for check in inner.checks.values() {
            match &check.role {
                CheckRole::Probe(def) => {
                    if check.source == Source::Api {
                        let mut def = (**def).clone();
                        def.id = Some(check.id.clone());
                        checks.push(def);
                    }
                    if let (CheckKind::Ttl { .. }, Some(deadline)) = (&def.kind, check.ttl_deadline)
                    {
                        let remaining = deadline.saturating_duration_since(now);
                        ttl.insert(
                            check.id.clone(),
                            TtlState {
                                status: check.status,
                                output: check.output.clone(),
                                expires_at_ms: unix_ms(wall + remaining),
                            },
                        );
                    } else if !matches!(def.kind, CheckKind::Ttl { .. }) {
                        last.insert(
                            check.id.clone(),
                            LastStatus {
                                status: check.status,
                                output: check.output.clone(),
                                at_ms: saved_at,
                            },
                        );
                    }
                }
                CheckRole::Maintenance => match &check.service_id {
                    Some(service) => {
                        service_maintenance.insert(service.clone(), check.notes.clone());
                    }
                    // Draining while it stops: in service when it starts.
                    None if check.notes == crate::drain::STOPPING => {}
                    None => node_maintenance = Some(check.notes.clone()),
                },
                CheckRole::NodeHealth => {}
            }
        }
        Snapshot {
            version: FORMAT_VERSION,
            services,
            checks,
            service_maintenance,
            node_maintenance,
            ttl,
            last,
        }
    })
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One writer at a time: the background persister and API flushes take
/// their snapshot and write it in turn, so that an older snapshot never
/// replaces a newer one.
static WRITER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The state file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot save the agent state to {path}: {reason}")]
pub(crate) struct SaveError {
    path: String,
    reason: String,
}

fn write(agent: &Agent) -> Result<(), SaveError> {
    let _writing = WRITER.lock().unwrap_or_else(|e| e.into_inner());
    if agent.handed_over() {
        // The state file is the new process's now.
        return Ok(());
    }
    let path = state_path(&agent.config.data_dir);
    let result = serde_json::to_vec_pretty(&snapshot(agent))
        .map_err(std::io::Error::other)
        .and_then(|bytes| signpost_daemon::fs::write_atomic(&path, &bytes));
    agent.metrics.state_write(result.is_ok());
    result.map_err(|e| SaveError {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Writes the state now: API writes answer 200 only once they are on
/// disk, as Consul's do.
pub(crate) async fn flush(agent: &Arc<Agent>) -> Result<(), SaveError> {
    let a = agent.clone();
    tokio::task::spawn_blocking(move || write(&a))
        .await
        .map_err(|e| SaveError {
            path: state_path(&agent.config.data_dir).display().to_string(),
            reason: format!("the writer failed: {e}"),
        })?
}

/// Writes the state whenever asked, and once more at shutdown.
pub(crate) async fn run(agent: Arc<Agent>, shutdown: CancellationToken) {
    loop {
        let lazy = tokio::select! {
            _ = shutdown.cancelled() => break,
            lazy = agent.persist_requested() => lazy,
        };
        if lazy {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = agent.persist_urgent() => {}
                _ = tokio::time::sleep(LAZY) => {}
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(COALESCE) => {}
        }
        // A failed write is counted; the next change tries again.
        if let Err(e) = flush(&agent).await {
            tracing::error!(error = %e, "cannot write agent state");
        }
    }
    if let Err(e) = write(&agent) {
        tracing::error!(error = %e, "cannot write agent state at shutdown");
    }
}

/// Loads the state file, if any. A corrupt file is moved aside and
/// reported; an unreadable one is an error (the operator must fix it).
pub(crate) fn load(agent: &Agent) -> std::io::Result<()> {
    let path = state_path(&agent.config.data_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let snapshot: Snapshot = match serde_json::from_slice(&bytes) {
        Ok(s) => s,
        Err(e) => {
            let aside = signpost_daemon::fs::move_aside(&path)?;
            agent.metrics.state_corrupt();
            tracing::error!(
                path = %path.display(),
                moved_to = %aside.display(),
                error = %e,
                "agent state file is corrupt: moved it aside and starting without it"
            );
            return Ok(());
        }
    };
    restore(agent, snapshot);
    Ok(())
}

fn restore(agent: &Agent, snapshot: Snapshot) {
    for def in snapshot.services {
        let id = def.id.clone();
        if let Err(e) = agent.register_service(def, Source::Api, false) {
            tracing::warn!(service = %id, error = %e, "cannot restore service registered through the API");
        }
    }
    for def in snapshot.checks {
        let id = def.effective_id();
        // Checks embedded in a restored service are already there.
        if agent.state.read(|i| i.checks.contains_key(&id)) {
            continue;
        }
        if let Err(e) = agent.register_check(def, Source::Api) {
            tracing::warn!(check = %id, error = %e, "cannot restore check registered through the API");
        }
    }
    for (service, reason) in snapshot.service_maintenance {
        if let Err(e) = agent.set_service_maintenance(&service, Some(reason)) {
            tracing::warn!(service = %service, error = %e, "cannot restore maintenance mode");
        }
    }
    if let Some(reason) = snapshot.node_maintenance {
        agent.set_node_maintenance(Some(reason));
    }
    let now_ms = unix_ms(SystemTime::now());
    for (check, ttl) in snapshot.ttl {
        let remaining = Duration::from_millis(ttl.expires_at_ms.saturating_sub(now_ms));
        agent
            .state
            .restore_ttl(&check, ttl.status, ttl.output, remaining);
    }
    let fresh = now_ms.saturating_sub(u64::try_from(LAST_STATUS_FRESH.as_millis()).unwrap_or(0));
    for (check, last) in snapshot.last {
        if last.at_ms >= fresh {
            agent.state.restore_status(&check, last.status, last.output);
        }
    }
}
