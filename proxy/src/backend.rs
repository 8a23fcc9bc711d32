//! A backend: the instances behind one VIP (or one VIP port) with
//! everything the proxy keeps for them across catalog updates: their
//! learned stats, the retry budget, the limits, the connection pool. The
//! catalog part and the policy are one snapshot swapped at once
//! ([`ArcSwap`]), so a request sees a consistent view and an update never
//! waits for requests. Each worker thread has its own copy of the
//! snapshot: a request holds it, and holding one shared copy would have
//! every thread write its reference count.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use signpost_core::model::Protocol;
use signpost_core::policy::{Degraded, Policy};
use tokio::sync::Notify;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};

use crate::Shared;
use crate::balance::{self, Pick};
use crate::endpoint::{Endpoint, FailureOutcome, Member, Stats};
use crate::error::ProxyError;
use crate::metrics::{ProxyMetrics, StatusCounters};
use crate::pool::Pool;
use crate::workers::PerWorker;

/// How long a deposit counts in the retry budget (Linkerd's 10 s).
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

impl Snapshot {
    /// This worker thread's pool (HTTP services only).
    pub(crate) fn pool(&self) -> Option<&Pool> {
        self.pools.as_deref().map(PerWorker::local)
    }
}

/// One catalog update's worth of a backend.
#[derive(Clone)]
pub(crate) struct Snapshot {
    pub(crate) policy: Policy,
    pub(crate) protocol: Protocol,
    pub(crate) members: Vec<Member>,
    /// The pools to the instances, one per worker thread (HTTP services
    /// only).
    pools: Option<Arc<PerWorker<Pool>>>,
}

pub(crate) struct Backend {
    /// The VIP name (`web`, `v2.web`): the label of metrics and logs.
    pub(crate) name: String,
    /// The catalog service.
    pub(crate) service: String,
    /// The same snapshot, one copy per worker thread.
    snapshots: PerWorker<ArcSwap<Snapshot>>,
    round_robin: AtomicU64,
    budget: ArcSwap<RetryBudget>,
    /// Requests in flight, against `max_requests`: a count rather than a
    /// semaphore, whose every release takes its waiters' lock.
    in_flight: AtomicU32,
    /// Requests waiting for a slot (at most `max_pending`).
    pending: AtomicU32,
    /// Wakes the waiting when a slot frees or the limit grows.
    slot_freed: Notify,
    connections: AtomicU32,
    limiter: crate::rate::Limiter,
    /// Rate limits of route-scoped commands, by route.
    route_limiters: Mutex<HashMap<signpost_core::policy::Route, Arc<crate::rate::Limiter>>>,
    breaker: crate::breaker::Breaker,
    /// Seconds since the proxy started at the last use reported.
    last_use: AtomicU64,
    pub(crate) duration: crate::metrics::DurationHistogram,
    /// Requests answered with a 5xx (by an instance or the proxy).
    pub(crate) server_errors: crate::metrics::RequestCounter,
    accepted: Counter,
    active: Gauge,
    pub(crate) retries: Counter,
    exhausted: Counter,
    panic: Gauge,
    /// Answers of the proxy itself, by status class.
    own_statuses: StatusCounters,
    pub(crate) shared: Arc<Shared>,
}

