//! Health checks run next to the services they check.
//!
//! - [`Supervisor`] owns one task per active check (HTTP, TCP, gRPC, exec)
//!   and restarts or stops them as registrations change.
//! - `runner` turns probe results into a status: thresholds
//!   (`success_before_passing`, `failures_before_*`) and the fast re-check
//!   that confirms a failure of a passing check within a few hundred
//!   milliseconds instead of a whole interval.
//! - `http`, `tcp`, `grpc`, `exec` are the probes; each returns an
//!   [`Outcome`] and never panics on what the service does.

mod exec;
mod grpc;
mod http;
mod runner;
mod tcp;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use signpost_core::model::{CheckDefinition, CheckId, CheckKind, Health};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::state::{LocalState, StartCheck, StatusChange};

pub(crate) use http::HttpClients;

/// The result of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: Health,
    pub output: String,
}

impl Outcome {
    pub(crate) fn new(status: Health, output: impl Into<String>) -> Self {
        Outcome {
            status,
            output: output.into(),
        }
    }
}

/// A ready-to-run probe for one check definition.
pub(crate) enum Probe {
    Http(http::HttpProbe),
    Tcp(tcp::TcpProbe),
    Grpc(grpc::GrpcProbe),
    Exec(exec::ExecProbe),
}

impl Probe {
    /// `None` for TTL checks, which have nothing to probe.
    pub(crate) fn new(def: &CheckDefinition, clients: &HttpClients) -> Option<Self> {
        let timeout = def.effective_timeout();
        let max_output = def.output_max_size;
        Some(match &def.kind {
            CheckKind::Http { .. } => Probe::Http(http::HttpProbe::new(
                &def.kind, timeout, max_output, clients,
            )?),
            CheckKind::Tcp { address } => Probe::Tcp(tcp::TcpProbe::new(address, timeout)),
            CheckKind::Grpc {
                target,
                use_tls,
                tls_skip_verify,
            } => Probe::Grpc(grpc::GrpcProbe::new(
                target,
                *use_tls,
                *tls_skip_verify,
                timeout,
            )),
            CheckKind::Exec { args } => {
                Probe::Exec(exec::ExecProbe::new(args.clone(), timeout, max_output))
            }
            CheckKind::Ttl { .. } => return None,
        })
    }

    pub(crate) async fn run(&self) -> Outcome {
        match self {
            Probe::Http(p) => p.run().await,
            Probe::Tcp(p) => p.run().await,
            Probe::Grpc(p) => p.run().await,
            Probe::Exec(p) => p.run().await,
        }
    }
}

/// How failures of passing checks are confirmed.
#[derive(Debug, Clone, Copy)]
pub struct FastRecheck {
    pub count: u32,
    pub spacing: Duration,
}

/// How the host's checks run.
#[derive(Debug, Clone, Copy)]
pub struct CheckSettings {
    pub recheck: FastRecheck,
    pub http_keep_alive: bool,
}

impl From<&signpost_core::config::ChecksConfig> for CheckSettings {
    fn from(config: &signpost_core::config::ChecksConfig) -> Self {
        CheckSettings {
            recheck: FastRecheck {
                count: config.fast_recheck_count,
                spacing: config.fast_recheck_spacing,
            },
            http_keep_alive: config.http_keep_alive,
        }
    }
}

/// Runs the host's active checks, one task each, on a single-threaded
/// runtime of their own: a thousand checks a second then cost no wake-ups
/// across threads (measured: about 40 % less CPU than on the shared
/// multi-threaded runtime), and they never compete with the API for its
/// workers.
pub struct Supervisor {
    state: Arc<LocalState>,
    metrics: Arc<Metrics>,
    /// What a runner starts with (replaced by [`Supervisor::reconfigure`]).
    current: Mutex<(FastRecheck, HttpClients)>,
    running: Mutex<HashMap<CheckId, CancellationToken>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    runtime: tokio::runtime::Handle,
}

