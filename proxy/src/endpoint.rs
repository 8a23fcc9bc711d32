//! One instance as the balancer sees it: its address, zone, health and
//! weight from the catalog, and what the proxy learned by using it
//! (peak-EWMA latency, requests in flight, consecutive failures,
//! ejection). The learned part outlives catalog updates, so a health
//! flip elsewhere does not reset an instance's latency or ejection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use signpost_core::model::{Health, Weights};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::StatusCounters;
use crate::workers::PerWorker;

/// An instance of a service, as the agent's catalog gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub zone: String,
    pub tags: Vec<String>,
    pub health: Health,
    pub weights: Weights,
    /// Its host is known to be gone (the control plane and its peers
    /// could not reach it): connections to it will never answer, so they
    /// are closed at once, and idempotent requests in flight on them are
    /// retried on another instance instead of waiting for their deadline.
    pub host_gone: bool,
    /// Meshed: reached through its host's inbound listener (then `addr`
    /// is its host's address with its port, which names it uniquely even
    /// when it listens on loopback there).
    pub mesh: Option<crate::mesh::MeshHop>,
}

impl Endpoint {
    /// The weight the balancers use: the registered passing weight, and
    /// for a warning instance its warning weight but at most half the
    /// passing one (Consul's default gives both 1, which would not prefer
    /// passing instances at all). Doubled so the half stays whole.
    pub(crate) fn weight(&self) -> u64 {
        let passing = u64::from(self.weights.passing);
        match self.health {
            Health::Passing => 2 * passing,
            Health::Warning => (2 * u64::from(self.weights.warning)).min(passing),
            Health::Critical => 0,
        }
    }
}

/// Latency assumed for an instance never used (Linkerd's default).
const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// How fast the EWMA forgets a sample (Linkerd's and Finagle's 10 s).
const DECAY: Duration = Duration::from_secs(10);

/// The latency charged for a failure, so that an instance that fails fast
/// does not look fast.
const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// What the proxy learned about one instance.
pub(crate) struct Stats {
    /// What the balancer weighs, kept per worker thread: each worker
    /// balances its own requests (as Envoy's workers do), so the two words
    /// every request writes are never written by two threads.
    load: PerWorker<Load>,
    consecutive_failures: AtomicU32,
    epoch: Instant,
    /// Whether `inner` has an ejection (set and cleared under its lock):
    /// the balancer reads this for every instance on every request,
    /// without taking the lock.
    ejected: AtomicBool,
    inner: Mutex<Learned>,
    /// Requests answered by this instance, by status class.
    pub(crate) statuses: StatusCounters,
    /// An instance-scoped rate limit's bucket.
    pub(crate) limiter: crate::rate::Limiter,
    /// Cancelled when the instance's host is known to be gone: every
    /// connection to it closes. Read only when a connection is made.
    gone: Mutex<CancellationToken>,
}

struct Load {
    /// Requests (L7) or connections (L4) in flight.
    active: AtomicU32,
    /// Peak-EWMA latency (f32 seconds, high half) and when it was last
    /// updated (milliseconds since `epoch`, low half), in one word: read
    /// and updated without a lock.
    ewma: AtomicU64,
}

/// A request or connection in flight to an instance, counted until
/// dropped (also when the client goes away first).
pub(crate) struct InFlight<'a>(&'a AtomicU32);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Learned {
    /// Ejections in a row; the next lasts `base * 2^ejections`.
    ejections: u32,
    ejected_until: Option<Instant>,
    /// When the readmission probe in flight was sent.
    probing: Option<Instant>,
}

/// Whether an instance may take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Standing {
    Available,
    Ejected,
    /// Its ejection is over: the next request is the single probe.
    Probe,
}

/// What [`Stats::failure`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FailureOutcome {
    Counted,
    /// Ejected for this long.
    Ejected(Duration),
}

impl Stats {
    /// Stats with one balancer's share per worker thread.
    pub(crate) fn new(statuses: StatusCounters, workers: usize) -> Stats {
        Stats {
            load: PerWorker::new(workers, || Load {
                active: AtomicU32::new(0),
                ewma: AtomicU64::new(pack(DEFAULT_RTT.as_secs_f64(), 0)),
            }),
            consecutive_failures: AtomicU32::new(0),
            epoch: Instant::now(),
            ejected: AtomicBool::new(false),
            inner: Mutex::new(Learned {
                ejections: 0,
                ejected_until: None,
                probing: None,
            }),
            statuses,
            limiter: crate::rate::Limiter::default(),
            gone: Mutex::new(CancellationToken::new()),
        }
    }