impl Backend {
    pub(crate) fn new(
        name: &str,
        service: &str,
        endpoints: Vec<Endpoint>,
        protocol: Protocol,
        policy: Policy,
        shared: Arc<Shared>,
    ) -> Backend {
        let metrics: &ProxyMetrics = &shared.metrics;
        let (accepted, active) = metrics.connection_metrics(name);
        let (retries, exhausted, panic) = metrics.retry_metrics(name);
        let duration = metrics.duration(name);
        let server_errors = metrics.server_errors(name, service, &duration);
        let backend = Backend {
            name: name.to_string(),
            service: service.to_string(),
            snapshots: PerWorker::new(shared.workers, || {
                ArcSwap::from_pointee(Snapshot {
                    policy: policy.clone(),
                    protocol,
                    members: Vec::new(),
                    pools: None,
                })
            }),
            round_robin: AtomicU64::new(0),
            budget: ArcSwap::from_pointee(RetryBudget::new(&policy, shared.workers)),
            in_flight: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            slot_freed: Notify::new(),
            connections: AtomicU32::new(0),
            limiter: crate::rate::Limiter::default(),
            route_limiters: Mutex::new(HashMap::new()),
            breaker: crate::breaker::Breaker::default(),
            last_use: AtomicU64::new(u64::MAX),
            duration,
            server_errors,
            accepted,
            active,
            retries,
            exhausted,
            panic,
            own_statuses: metrics.status_counters(name, ""),
            shared: shared.clone(),
        };
        backend.update(endpoints, protocol, policy);
        backend
    }

