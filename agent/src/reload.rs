//! Live reload of the agent's configuration. SIGHUP (`systemctl reload`)
//! and `PUT /v1/agent/reload` (`signpost reload`) read the file the agent
//! started from again, parsed and checked as at start: a bad file is
//! refused whole and the configuration in force keeps serving. A good one
//! is compared with it field by field ([`diff`]): what can change while
//! serving is applied without dropping a connection, what cannot is
//! reported (and logged) and waits for the next start.
//!
//! The configuration in force is [`Live`], on a `watch` channel. The proxy
//! follows it (each service's policy, the `upstreams`' VIPs), and blocking
//! queries and the sync read it; the parts that keep their own copy are
//! given theirs here: the DNS server's settings, the checks' runtime, the
//! log filter, and the fleet cache's subscriptions to new `upstreams`.

mod diff;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock, Weak};

use signpost_core::config::{AgentConfig, ConfigError};
use signpost_daemon::logging::{self, Level, LevelError};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::catalog::AgentCatalog;
use crate::checks::CheckSettings;
use crate::fleet::FleetCache;

/// How a running agent is asked to re-read its configuration file.
pub struct Reloading {
    /// The file the configuration was read from.
    pub file: PathBuf,
    /// Notified on every SIGHUP
    /// (`signpost_daemon::signals::reload_on_signal`).
    pub signal: Arc<Notify>,
}

/// The configuration in force, and what re-reading it needs.
pub(crate) struct Live {
    config: watch::Sender<Arc<AgentConfig>>,
    /// The file a reload reads; unset when the configuration was built in
    /// code (`signpost dev`).
    file: OnceLock<PathBuf>,
    /// The DNS server's handler, which keeps its own copy of the `dns`
    /// settings; weak, as it holds the agent.
    dns: OnceLock<Weak<signpost_dns::Handler<AgentCatalog>>>,
    /// One reload at a time: each compares the file with what the previous
    /// one left in force.
    reloading: tokio::sync::Mutex<()>,
}

impl Live {
    pub(crate) fn new(config: &AgentConfig) -> Self {
        Live {
            config: watch::Sender::new(Arc::new(config.clone())),
            file: OnceLock::new(),
            dns: OnceLock::new(),
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    /// The configuration in force: what the agent started with, and what
    /// reloads applied since.
    pub(crate) fn config(&self) -> Arc<AgentConfig> {
        self.config.borrow().clone()
    }

    /// Marked changed by every reload that applies something.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<AgentConfig>> {
        self.config.subscribe()
    }

    /// The DNS server answers with the `dns` settings a reload applies.
    pub(crate) fn serve_dns(&self, handler: &Arc<signpost_dns::Handler<AgentCatalog>>) {
        if self.dns.set(Arc::downgrade(handler)).is_err() {
            tracing::error!("a second DNS server: only the first follows reloads");
        }
    }
}

/// Why a reload was refused; the configuration in force is unchanged.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReloadError {
    #[error(
        "no configuration file to reload: this agent's configuration was built in code (signpost dev)"
    )]
    NoFile,
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    #[error("{}: {source}", path.display())]
    Level { path: PathBuf, source: LevelError },
    #[error("{}: the DNS server cannot take the new dns settings: {source:#}", path.display())]
    Dns {
        path: PathBuf,
        source: anyhow::Error,
    },
}

/// What a reload applied, and what waits for a restart, by YAML path.
#[derive(Debug)]
pub(crate) struct Reloaded {
    pub(crate) applied: Vec<String>,
    pub(crate) restart_required: Vec<String>,
}

impl Reloaded {
    /// The file says what is in force.
    pub(crate) fn unchanged(&self) -> bool {
        self.applied.is_empty() && self.restart_required.is_empty()
    }
}