    /// Follows the catalog's word on the instance's host: gone closes
    /// every connection to it; back, new connections live again.
    pub(crate) fn set_host_gone(&self, gone: bool) {
        let mut token = crate::lock(&self.gone);
        if gone {
            token.cancel();
        } else if token.is_cancelled() {
            *token = CancellationToken::new();
        }
    }

    /// Fires when the instance's host is known to be gone; a connection
    /// to the instance closes then.
    pub(crate) fn gone(&self) -> CancellationToken {
        crate::lock(&self.gone).clone()
    }

    fn lock(&self) -> MutexGuard<'_, Learned> {
        crate::lock(&self.inner)
    }

    /// The balancer's cost: peak-EWMA latency times the load in flight.
    /// The estimate decays toward zero with the time since its last
    /// sample, so an instance left alone after a slow spell is tried again.
    pub(crate) fn cost(&self, now: Instant) -> f64 {
        let load = self.load.local();
        let active = f64::from(load.active.load(Ordering::Relaxed));
        let (ewma, stamp) = unpack(load.ewma.load(Ordering::Relaxed));
        ewma * decay(stamp, self.millis(now)) * (active + 1.0)
    }

    /// Requests and L4 connections in flight to the instance now, over
    /// every worker.
    pub(crate) fn active(&self) -> u32 {
        self.load
            .iter()
            .map(|l| l.active.load(Ordering::Relaxed))
            .fold(0, u32::saturating_add)
    }

    /// Counts a request or connection to the instance until the guard
    /// is dropped.
    pub(crate) fn in_flight(&self) -> InFlight<'_> {
        let active = &self.load.local().active;
        active.fetch_add(1, Ordering::Relaxed);
        InFlight(active)
    }

    fn millis(&self, now: Instant) -> u32 {
        // Wraps after 49 days; `decay` allows for that.
        now.saturating_duration_since(self.epoch).as_millis() as u32
    }

    /// Takes a latency sample into the estimate.
    fn observe(&self, rtt: Duration, now: Instant) {
        let now = self.millis(now);
        let sample = rtt.as_secs_f64();
        // Never fails: the closure always gives a value.
        let _ = self
            .load
            .local()
            .ewma
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |word| {
                let (ewma, stamp) = unpack(word);
                // Peak EWMA: a slower sample is taken at once, a faster one
                // is blended in by how long it has been since the last.
                let ewma = if sample > ewma {
                    sample
                } else {
                    let w = decay(stamp, now);
                    ewma * w + sample * (1.0 - w)
                };
                Some(pack(ewma, now))
            });
    }

    pub(crate) fn standing(&self, now: Instant) -> Standing {
        if !self.ejected.load(Ordering::Acquire) {
            return Standing::Available;
        }
        let l = self.lock();
        match l.ejected_until {
            None => Standing::Available,
            Some(_) if probe_pending(&l, now) => Standing::Ejected,
            Some(until) if until > now => Standing::Ejected,
            Some(_) => Standing::Probe,
        }
    }

    pub(crate) fn is_ejected(&self, now: Instant) -> bool {
        self.standing(now) == Standing::Ejected
    }

    /// Claims the single readmission probe; false if another request
    /// took it first.
    pub(crate) fn claim_probe(&self, now: Instant) -> bool {
        let mut l = self.lock();
        match l.ejected_until {
            Some(until) if until <= now && !probe_pending(&l, now) => {
                l.probing = Some(now);
                true
            }
            _ => false,
        }
    }

    /// A success at `now` that took `rtt`; returns true if it readmitted
    /// the instance.
    pub(crate) fn success(&self, rtt: Duration, now: Instant) -> bool {
        // Read first: a write on every request would bounce the cache line
        // between the worker threads.
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        self.observe(rtt, now);
        // Without an ejection there is nothing to clear (the probe and the
        // count of ejections go with it).
        if !self.ejected.load(Ordering::Acquire) {
            return false;
        }
        let mut l = self.lock();
        let readmitted = l.ejected_until.is_some();
        l.ejected_until = None;
        if readmitted {
            self.ejected.store(false, Ordering::Release);
        }
        l.probing = None;
        l.ejections = 0;
        readmitted
    }

    /// A failure (connect error, 5xx, reset, timeout). After `eject_after`
    /// in a row the instance is ejected, unless `may_eject` says too many
    /// already are; a failed probe ejects it again for twice as long.
    pub(crate) fn failure(
        &self,
        rtt: Duration,
        now: Instant,
        eject_after: u32,
        base: Duration,
        max: Duration,
        may_eject: impl FnOnce() -> bool,
    ) -> FailureOutcome {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        self.observe(rtt.max(FAILURE_PENALTY), now);
        let (probe_failed, due) = {
            let l = self.lock();
            let due = eject_after > 0 && failures >= eject_after && l.ejected_until.is_none();
            (l.probing.is_some(), due)
        };
        // `may_eject` looks at every instance, this one included: not
        // under this one's lock.
        let eject = probe_failed || (due && may_eject());
        if !eject {
            return FailureOutcome::Counted;
        }
        let mut l = self.lock();
        let factor = 1u32 << l.ejections.min(16);
        let period = base.saturating_mul(factor).min(max);
        l.ejections = l.ejections.saturating_add(1);
        l.ejected_until = Some(now + period);
        self.ejected.store(true, Ordering::Release);
        l.probing = None;
        FailureOutcome::Ejected(period)
    }
}