    pub(crate) fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshots.local().load()
    }

    /// The snapshot, to hold across awaits.
    pub(crate) fn snapshot_full(&self) -> Arc<Snapshot> {
        self.snapshots.local().load_full()
    }

    /// Replaces the instances and the policy; what was learned about an
    /// instance still present is kept, and so is the pool unless its
    /// settings changed.
    pub(crate) fn update(&self, endpoints: Vec<Endpoint>, protocol: Protocol, policy: Policy) {
        let old = self.snapshot_full();
        let mut stats: HashMap<SocketAddr, Arc<Stats>> = old
            .members
            .iter()
            .map(|m| (m.endpoint.addr, m.stats.clone()))
            .collect();
        let members = endpoints
            .into_iter()
            .map(|endpoint| {
                let label = endpoint.addr.to_string();
                let stats = stats.remove(&endpoint.addr).unwrap_or_else(|| {
                    Arc::new(Stats::new(
                        self.shared.metrics.status_counters(&self.name, &label),
                        self.shared.workers,
                    ))
                });
                stats.set_host_gone(endpoint.host_gone);
                // An `ip:port` always makes a valid authority.
                let authority = http::uri::Authority::try_from(label.as_str())
                    .unwrap_or_else(|_| http::uri::Authority::from_static("invalid"));
                Member {
                    endpoint,
                    stats,
                    label,
                    authority,
                }
            })
            .collect();
        let same_pool = old.protocol == protocol
            && old.policy.connect_timeout == policy.connect_timeout
            && old.pools.is_some();
        let pools = if protocol == Protocol::Tcp {
            None
        } else if same_pool {
            old.pools.clone()
        } else {
            let http2 = matches!(protocol, Protocol::Http2 | Protocol::Grpc);
            Some(Arc::new(PerWorker::new(self.shared.workers, || {
                Pool::new(
                    http2,
                    policy.connect_timeout,
                    self.shared.liveness,
                    self.shared.pool_idle_timeout,
                )
            })))
        };
        let RetryBudget { ratio, min, .. } = &**self.budget.load();
        if (*ratio, *min)
            != (
                policy.retry.budget_ratio,
                policy.retry.budget_min_per_second,
            )
        {
            self.budget
                .store(Arc::new(RetryBudget::new(&policy, self.shared.workers)));
        }
        let more_requests = policy.limits.max_requests > old.policy.limits.max_requests;
        let snapshot = Snapshot {
            policy,
            protocol,
            members,
            pools,
        };
        for copy in self.snapshots.iter() {
            copy.store(Arc::new(snapshot.clone()));
        }
        if more_requests {
            // Requests waiting for a slot may have one now.
            self.slot_freed.notify_waiters();
        }
    }

    /// Picks an instance for a connection or request.
    pub(crate) fn pick(
        &self,
        snapshot: &Snapshot,
        tried: &[SocketAddr],
        key: Option<u64>,
        now: Instant,
    ) -> Option<Pick> {
        let req = balance::Request {
            policy: &snapshot.policy,
            zone: &self.shared.zone,
            tried,
            key,
            now,
        };
        let (pick, panic) = balance::pick(&snapshot.members, &req, &self.round_robin);
        // Written only on a change: every worker thread reads it.
        if self.panic.get() != i64::from(panic) {
            self.panic.set(i64::from(panic));
        }
        pick
    }

    /// A success that took `rtt`, known at `now`.
    pub(crate) fn succeeded(&self, member: &Member, rtt: Duration, now: Instant) {
        if member.stats.success(rtt, now) {
            tracing::info!(service = %self.name, instance = %member.label, "instance readmitted after a good probe");
        }
    }

    pub(crate) fn failed(&self, snapshot: &Snapshot, member: &Member, rtt: Duration) {
        let policy = &snapshot.policy;
        let now = Instant::now();
        let may_eject = || {
            let ejected = snapshot
                .members
                .iter()
                .filter(|m| m.stats.is_ejected(now))
                .count();
            let allowed =
                ((policy.ejection.max_share * snapshot.members.len() as f64) as usize).max(1);
            ejected < allowed
        };
        let outcome = member.stats.failure(
            rtt,
            now,
            policy.ejection.after,
            policy.ejection.base,
            policy.ejection.max,
            may_eject,
        );
        if let FailureOutcome::Ejected(period) = outcome {
            self.shared.metrics.ejection(&self.name, &member.label);
            tracing::warn!(service = %self.name, instance = %member.label, ?period, "instance ejected after consecutive failures");
        }
    }

    /// Counts a request toward the retry budget.
    pub(crate) fn deposit(&self) {
        self.budget.load().here().deposit();
    }

    /// Takes a retry from the budget; false (and counted) when spent.
    pub(crate) fn withdraw(&self) -> bool {
        if self.budget.load().here().withdraw() {
            self.retries.inc();
            true
        } else {
            self.exhausted.inc();
            false
        }
    }

    /// A slot among `max_requests`, waiting as one of at most
    /// `max_pending` until `deadline`.
    pub(crate) async fn admit_request(
        &self,
        policy: &Policy,
        deadline: Instant,
    ) -> Result<RequestSlot<'_>, ProxyError> {
        if self.take_slot(policy.limits.max_requests) {
            return Ok(RequestSlot(self));
        }
        if self.pending.fetch_add(1, Ordering::SeqCst) >= policy.limits.max_pending {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(ProxyError::Limit {
                limit: "max_pending",
                value: policy.limits.max_pending,
            });
        }
        let waited = tokio::time::timeout_at(deadline, async {
            loop {
                // Registered before the second look, so that a slot freed
                // in between still wakes this request.
                let freed = self.slot_freed.notified();
                tokio::pin!(freed);
                freed.as_mut().enable();
                // The limit as it is now: an update may have raised it.
                if self.take_slot(self.snapshot().policy.limits.max_requests) {
                    return;
                }
                freed.await;
            }
        })
        .await;
        self.pending.fetch_sub(1, Ordering::SeqCst);
        match waited {
            Ok(()) => Ok(RequestSlot(self)),
            Err(_) => Err(ProxyError::Timeout(policy.timeout)),
        }
    }

    /// Takes a slot if fewer than `max` are taken. A lowered limit lets
    /// requests in flight finish and admits again once they are below it.
    fn take_slot(&self, max: u32) -> bool {
        self.in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// What a route-scoped command says about this request: its fallback
    /// or refusal, checked before the service-wide ones.
    pub(crate) fn route_check(
        &self,
        policy: &Policy,
        method: &str,
        path: &str,
    ) -> Result<Option<signpost_core::policy::Fallback>, ProxyError> {
        let Some(route) = policy.route(method, path) else {
            return Ok(None);
        };
        match &route.degraded {
            Degraded::No => {}
            Degraded::FailFast => return Err(ProxyError::Degraded),
            Degraded::Fallback(fallback) => return Ok(Some(fallback.clone())),
        }
        if route.circuit == Some(signpost_core::policy::Circuit::Open) {
            return Err(ProxyError::CircuitOpen);
        }
        if let Some(limit) = route.rate_limit {
            let limiter = crate::lock(&self.route_limiters)
                .entry(route.route.clone())
                .or_default()
                .clone();
            if !limiter.allow(Some(limit), Instant::now()) {
                return Err(ProxyError::RateLimited);
            }
        }
        Ok(None)
    }

    /// Whether the circuit lets a request or connection through.
    pub(crate) fn through_circuit(&self, policy: &Policy, now: Instant) -> Result<(), ProxyError> {
        match self.breaker.admit(policy, now) {
            crate::breaker::Admission::Pass => Ok(()),
            crate::breaker::Admission::Refuse => Err(ProxyError::CircuitOpen),
        }
    }

    /// The outcome of a request or connection the circuit let through.
    pub(crate) fn circuit_outcome(&self, policy: &Policy, ok: bool, now: Instant) {
        match self.breaker.record(policy, ok, now) {
            Some(crate::breaker::Transition::Opened) => {
                tracing::warn!(service = %self.name, open_for = ?policy.breaker.open_for, "circuit opened: too many failures");
            }
            Some(crate::breaker::Transition::Closed) => {
                tracing::info!(service = %self.name, "circuit closed: the probes succeeded");
            }
            None => {}
        }
    }

    /// Takes a token from the operator's rate limit, if any.
    pub(crate) fn within_rate(&self, policy: &Policy, now: Instant) -> Result<(), ProxyError> {
        if self.limiter.allow(policy.overlay.rate_limit, now) {
            Ok(())
        } else {
            Err(ProxyError::RateLimited)
        }
    }

    /// A client connection, unless `max_connections` are open.
    pub(crate) fn admit_connection(self: &Arc<Self>) -> Result<ConnectionGuard, ProxyError> {
        let limit = self.snapshot().policy.limits.max_connections;
        if self.connections.fetch_add(1, Ordering::AcqRel) >= limit {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(ProxyError::Limit {
                limit: "max_connections",
                value: limit,
            });
        }
        self.accepted.inc();
        self.active.inc();
        Ok(ConnectionGuard(self.clone()))
    }

    /// Tells the agent the service is in use (at most once a second), so
    /// it stays subscribed to its instances.
    pub(crate) fn used(&self, now: Instant) {
        let now = now
            .into_std()
            .saturating_duration_since(self.shared.started)
            .as_secs();
        // Read first: a write on every request would bounce the cache
        // line between the worker threads.
        if self.last_use.load(Ordering::Relaxed) != now
            && self.last_use.swap(now, Ordering::Relaxed) != now
        {
            (self.shared.on_use)(&self.service);
        }
    }

    /// Counts an answer of the proxy itself.
    pub(crate) fn own_status(&self, status: u16) {
        self.own_statuses.count(status);
    }
}

