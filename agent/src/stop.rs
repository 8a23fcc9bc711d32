//! How the agent stops. The shutdown (SIGTERM, Ctrl-C, or a handover) is
//! one of three:
//! - a handover (`signpost restart`, SIGUSR2): the new process serves
//!   from the same sockets already; this one stops at once and lets its
//!   connections finish (`drain_timeout`);
//! - a restart by systemd (`systemctl restart`) whose file descriptor
//!   store holds every listening socket (see `systemd::jobs`): the
//!   sockets stay open in systemd, so new connections and queries wait in
//!   the kernel's queues for the next process, which systemd starts only
//!   once this one has exited. The node is not drained (its instances are
//!   not going away); this one stops accepting, its HTTP clients get
//!   `Connection: close` as after a handover, DNS answers until the end,
//!   and L4 connections get [`RESTART_L4_GRACE`] at most;
//! - a stop for good (`systemctl stop`, or anything not known to be a
//!   restart): the node's instances are drained first (`drain::node`),
//!   then connections get up to `drain_timeout`.
//!
//! Then what serves is drained and the state written ([`until_shutdown`]).

use std::sync::Arc;
use std::time::Duration;

use signpost_core::sockets::Sockets;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::agent::Agent;
use crate::fleet::FleetCache;
use crate::systemd::FdStore;
use crate::systemd::jobs::{self, Stopping};
use crate::{Background, SHUTDOWN_GRACE, Serving, drain};

/// How long the proxy's connections may run on when systemd restarts the
/// agent (at most `drain_timeout`): HTTP requests in flight, and L4
/// connections (a Redis subscription, a tunnel), which are cut then. The
/// next process starts only once this one has exited, so every second
/// here is a second new connections wait in the queue while one of
/// those is open, and a long-lived connection would not end within any
/// grace short enough. To keep them, restart with `signpost restart` (or
/// SIGUSR2) instead.
pub(crate) const RESTART_L4_GRACE: Duration = Duration::from_secs(3);

/// What the shutdown fires, and when.
pub(crate) struct Signals {
    /// Serving stops: accept loops stop, HTTP connections close after
    /// their answers, L4 connections get the grace.
    pub(crate) serving: CancellationToken,
    /// DNS stops: with `serving`, except on a restart by systemd where it
    /// answers until everything else has stopped.
    pub(crate) dns: CancellationToken,
    /// How long L4 connections get once serving stops.
    pub(crate) grace: watch::Sender<Duration>,
}

/// What the agent needs to decide how it stops.
pub(crate) struct Context {
    pub(crate) agent: Arc<Agent>,
    pub(crate) fleet: Option<Arc<FleetCache>>,
    pub(crate) sockets: Arc<Sockets>,
    pub(crate) store: Option<Arc<FdStore>>,
}

/// On `shutdown`: finds out which stop it is, drains the node when it
/// is a stop for good, then fires `signals`.
pub(crate) fn on_shutdown(context: Context, shutdown: CancellationToken, signals: Signals) {
    let stop = async move {
        shutdown.cancelled().await;
        let Context {
            agent,
            fleet,
            sockets,
            store,
        } = context;
        if agent.handed_over() {
            signals.serving.cancel();
            signals.dns.cancel();
            return;
        }
        let stopping = match store.filter(|s| s.used()) {
            Some(_) => jobs::stopping(sockets.served()).await,
            None => Stopping::Stop {
                why: "no systemd file descriptor store keeps the listening sockets".to_string(),
            },
        };
        match stopping {
            Stopping::Restart { unit, stored } => {
                let grace = RESTART_L4_GRACE.min(agent.config.drain_timeout);
                tracing::info!(
                    %unit,
                    stored,
                    l4_grace = %signpost_core::duration::format(grace),
                    "systemd restarts the agent and keeps its listening sockets: not draining the node; new connections and queries wait for the next process, HTTP clients are told to close, requests in flight and L4 connections get the grace at most"
                );
                signals.grace.send_replace(grace);
                signals.serving.cancel();
                // DNS stops last (`until_shutdown`).
            }
            Stopping::Stop { why } => {
                tracing::info!(reason = %why, "stopping for good, not for a restart by systemd: this node's instances are drained first");
                if let Some(fleet) = fleet {
                    drain::node(&agent, &fleet, agent.config.drain_timeout).await;
                }
                signals.serving.cancel();
                signals.dns.cancel();
            }
        }
    };
    tokio::spawn(stop.instrument(tracing::info_span!("stop")));
}

/// Waits for `stopping` (the shutdown, once this node's instances are
/// drained), or for a serving part to stop first: the agent
/// cannot serve without it, so that stops the agent loudly (systemd starts
/// it again) rather than leaving the host without its DNS, proxy or API.
/// Then stops the checks and the background tasks (the stream to the
/// control plane, the state writers, which write the state one last time
/// unless a new process took over), and gives what is in flight up to
/// `drain_timeout` (the API up to [`SHUTDOWN_GRACE`]); DNS, when it still
/// answers, stops once nothing else serves. Returns why it stopped early,
/// if it did.
pub(crate) async fn until_shutdown(
    mut serving: Serving,
    shutdown: &CancellationToken,
    stopping: &CancellationToken,
    dns: &CancellationToken,
    agent: &Agent,
    background: Background,
) -> Option<String> {
    let stopped_early = tokio::select! {
        biased;
        () = stopping.cancelled() => None,
        // Ending because of the shutdown (the select saw it first) is not
        // ending early.
        Some(ended) = serving.join_next() => (!stopping.is_cancelled()).then(|| match ended {
            Ok((what, Ok(()))) => format!("{what} stopped"),
            Ok((what, Err(e))) => format!("{what} failed: {e}"),
            Err(e) => format!("a serving task failed: {e}"),
        }),
    };
    if let Some(why) = &stopped_early {
        tracing::error!(error = %why, "the agent cannot serve without it: stopping");
        shutdown.cancel();
        stopping.cancel();
    }
    tracing::info!(
        handed_over = agent.handed_over(),
        drain_timeout = %signpost_core::duration::format(agent.config.drain_timeout),
        "shutting down: finishing in-flight requests and connections"
    );
    agent.stop_checks().await;
    background.stop().await;
    let limit = agent.config.drain_timeout.max(SHUTDOWN_GRACE) + Duration::from_secs(5);
    let drained = tokio::time::timeout(limit, async {
        loop {
            // The last one left is DNS, if it still answers: nothing else
            // needs it now.
            if serving.len() <= 1 {
                dns.cancel();
            }
            let Some(ended) = serving.join_next().await else {
                break;
            };
            match ended {
                Ok((_, Ok(()))) => {}
                Ok((what, Err(e))) => tracing::error!(error = %e, "{what} failed"),
                Err(e) => tracing::error!(error = %e, "serving task failed"),
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("in-flight requests and connections did not finish in time");
    }
    stopped_early
}