/// A probe whose outcome never came (its client went away) stops holding
/// the instance back after this.
const PROBE_PATIENCE: Duration = Duration::from_secs(30);

fn probe_pending(l: &Learned, now: Instant) -> bool {
    l.probing
        .is_some_and(|sent| now.saturating_duration_since(sent) < PROBE_PATIENCE)
}

fn pack(ewma: f64, millis: u32) -> u64 {
    (u64::from((ewma as f32).to_bits()) << 32) | u64::from(millis)
}

fn unpack(word: u64) -> (f64, u32) {
    (f64::from(f32::from_bits((word >> 32) as u32)), word as u32)
}

/// How much of an estimate stamped at `stamp` is left at `now` (both in
/// milliseconds, wrapping). A stamp just after `now` (another thread's
/// sample) counts as now.
fn decay(stamp: u32, now: u32) -> f64 {
    let elapsed = (now.wrapping_sub(stamp) as i32).max(0);
    if elapsed == 0 {
        // Busy instances were updated this millisecond: no `exp`.
        return 1.0;
    }
    let elapsed = f64::from(elapsed) / 1000.0;
    (-elapsed / DECAY.as_secs_f64()).exp()
}

/// An endpoint with the stats the proxy keeps for it.
#[derive(Clone)]
pub(crate) struct Member {
    pub(crate) endpoint: Endpoint,
    pub(crate) stats: Arc<Stats>,
    /// `ip:port`, the instance label of metrics and logs.
    pub(crate) label: String,
    /// The same, as the authority of request URIs.
    pub(crate) authority: http::uri::Authority,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> Stats {
        Stats::new(
            crate::ProxyMetrics::default().status_counters("web", "a"),
            1,
        )
    }

    #[test]
    fn connections_made_before_the_host_went_close_and_later_ones_live() {
        let stats = stats();
        let before = stats.gone();
        stats.set_host_gone(false);
        assert!(
            !before.is_cancelled(),
            "a host that is there closes nothing"
        );
        stats.set_host_gone(true);
        assert!(before.is_cancelled());
        assert!(
            stats.gone().is_cancelled(),
            "still gone: nothing to connect to"
        );
        stats.set_host_gone(false);
        assert!(!stats.gone().is_cancelled(), "back: new connections live");
    }

