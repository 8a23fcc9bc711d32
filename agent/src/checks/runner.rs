//! The loop of one active check: probe, confirm, apply thresholds, report.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use signpost_core::model::Health;
use tokio_util::sync::CancellationToken;

use super::{FastRecheck, Outcome, Probe, report_change};
use crate::metrics::Metrics;
use crate::state::{LocalState, StartCheck};

pub(super) struct Runner {
    pub(super) state: Arc<LocalState>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) recheck: FastRecheck,
    pub(super) probe: Probe,
    pub(super) check: StartCheck,
}

/// Consecutive results, for the flap-damping thresholds.
#[derive(Debug, Default)]
pub(super) struct Counters {
    successes: u32,
    failures: u32,
}

impl Counters {
    /// The status to report after `outcome`, or `None` to keep the current
    /// one (Consul's `StatusHandler`).
    pub(super) fn apply(
        &mut self,
        outcome: Health,
        success_before_passing: u32,
        failures_before_warning: u32,
        failures_before_critical: u32,
    ) -> Option<Health> {
        if outcome == Health::Passing {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
            return (self.successes >= success_before_passing).then_some(Health::Passing);
        }
        self.failures = self.failures.saturating_add(1);
        self.successes = 0;
        if self.failures >= failures_before_critical {
            Some(outcome)
        } else if self.failures >= failures_before_warning {
            Some(Health::Warning)
        } else {
            None
        }
    }
}

impl Runner {
    pub(super) async fn run(self, cancel: CancellationToken) {
        let def = &self.check.def;
        let interval = def.interval;
        // Spread the first runs of many checks over one interval.
        let stagger =
            rand::rng().random_range(Duration::ZERO..interval.max(Duration::from_millis(1)));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(stagger) => {}
        }
        let mut counters = Counters::default();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return,
                outcome = self.probe_confirmed() => outcome,
            };
            let next = counters.apply(
                outcome.status,
                def.success_before_passing,
                def.effective_failures_before_warning(),
                def.failures_before_critical,
            );
            let Some(status) = next else {
                continue;
            };
            if let Some(change) = self.state.record_result(
                &self.check.id,
                self.check.generation,
                status,
                outcome.output.clone(),
            ) {
                report_change(&self.metrics, &change, &outcome.output);
            }
        }
    }

    /// Probes once; if a passing check fails, probes again a few times at
    /// short spacing so that a blip is not taken for a death, and a death
    /// is confirmed without waiting a whole interval.
    async fn probe_confirmed(&self) -> Outcome {
        let first = self.probe_once().await;
        if first.status == Health::Passing || self.recheck.count == 0 || !self.currently_passing() {
            return first;
        }
        let mut last = first;
        for _ in 0..self.recheck.count {
            tokio::time::sleep(self.recheck.spacing).await;
            let again = self.probe_once().await;
            if again.status == Health::Passing {
                self.metrics.fast_recheck("blip");
                tracing::debug!(check = %self.check.id, output = %last.output, "check failure not confirmed by re-check");
                return again;
            }
            last = again;
        }
        self.metrics.fast_recheck("confirmed");
        last
    }

    /// Runs the probe once and counts it, re-checks included.
    async fn probe_once(&self) -> Outcome {
        let outcome = self.probe.run().await;
        self.metrics
            .probe(self.check.def.kind.type_name(), outcome.status);
        outcome
    }

    fn currently_passing(&self) -> bool {
        self.state.read(|inner| {
            inner
                .checks
                .get(&self.check.id)
                .is_some_and(|c| c.status == Health::Passing)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_thresholds_status_follows_each_result() {
        let mut c = Counters::default();
        assert_eq!(c.apply(Health::Critical, 0, 0, 0), Some(Health::Critical));
        assert_eq!(c.apply(Health::Passing, 0, 0, 0), Some(Health::Passing));
        assert_eq!(c.apply(Health::Warning, 0, 0, 0), Some(Health::Warning));
    }

    #[test]
    fn failures_go_warning_then_critical() {
        let mut c = Counters::default();
        assert_eq!(c.apply(Health::Critical, 0, 1, 3), Some(Health::Warning));
        assert_eq!(c.apply(Health::Critical, 0, 1, 3), Some(Health::Warning));
        assert_eq!(c.apply(Health::Critical, 0, 1, 3), Some(Health::Critical));
        // One success resets the failure count.
        assert_eq!(c.apply(Health::Passing, 0, 1, 3), Some(Health::Passing));
        assert_eq!(c.apply(Health::Critical, 0, 2, 3), None);
    }

    #[test]
    fn successes_needed_before_passing() {
        let mut c = Counters::default();
        assert_eq!(c.apply(Health::Passing, 3, 0, 0), None);
        assert_eq!(c.apply(Health::Passing, 3, 0, 0), None);
        assert_eq!(c.apply(Health::Passing, 3, 0, 0), Some(Health::Passing));
    }
}
