//! Time-driven state changes: TTL checks that were not refreshed in time
//! turn critical ("TTL expired"), and services whose check stayed critical
//! longer than `deregister_critical_after` are deregistered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::checks::report_change;

/// Longest sleep between two looks, in case a deadline moved earlier
/// without an index change.
const MAX_SLEEP: Duration = Duration::from_secs(5);

pub(crate) async fn run(agent: Arc<Agent>, shutdown: CancellationToken) {
    let mut changes = agent.state.subscribe();
    loop {
        let now = Instant::now();
        let (expired, next_ttl) = agent.state.expire_ttls(now);
        for change in &expired {
            let output = agent.state.read(|i| {
                i.checks
                    .get(&change.check)
                    .map(|c| c.output.clone())
                    .unwrap_or_default()
            });
            report_change(&agent.metrics, change, &output);
        }
        if !expired.is_empty() {
            agent.persist_soon();
        }
        let (due, next_reap) = agent.state.critical_too_long(now);
        for (service, check) in due {
            tracing::warn!(service = %service, check = %check, "deregistering service: check critical longer than deregister_critical_after");
            agent.reap_service(&service);
        }
        let next = [next_ttl, next_reap]
            .into_iter()
            .flatten()
            .min()
            .map_or(MAX_SLEEP, |at| at.saturating_duration_since(Instant::now()))
            .min(MAX_SLEEP);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(next) => {}
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}