/// Reads the configuration file again and applies what can change while
/// serving; logged and counted either way.
pub(crate) async fn reload(
    agent: &Agent,
    fleet: Option<&FleetCache>,
) -> Result<Reloaded, ReloadError> {
    let _one_at_a_time = agent.live.reloading.lock().await;
    let reloaded = read_and_apply(agent, fleet).await;
    agent.metrics.config_reload(reloaded.is_ok());
    match &reloaded {
        Ok(r) if r.unchanged() => tracing::info!("configuration reloaded: nothing changed"),
        Ok(r) => {
            tracing::info!(applied = ?r.applied, "configuration reloaded");
            if !r.restart_required.is_empty() {
                tracing::warn!(
                    restart_required = ?r.restart_required,
                    "configuration changes not applied: they take a restart"
                );
            }
        }
        Err(error) => tracing::warn!(
            %error,
            "configuration reload refused: the configuration in force keeps serving"
        ),
    }
    reloaded
}

async fn read_and_apply(
    agent: &Agent,
    fleet: Option<&FleetCache>,
) -> Result<Reloaded, ReloadError> {
    let path = agent.live.file.get().ok_or(ReloadError::NoFile)?;
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| ReloadError::Read {
            path: path.clone(),
            source,
        })?;
    let file = AgentConfig::from_yaml(&path.display().to_string(), &text)?;
    let running = agent.live.config();
    let diff = diff::diff(&running, &file);
    let (dns_changed, checks_changed) = (diff.applies("dns"), diff.applies("checks"));
    let mut applied = diff.applied;
    // What can fail comes first, so that a refusal changes nothing.
    let level = applied
        .iter()
        .any(|p| p == "log.level")
        .then(|| diff.next.log.level.parse::<Level>())
        .transpose()
        .map_err(|source| ReloadError::Level {
            path: path.clone(),
            source,
        })?;
    if dns_changed && let Some(handler) = agent.live.dns.get().and_then(Weak::upgrade) {
        let dns_error = |source| ReloadError::Dns {
            path: path.clone(),
            source,
        };
        let settings = crate::dns::settings(&diff.next).map_err(dns_error)?;
        handler
            .reconfigure(settings)
            .map_err(|e| dns_error(e.into()))?;
    }
    let next = Arc::new(diff.next);
    if !applied.is_empty() {
        agent.live.config.send_replace(next.clone());
    }
    if checks_changed {
        agent.reconfigure_checks(CheckSettings::from(&next.checks));
    }
    if let Some(fleet) = fleet {
        for added in next
            .upstreams
            .iter()
            .filter(|u| !running.upstreams.contains(u))
        {
            fleet.touch(added);
        }
    }
    if let Some(level) = level
        && let Err(error) = logging::set_level(level)
    {
        tracing::warn!(%error, "log.level not applied");
        applied.retain(|p| p != "log.level");
    }
    Ok(Reloaded {
        applied,
        restart_required: diff.restart_required,
    })
}

/// Lets `PUT /v1/agent/reload` read `reloading.file`, and reloads on each
/// of its signals until the agent stops.
pub(crate) fn follow(
    agent: &Arc<Agent>,
    fleet: Option<Arc<FleetCache>>,
    reloading: Reloading,
    background: &mut crate::Background,
) {
    if agent.live.file.set(reloading.file).is_err() {
        tracing::error!("a second configuration file: reloads read the first");
    }
    let (agent, signal) = (agent.clone(), reloading.signal);
    background.spawn("configuration reloads", move |stop| {
        on_signal(agent.clone(), fleet.clone(), signal.clone(), stop)
    });
}

async fn on_signal(
    agent: Arc<Agent>,
    fleet: Option<Arc<FleetCache>>,
    signal: Arc<Notify>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            () = signal.notified() => {
                tracing::info!("SIGHUP: reloading the configuration");
                // Logged and counted by `reload`; the agent serves on.
                if let Err(error) = reload(&agent, fleet.as_deref()).await {
                    tracing::debug!(%error, "the reload asked for by SIGHUP was refused");
                }
            }
            () = stop.cancelled() => return Ok(()),
        }
    }
}