/// An open client connection, counted until dropped.
pub(crate) struct ConnectionGuard(Arc<Backend>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        self.0.active.dec();
    }
}

/// A request's slot among the service's `max_requests`, given back when
/// dropped.
pub(crate) struct RequestSlot<'a>(&'a Backend);

impl Drop for RequestSlot<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        // Sequentially consistent with the waiter's count and second look:
        // either it sees the slot free, or this sees it waiting.
        if self.0.pending.load(Ordering::SeqCst) > 0 {
            self.0.slot_freed.notify_one();
        }
    }
}

/// The retry budget: the policy's ratio and minimum, kept per worker
/// thread (its requests, its retries, its share of the minimum), so that
/// no request takes a lock another thread takes too.
struct RetryBudget {
    ratio: f32,
    min: u32,
    workers: PerWorker<TpsBudget>,
}

impl RetryBudget {
    fn new(policy: &Policy, workers: usize) -> RetryBudget {
        let workers = workers.max(1);
        let min = policy.retry.budget_min_per_second;
        let share = min.div_ceil(workers as u32);
        RetryBudget {
            ratio: policy.retry.budget_ratio,
            min,
            workers: PerWorker::new(workers, || {
                TpsBudget::new(BUDGET_WINDOW, share, policy.retry.budget_ratio)
            }),
        }
    }

