//! The proxy's Prometheus metrics, per service (the VIP name: `web` or
//! `v2.web`) and, where it matters, per instance (`ip:port`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::workers::PerWorker;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    service: String,
    /// Empty when the proxy answered itself (no instance, a limit).
    instance: String,
    /// `2xx`, `5xx`...
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    service: String,
    instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    service: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MeshCallLabels {
    /// The calling service, as its certificate names it.
    source: String,
    destination: String,
    /// `allow`, `deny` or `shadow_deny` (a deny shadow mode let through).
    decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    /// `inbound` (this host's listener) or `outbound` (dialling another).
    side: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeKindLabels {
    side: String,
    /// "true" when the TLS session was resumed (no full handshake).
    resumed: String,
}

/// The calls of one source to one destination, by decision.
pub(crate) struct MeshCalls {
    pub(crate) allow: Counter,
    pub(crate) deny: Counter,
    pub(crate) shadow_deny: Counter,
}

/// Every proxy metric; register once into the agent's registry.
#[derive(Default)]
pub struct ProxyMetrics {
    requests: Family<RequestLabels, RequestCounter>,
    duration: Family<ServiceLabels, DurationHistogram>,
    connections: Family<ServiceLabels, Counter>,
    active: Family<ServiceLabels, Gauge>,
    retries: Family<ServiceLabels, Counter>,
    budget_exhausted: Family<ServiceLabels, Counter>,
    ejections: Family<InstanceLabels, Counter>,
    panic: Family<ServiceLabels, Gauge>,
    errors: Family<ReasonLabels, Counter>,
    listeners: Gauge,
    listen_errors: Counter,
    mesh_requests: Family<MeshCallLabels, Counter>,
    mesh_handshakes: Family<HandshakeKindLabels, Counter>,
    mesh_handshake_failures: Family<HandshakeLabels, Counter>,
    mesh_closed: Counter,
    /// Each backend's requests, 5xx answers and durations (by backend
    /// name), for the agent's traffic reports to the control plane.
    traffic: std::sync::Mutex<std::collections::HashMap<String, TrafficCounters>>,
}

/// A backend's counts for [`ProxyMetrics::traffic`].
#[derive(Debug)]
struct TrafficCounters {
    service: String,
    duration: DurationHistogram,
    server_errors: RequestCounter,
}

/// What the proxy sent a service since it started: requests answered,
/// those answered with a 5xx, and requests per duration bucket (not
/// cumulative; upper bounds 0.5 ms doubling, the last one unbounded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficTotals {
    pub service: String,
    pub requests: u64,
    pub errors: u64,
    pub buckets: Vec<u64>,
}

impl ProxyMetrics {
    /// The 5xx counter of backend `name` (of `service`), whose durations
    /// go to `duration`: both counted in [`ProxyMetrics::traffic`].
    pub(crate) fn server_errors(
        &self,
        name: &str,
        service: &str,
        duration: &DurationHistogram,
    ) -> RequestCounter {
        let counters = TrafficCounters {
            service: service.to_string(),
            duration: duration.clone(),
            server_errors: RequestCounter::default(),
        };
        let errors = counters.server_errors.clone();
        crate::lock(&self.traffic).insert(name.to_string(), counters);
        errors
    }