    #[test]
    fn consecutive_failures_eject_with_growing_periods_and_a_single_probe() {
        let s = stats();
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        let fail = |s: &Stats, now| s.failure(Duration::ZERO, now, 3, base, max, || true);
        let t0 = Instant::now();
        assert_eq!(fail(&s, t0), FailureOutcome::Counted);
        assert_eq!(fail(&s, t0), FailureOutcome::Counted);
        assert_eq!(fail(&s, t0), FailureOutcome::Ejected(base));
        assert_eq!(s.standing(t0), Standing::Ejected);

        let t1 = t0 + base;
        assert_eq!(s.standing(t1), Standing::Probe);
        assert!(s.claim_probe(t1));
        assert!(!s.claim_probe(t1), "only one probe at a time");
        assert_eq!(s.standing(t1), Standing::Ejected);
        // The probe fails: ejected again, for twice as long.
        assert_eq!(fail(&s, t1), FailureOutcome::Ejected(2 * base));

        let t2 = t1 + 2 * base;
        assert!(s.claim_probe(t2));
        assert!(
            s.success(Duration::from_millis(5), t2),
            "a good probe readmits"
        );
        assert_eq!(s.standing(t2), Standing::Available);
        // Counting starts over.
        assert_eq!(fail(&s, t2), FailureOutcome::Counted);
    }

    #[test]
    fn a_probe_that_never_ends_is_given_up() {
        let s = stats();
        let t0 = Instant::now();
        let base = Duration::from_secs(1);
        assert_eq!(
            s.failure(Duration::ZERO, t0, 1, base, base, || true),
            FailureOutcome::Ejected(base)
        );
        assert!(s.claim_probe(t0 + base));
        assert_eq!(
            s.standing(t0 + base + PROBE_PATIENCE / 2),
            Standing::Ejected
        );
        assert_eq!(s.standing(t0 + base + PROBE_PATIENCE), Standing::Probe);
    }

    #[test]
    fn ejection_can_be_refused_and_turned_off() {
        let s = stats();
        let base = Duration::from_secs(1);
        let now = Instant::now();
        for _ in 0..5 {
            let out = s.failure(Duration::ZERO, now, 2, base, base, || false);
            assert_eq!(out, FailureOutcome::Counted);
        }
        for _ in 0..5 {
            let out = s.failure(Duration::ZERO, now, 0, base, base, || true);
            assert_eq!(out, FailureOutcome::Counted);
        }
        assert_eq!(s.standing(now), Standing::Available);
    }

    #[test]
    fn a_slow_sample_counts_at_once_and_fades() {
        let s = stats();
        let mut now = Instant::now();
        s.success(Duration::from_millis(500), now);
        let slow = s.cost(now);
        assert!((slow - 0.5).abs() < 1e-9, "{slow}");
        for _ in 0..50 {
            now += Duration::from_secs(1);
            s.success(Duration::from_millis(1), now);
        }
        let idle = s.cost(now);
        assert!(idle < 0.01, "{idle}");
        let busy = [s.in_flight(), s.in_flight(), s.in_flight()];
        let cost = s.cost(now);
        assert!(
            (cost - 4.0 * idle).abs() < 1e-12,
            "cost grows with the load"
        );
        drop(busy);
        assert_eq!(s.cost(now), idle, "and falls back when the requests end");
        // Left alone, the estimate fades, so the instance is tried again.
        let left_alone = s.cost(now + Duration::from_secs(30));
        assert!(left_alone < idle / 10.0, "{left_alone} vs {idle}");
    }

    #[test]
    fn the_decay_allows_for_racing_stamps_and_wrapping() {
        assert_eq!(decay(10, 10), 1.0);
        assert_eq!(decay(15, 10), 1.0, "another thread's later stamp");
        let across_the_wrap = decay(u32::MAX - 499, 500);
        assert!(
            (across_the_wrap - (-0.1f64).exp()).abs() < 1e-12,
            "{across_the_wrap}"
        );
        let (ewma, stamp) = unpack(pack(0.25, 1234));
        assert_eq!((ewma, stamp), (0.25, 1234));
    }

    #[test]
    fn warning_instances_weigh_at_most_half() {
        let mut e = Endpoint {
            addr: "127.0.0.1:1".parse().unwrap(),
            zone: String::new(),
            tags: Vec::new(),
            health: Health::Passing,
            weights: Weights::default(),
            host_gone: false,
            mesh: None,
        };
        assert_eq!(e.weight(), 2);
        e.health = Health::Warning;
        assert_eq!(e.weight(), 1);
        e.weights = Weights {
            passing: 10,
            warning: 1,
        };
        assert_eq!(e.weight(), 2);
        e.health = Health::Critical;
        assert_eq!(e.weight(), 0);
    }
}