impl Supervisor {
    /// Starts the checks' runtime thread; it ends once `shutdown` fired and
    /// every runner finished.
    pub fn new(
        state: Arc<LocalState>,
        metrics: Arc<Metrics>,
        settings: CheckSettings,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("signpost-checks")
            .build()?;
        let handle = runtime.handle().clone();
        let tracker = TaskTracker::new();
        let (stop, done) = (shutdown.clone(), tracker.clone());
        std::thread::Builder::new()
            .name("signpost-checks".to_string())
            .spawn(move || {
                runtime.block_on(async move {
                    stop.cancelled().await;
                    done.wait().await;
                });
            })?;
        Ok(Supervisor {
            state,
            metrics,
            current: Mutex::new((settings.recheck, HttpClients::new(settings.http_keep_alive))),
            running: Mutex::new(HashMap::new()),
            shutdown,
            tracker,
            runtime: handle,
        })
    }

    /// Starts (or restarts) the runner of a registered check.
    pub fn start(&self, check: StartCheck) {
        let token = self.shutdown.child_token();
        let previous = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(check.id.clone(), token.clone());
        if let Some(previous) = previous {
            previous.cancel();
        }
        if matches!(check.def.kind, CheckKind::Ttl { .. }) {
            return;
        }
        let (recheck, clients) = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (state, metrics) = (self.state.clone(), self.metrics.clone());
        // The probe is built on the checks' runtime, so that what it spawns
        // (a gRPC channel's worker) lives there too. A runner that panics
        // is started again (logged and counted), not lost.
        let supervisor = crate::supervise::supervise(
            "check runner",
            metrics.clone(),
            token.clone(),
            move || {
                let (state, metrics, clients) = (state.clone(), metrics.clone(), clients.clone());
                let (check, token) = (check.clone(), token.clone());
                async move {
                    let Some(probe) = Probe::new(&check.def, &clients) else {
                        // Refused at registration already; nothing to run.
                        token.cancelled().await;
                        return Ok(());
                    };
                    let runner = runner::Runner {
                        state,
                        metrics,
                        recheck,
                        probe,
                        check,
                    };
                    runner.run(token).await;
                    Ok(())
                }
            },
        );
        self.tracker.spawn_on(supervisor, &self.runtime);
    }

    /// Runs every check with `settings` from now on: the running ones
    /// start again (their status stays; their thresholds count afresh).
    pub fn reconfigure(&self, settings: CheckSettings) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) =
            (settings.recheck, HttpClients::new(settings.http_keep_alive));
        // Under the state's lock: a registration changing a check now
        // starts its runner after this, with its own definition.
        self.state.read(|inner| {
            let running: Vec<CheckId> = self
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .cloned()
                .collect();
            for id in running {
                let Some(entry) = inner.checks.get(&id) else {
                    continue;
                };
                if let Some(def) = entry.definition() {
                    self.start(StartCheck {
                        generation: entry.generation,
                        def: def.clone(),
                        id,
                    });
                }
            }
        });
    }

    pub fn stop(&self, id: &CheckId) {
        let token = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        if let Some(token) = token {
            token.cancel();
        }
    }

    /// Waits for every runner to finish after the shutdown token fired.
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Logs and counts a status change, wherever it came from.
pub(crate) fn report_change(metrics: &Metrics, change: &StatusChange, output: &str) {
    metrics.status_change(change.to);
    let service = change.service.as_ref().map(|s| s.as_str()).unwrap_or("");
    if change.to == Health::Passing {
        tracing::info!(check = %change.check, service, from = %change.from, to = %change.to, "check status changed");
    } else {
        tracing::warn!(check = %change.check, service, from = %change.from, to = %change.to, output, "check status changed");
    }
}

/// Keeps at most `max` bytes of `text`, cut on a character boundary.
pub(crate) fn truncate_output(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}