    /// What the proxy sent each service since it started, summed over its
    /// backends.
    pub fn traffic(&self) -> Vec<TrafficTotals> {
        let mut by_service: std::collections::BTreeMap<String, TrafficTotals> = Default::default();
        for counters in crate::lock(&self.traffic).values() {
            let (requests, buckets) = counters.duration.totals();
            let totals = by_service
                .entry(counters.service.clone())
                .or_insert_with(|| TrafficTotals {
                    service: counters.service.clone(),
                    requests: 0,
                    errors: 0,
                    buckets: vec![0; DURATION_BUCKETS + 1],
                });
            totals.requests += requests;
            totals.errors += counters.server_errors.get();
            for (total, n) in totals.buckets.iter_mut().zip(buckets) {
                *total += n;
            }
        }
        by_service.into_values().collect()
    }

    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("proxy");
        r.register(
            "requests",
            "HTTP requests by service, instance and status class",
            self.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "HTTP request latency up to the response headers, retries included",
            self.duration.clone(),
        );
        r.register(
            "connections",
            "Client connections accepted by service",
            self.connections.clone(),
        );
        r.register(
            "connections_active",
            "Client connections open by service",
            self.active.clone(),
        );
        r.register(
            "retries",
            "Attempts after the first, by service",
            self.retries.clone(),
        );
        r.register(
            "retry_budget_exhausted",
            "Retries refused because the service's retry budget was spent",
            self.budget_exhausted.clone(),
        );
        r.register(
            "ejections",
            "Instances ejected after consecutive failures",
            self.ejections.clone(),
        );
        r.register(
            "panic",
            "1 while a service balances over all instances because too few are available",
            self.panic.clone(),
        );
        r.register(
            "errors",
            "Requests and connections the proxy failed, by reason (the x-signpost-error value)",
            self.errors.clone(),
        );
        r.register("listeners", "VIP listeners open", self.listeners.clone());
        r.register(
            "mesh_requests",
            "Calls the inbound listener decided (connections for L4, requests for L7), by source, destination and decision",
            self.mesh_requests.clone(),
        );
        r.register(
            "mesh_handshakes",
            "Mutual TLS handshakes of the mesh that succeeded, by side and whether the session was resumed",
            self.mesh_handshakes.clone(),
        );
        r.register(
            "mesh_handshake_failures",
            "Mutual TLS handshakes of the mesh that failed, by side and reason (expired, unknown_ca, wrong_identity, no_certificate, timeout, not_ready, other)",
            self.mesh_handshake_failures.clone(),
        );
        r.register(
            "mesh_connections_closed",
            "Open mesh connections closed because an intention came to deny them",
            self.mesh_closed.clone(),
        );
        r.register(
            "listen_errors",
            "VIP listeners that could not be opened",
            self.listen_errors.clone(),
        );
    }

    /// The decision counters of calls from `source` to `destination`,
    /// looked up once per connection rather than per request.
    pub(crate) fn mesh_calls(&self, source: &str, destination: &str) -> MeshCalls {
        let counter = |decision: &str| {
            self.mesh_requests
                .get_or_create(&MeshCallLabels {
                    source: source.to_string(),
                    destination: destination.to_string(),
                    decision: decision.to_string(),
                })
                .clone()
        };
        MeshCalls {
            allow: counter("allow"),
            deny: counter("deny"),
            shadow_deny: counter("shadow_deny"),
        }
    }

    pub(crate) fn mesh_handshake(&self, side: &str, resumed: bool) {
        self.mesh_handshakes
            .get_or_create(&HandshakeKindLabels {
                side: side.to_string(),
                resumed: resumed.to_string(),
            })
            .inc();
    }

    pub(crate) fn mesh_handshake_failed(&self, side: &str, reason: &str) {
        self.mesh_handshake_failures
            .get_or_create(&HandshakeLabels {
                side: side.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub(crate) fn mesh_closed(&self, n: u64) {
        self.mesh_closed.inc_by(n);
    }

    /// The request counters of one instance (`instance` empty: answers
    /// of the proxy itself), by status class.
    pub(crate) fn status_counters(&self, service: &str, instance: &str) -> StatusCounters {
        StatusCounters {
            family: self.requests.clone(),
            service: service.to_string(),
            instance: instance.to_string(),
            cells: Default::default(),
        }
    }

    pub(crate) fn duration(&self, service: &str) -> DurationHistogram {
        self.duration.get_or_create(&label(service)).clone()
    }

    /// The accepted and the open connections of a service.
    pub(crate) fn connection_metrics(&self, service: &str) -> (Counter, Gauge) {
        (
            self.connections.get_or_create(&label(service)).clone(),
            self.active.get_or_create(&label(service)).clone(),
        )
    }

    /// The retry, budget-exhausted and panic series of a service.
    pub(crate) fn retry_metrics(&self, service: &str) -> (Counter, Counter, Gauge) {
        (
            self.retries.get_or_create(&label(service)).clone(),
            self.budget_exhausted.get_or_create(&label(service)).clone(),
            self.panic.get_or_create(&label(service)).clone(),
        )
    }

    pub(crate) fn ejection(&self, service: &str, instance: &str) {
        self.ejections
            .get_or_create(&InstanceLabels {
                service: service.to_string(),
                instance: instance.to_string(),
            })
            .inc();
    }

    /// Drops the series of an instance that left a service (`""`: the
    /// proxy's own answers), so that a fleet whose instances come and go
    /// does not grow them for ever.
    pub(crate) fn remove_instance(&self, service: &str, instance: &str) {
        for class in 1..=5 {
            self.requests.remove(&RequestLabels {
                service: service.to_string(),
                instance: instance.to_string(),
                class: class_label(class),
            });
        }
        self.ejections.remove(&InstanceLabels {
            service: service.to_string(),
            instance: instance.to_string(),
        });
    }

    /// Drops the series of a service no longer in use on the host (and
    /// of its instances, which went with it).
    pub(crate) fn remove_service(&self, service: &str) {
        crate::lock(&self.traffic).remove(service);
        let labels = label(service);
        self.duration.remove(&labels);
        self.connections.remove(&labels);
        self.active.remove(&labels);
        self.retries.remove(&labels);
        self.budget_exhausted.remove(&labels);
        self.panic.remove(&labels);
        for reason in crate::error::REASONS {
            self.errors.remove(&ReasonLabels {
                service: service.to_string(),
                reason: reason.to_string(),
            });
        }
        self.remove_instance(service, "");
    }

    pub(crate) fn error(&self, service: &str, reason: &str) {
        self.errors
            .get_or_create(&ReasonLabels {
                service: service.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub(crate) fn listeners(&self) -> &Gauge {
        &self.listeners
    }

    pub(crate) fn listen_error(&self) {
        self.listen_errors.inc();
    }
}

/// The `class` label of status class `class` (2 for 200 to 299): `2xx`.
fn class_label(class: u16) -> String {
    format!("{class}xx")
}

/// Request counters by status class, each created on its first use and
/// then counted without a lookup.
pub(crate) struct StatusCounters {
    family: Family<RequestLabels, RequestCounter>,
    service: String,
    instance: String,
    cells: [OnceLock<RequestCounter>; 5],
}

impl StatusCounters {
    pub(crate) fn count(&self, status: u16) {
        let Some(cell) = self.cells.get(usize::from(status / 100).wrapping_sub(1)) else {
            return;
        };
        cell.get_or_init(|| {
            self.family
                .get_or_create(&RequestLabels {
                    service: self.service.clone(),
                    instance: self.instance.clone(),
                    class: class_label(status / 100),
                })
                .clone()
        })
        .inc();
    }
}

/// Upper bounds of the request duration buckets: 0.5 ms doubling to
/// about 16 s, then +Inf.
const DURATION_BUCKETS: usize = 16;

fn duration_bound(bucket: usize) -> f64 {
    0.0005 * f64::from(1u32 << bucket)
}

/// The request duration histogram of a service. Each worker thread counts
/// into a shard of its own, summed when scraped: a shared histogram (the
/// Prometheus client's takes a mutex per observation) had both threads
/// contend for one lock on every request.
#[derive(Clone, Debug)]
pub(crate) struct DurationHistogram(Arc<PerWorker<Shard>>);

/// One thread's counts.
#[derive(Default, Debug)]
struct Shard {
    /// The sum of the observations, as f64 bits.
    sum: AtomicU64,
    count: AtomicU64,
    /// Per bucket (not cumulative), the last one +Inf.
    buckets: [AtomicU64; DURATION_BUCKETS + 1],
}

impl Default for DurationHistogram {
    fn default() -> Self {
        DurationHistogram(Arc::new(PerWorker::new(shard_count(), Shard::default)))
    }
}

/// One shard per core: the proxy's default count of worker threads.
fn shard_count() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

impl DurationHistogram {
    /// The observations, and their count per bucket, over every shard.
    fn totals(&self) -> (u64, [u64; DURATION_BUCKETS + 1]) {
        let mut count = 0;
        let mut buckets = [0u64; DURATION_BUCKETS + 1];
        for shard in self.0.iter() {
            count += shard.count.load(Ordering::Relaxed);
            for (total, n) in buckets.iter_mut().zip(&shard.buckets) {
                *total += n.load(Ordering::Relaxed);
            }
        }
        (count, buckets)
    }

    pub(crate) fn observe(&self, seconds: f64) {
        let shard = self.0.local();
        let bucket = (0..DURATION_BUCKETS)
            .find(|&b| seconds <= duration_bound(b))
            .unwrap_or(DURATION_BUCKETS);
        shard.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        shard.count.fetch_add(1, Ordering::Relaxed);
        // Never fails: the closure always gives a value.
        let _ = shard
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |sum| {
                Some((f64::from_bits(sum) + seconds).to_bits())
            });
    }
}

impl TypedMetric for DurationHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DurationHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut sum = 0.0;
        let mut count = 0;
        // The encoder takes (upper bound, count) per bucket.
        let mut buckets: Vec<(f64, u64)> = (0..=DURATION_BUCKETS)
            .map(|b| match b {
                DURATION_BUCKETS => (f64::INFINITY, 0),
                b => (duration_bound(b), 0),
            })
            .collect();
        for shard in self.0.iter() {
            sum += f64::from_bits(shard.sum.load(Ordering::Relaxed));
            count += shard.count.load(Ordering::Relaxed);
            for (total, n) in buckets.iter_mut().zip(&shard.buckets) {
                total.1 += n.load(Ordering::Relaxed);
            }
        }
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A request counter, sharded per worker thread like
/// [`DurationHistogram`] (one line per thread, summed when scraped).
#[derive(Clone, Debug)]
pub(crate) struct RequestCounter(Arc<PerWorker<AtomicU64>>);

impl Default for RequestCounter {
    fn default() -> Self {
        RequestCounter(Arc::new(PerWorker::new(shard_count(), AtomicU64::default)))
    }
}

impl RequestCounter {
    pub(crate) fn inc(&self) {
        self.0.local().fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }
}

impl TypedMetric for RequestCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for RequestCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let total: u64 = self.0.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        encoder.encode_counter::<NoLabelSet, u64, f64>(&total, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

fn label(service: &str) -> ServiceLabels {
    ServiceLabels {
        service: service.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharded_metrics_sum_their_shards_when_scraped() {
        let metrics = ProxyMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let web = metrics.duration("web");
        // The bucket bounds are inclusive; 100 s is past the last one.
        for seconds in [0.0005, 0.0007, 0.002, 100.0] {
            web.observe(seconds);
        }
        std::thread::scope(|s| {
            s.spawn(|| web.observe(0.0007));
        });
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let line = |le: &str| {
            text.lines()
                .find(|l| {
                    l.contains("request_duration_seconds_bucket")
                        && l.contains(&format!("le=\"{le}\""))
                })
                .unwrap_or_else(|| panic!("no le={le} bucket in {text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(line("0.0005"), "1");
        assert_eq!(line("0.001"), "3", "cumulative, both threads");
        assert_eq!(line("0.002"), "4");
        assert_eq!(line("+Inf"), "5");
        assert!(
            text.contains("request_duration_seconds_count{service=\"web\"} 5"),
            "{text}"
        );

        let counts = metrics.status_counters("web", "10.0.0.1:80");
        counts.count(200);
        std::thread::scope(|s| {
            s.spawn(|| counts.count(204));
        });
        counts.count(503);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                "proxy_requests_total{service=\"web\",instance=\"10.0.0.1:80\",class=\"2xx\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("class=\"5xx\"} 1"), "{text}");
    }
}