    /// The current worker thread's.
    fn here(&self) -> &TpsBudget {
        self.workers.local()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend with these limits, and its policy.
    fn limited(max_requests: u32, max_pending: u32) -> (Arc<Backend>, Policy) {
        let mut policy = Policy::default();
        policy.limits.max_requests = max_requests;
        policy.limits.max_pending = max_pending;
        let shared = Arc::new(Shared {
            zone: String::new(),
            pool_idle_timeout: Duration::from_secs(3),
            client_idle_timeout: Duration::ZERO,
            client_first_byte_timeout: Duration::ZERO,
            liveness: crate::Liveness {
                keepalive: Duration::ZERO,
                user_timeout: Duration::ZERO,
            },
            access_log: false,
            metrics: Arc::default(),
            on_use: Box::new(|_| {}),
            started: std::time::Instant::now(),
            workers: 2,
            mesh: arc_swap::ArcSwap::from_pointee(crate::mesh::MeshView::default()),
            inbound: crate::mesh::inbound::Inbound::default(),
        });
        let web = Backend::new(
            "web",
            "web",
            Vec::new(),
            Protocol::Http,
            policy.clone(),
            shared,
        );
        (Arc::new(web), policy)
    }

    /// A deadline no test reaches.
    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    /// Starts a request that waits for a slot; it says when it has one and
    /// holds it until told.
    fn waiter(
        backend: &Arc<Backend>,
        policy: &Policy,
    ) -> (
        tokio::sync::oneshot::Receiver<()>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (admitted_tx, admitted) = tokio::sync::oneshot::channel();
        let (release, release_rx) = tokio::sync::oneshot::channel::<()>();
        let (backend, policy) = (backend.clone(), policy.clone());
        tokio::spawn(async move {
            let slot = backend.admit_request(&policy, far()).await;
            assert!(slot.is_ok(), "the waiter was refused");
            let _ = admitted_tx.send(());
            let _ = release_rx.await;
        });
        (admitted, release)
    }

    async fn until_waiting(backend: &Backend, n: u32) {
        while backend.pending.load(Ordering::SeqCst) != n {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_waiting_request_gets_the_slot_freed_and_more_wait_no_longer() {
        let (web, policy) = limited(1, 1);
        let first = web.admit_request(&policy, far()).await.ok();
        assert!(first.is_some());
        let (mut admitted, _release) = waiter(&web, &policy);
        until_waiting(&web, 1).await;
        assert!(admitted.try_recv().is_err(), "admitted over max_requests");
        // One waits already: the next is refused at once.
        let refused = web.admit_request(&policy, far()).await.err();
        assert!(
            matches!(
                refused,
                Some(ProxyError::Limit {
                    limit: "max_pending",
                    ..
                })
            ),
            "{refused:?}"
        );
        drop(first);
        admitted.await.unwrap();
        assert_eq!(web.pending.load(Ordering::SeqCst), 0);
        assert_eq!(web.in_flight.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_raised_limit_admits_the_waiting_and_a_lowered_one_the_next() {
        let (web, mut policy) = limited(1, 10);
        let first = web.admit_request(&policy, far()).await.ok();
        let (admitted, release) = waiter(&web, &policy);
        until_waiting(&web, 1).await;
        policy.limits.max_requests = 2;
        web.update(Vec::new(), Protocol::Http, policy.clone());
        admitted.await.unwrap();

        // Lowered to 1 with 2 in flight: the next waits until both end.
        policy.limits.max_requests = 1;
        web.update(Vec::new(), Protocol::Http, policy.clone());
        let (mut third, _release) = waiter(&web, &policy);
        until_waiting(&web, 1).await;
        drop(first);
        tokio::task::yield_now().await;
        assert!(third.try_recv().is_err(), "admitted with 1 of 1 in flight");
        release.send(()).unwrap();
        third.await.unwrap();
    }
}
