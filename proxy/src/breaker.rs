//! A service's automatic circuit breaker: it opens after too many
//! consecutive failed requests or too high an error rate, fails every
//! request fast while open, then lets a few probe requests through
//! (half-open) and closes when they all succeed. An operator's forced
//! state ([`Policy::circuit`]) overrides it.

use std::sync::{Mutex, MutexGuard};

use signpost_core::policy::{Circuit, Policy};
use tokio::time::Instant;

#[derive(Default)]
pub(crate) struct Breaker {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    phase: Phase,
    consecutive_failures: u32,
    window_start: Option<Instant>,
    window_requests: u32,
    window_failures: u32,
}

#[derive(Default, Debug, Clone, Copy, PartialEq)]
enum Phase {
    #[default]
    Closed,
    Open {
        until: Instant,
    },
    /// Probes let through since `since`, and how many of them succeeded.
    HalfOpen {
        sent: u32,
        succeeded: u32,
        since: Instant,
    },
}

/// What [`Breaker::admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    Pass,
    /// The circuit is open: fail fast.
    Refuse,
}

/// A change worth a log line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Transition {
    Opened,
    Closed,
}

impl Breaker {
    fn lock(&self) -> MutexGuard<'_, State> {
        crate::lock(&self.state)
    }

    /// May a request (or connection) go through now?
    pub(crate) fn admit(&self, policy: &Policy, now: Instant) -> Admission {
        match policy.overlay.circuit {
            Some(Circuit::Open) => return Admission::Refuse,
            Some(Circuit::Closed) => return Admission::Pass,
            None if !enabled(policy) => return Admission::Pass,
            None => {}
        }
        let mut s = self.lock();
        match s.phase {
            Phase::Closed => Admission::Pass,
            Phase::Open { until } if now < until => Admission::Refuse,
            Phase::Open { .. } => {
                s.phase = Phase::HalfOpen {
                    sent: 1,
                    succeeded: 0,
                    since: now,
                };
                Admission::Pass
            }
            Phase::HalfOpen {
                sent,
                succeeded,
                since,
            } if sent < policy.breaker.probes.max(1) => {
                s.phase = Phase::HalfOpen {
                    sent: sent + 1,
                    succeeded,
                    since,
                };
                Admission::Pass
            }
            // Probes whose outcome never came (their clients went away):
            // start probing again.
            Phase::HalfOpen { since, .. }
                if now.saturating_duration_since(since) >= policy.breaker.open_for =>
            {
                s.phase = Phase::HalfOpen {
                    sent: 1,
                    succeeded: 0,
                    since: now,
                };
                Admission::Pass
            }
            Phase::HalfOpen { .. } => Admission::Refuse,
        }
    }

    /// The outcome of a request that was let through.
    pub(crate) fn record(&self, policy: &Policy, ok: bool, now: Instant) -> Option<Transition> {
        if policy.overlay.circuit.is_some() || !enabled(policy) {
            return None;
        }
        let mut s = self.lock();
        let open = |s: &mut State| {
            s.phase = Phase::Open {
                until: now + policy.breaker.open_for,
            };
            s.consecutive_failures = 0;
            s.window_start = None;
            Some(Transition::Opened)
        };
        match s.phase {
            Phase::HalfOpen {
                sent,
                succeeded,
                since,
            } => {
                if !ok {
                    return open(&mut s);
                }
                let succeeded = succeeded + 1;
                if succeeded >= policy.breaker.probes.max(1) {
                    s.phase = Phase::Closed;
                    return Some(Transition::Closed);
                }
                s.phase = Phase::HalfOpen {
                    sent,
                    succeeded,
                    since,
                };
                None
            }
            Phase::Open { .. } => None,
            Phase::Closed => {
                s.consecutive_failures = if ok { 0 } else { s.consecutive_failures + 1 };
                let window_over = s.window_start.is_none_or(|start| {
                    now.saturating_duration_since(start) >= policy.breaker.window
                });
                if window_over {
                    s.window_start = Some(now);
                    s.window_requests = 0;
                    s.window_failures = 0;
                }
                s.window_requests += 1;
                s.window_failures += u32::from(!ok);
                let too_many_in_a_row = policy.breaker.failures > 0
                    && s.consecutive_failures >= policy.breaker.failures;
                let rate = f64::from(s.window_failures) / f64::from(s.window_requests);
                let too_high_a_rate = policy.breaker.error_rate > 0.0
                    && s.window_requests >= policy.breaker.min_requests
                    && rate >= policy.breaker.error_rate;
                if too_many_in_a_row || too_high_a_rate {
                    return open(&mut s);
                }
                None
            }
        }
    }
}

fn enabled(policy: &Policy) -> bool {
    policy.breaker.failures > 0 || policy.breaker.error_rate > 0.0
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn policy() -> Policy {
        let mut p = Policy::default();
        p.breaker.failures = 3;
        p.breaker.open_for = Duration::from_secs(10);
        p.breaker.probes = 2;
        p
    }

    #[test]
    fn consecutive_failures_open_then_probes_close() {
        let (b, p, t0) = (Breaker::default(), policy(), Instant::now());
        for _ in 0..2 {
            assert_eq!(b.admit(&p, t0), Admission::Pass);
            assert_eq!(b.record(&p, false, t0), None);
        }
        assert_eq!(b.record(&p, false, t0), Some(Transition::Opened));
        assert_eq!(b.admit(&p, t0), Admission::Refuse);
        let t1 = t0 + Duration::from_secs(10);
        // Half-open: two probes, no third until they report.
        assert_eq!(b.admit(&p, t1), Admission::Pass);
        assert_eq!(b.admit(&p, t1), Admission::Pass);
        assert_eq!(b.admit(&p, t1), Admission::Refuse);
        assert_eq!(b.record(&p, true, t1), None);
        assert_eq!(b.record(&p, true, t1), Some(Transition::Closed));
        assert_eq!(b.admit(&p, t1), Admission::Pass);
    }

    #[test]
    fn a_failed_probe_opens_again_and_the_error_rate_counts() {
        let (b, t0) = (Breaker::default(), Instant::now());
        let mut p = policy();
        p.breaker.failures = 0;
        p.breaker.error_rate = 0.5;
        p.breaker.min_requests = 10;
        // 4 of 10 failed: under the rate.
        for n in 0..10 {
            assert_eq!(b.record(&p, n >= 4, t0), None);
        }
        // A new window, 6 of 10 failed.
        let t1 = t0 + p.breaker.window;
        let mut opened = None;
        for n in 0..10 {
            opened = opened.or(b.record(&p, n >= 6, t1));
        }
        assert_eq!(opened, Some(Transition::Opened));
        let t2 = t1 + p.breaker.open_for;
        assert_eq!(b.admit(&p, t2), Admission::Pass);
        assert_eq!(b.record(&p, false, t2), Some(Transition::Opened));
        assert_eq!(b.admit(&p, t2), Admission::Refuse);
    }

    #[test]
    fn an_operators_state_wins() {
        let (b, t0) = (Breaker::default(), Instant::now());
        let mut p = policy();
        for _ in 0..3 {
            b.record(&p, false, t0);
        }
        assert_eq!(b.admit(&p, t0), Admission::Refuse);
        p.overlay.circuit = Some(Circuit::Closed);
        assert_eq!(b.admit(&p, t0), Admission::Pass);
        p.overlay.circuit = Some(Circuit::Open);
        assert_eq!(b.admit(&Policy::default(), t0), Admission::Pass);
        assert_eq!(b.admit(&p, t0), Admission::Refuse);
    }
}
