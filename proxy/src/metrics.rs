//! The proxy's Prometheus metrics, per service (the VIP name: `web` or
//! `v2.web`) and, where it matters, per instance (`ip:port`).

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

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

/// Every proxy metric; register once into the agent's registry.
pub struct ProxyMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<ServiceLabels, Histogram>,
    connections: Family<ServiceLabels, Counter>,
    active: Family<ServiceLabels, Gauge>,
    retries: Family<ServiceLabels, Counter>,
    budget_exhausted: Family<ServiceLabels, Counter>,
    ejections: Family<InstanceLabels, Counter>,
    panic: Family<ServiceLabels, Gauge>,
    errors: Family<ReasonLabels, Counter>,
    listeners: Gauge,
    listen_errors: Counter,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        ProxyMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                // 0.5 ms to about 16 s.
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    0.0005, 2.0, 16,
                ))
            }),
            connections: Family::default(),
            active: Family::default(),
            retries: Family::default(),
            budget_exhausted: Family::default(),
            ejections: Family::default(),
            panic: Family::default(),
            errors: Family::default(),
            listeners: Gauge::default(),
            listen_errors: Counter::default(),
        }
    }
}

impl ProxyMetrics {
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
            "listen_errors",
            "VIP listeners that could not be opened",
            self.listen_errors.clone(),
        );
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

    pub(crate) fn duration(&self, service: &str) -> Histogram {
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

/// Request counters by status class, each created on its first use and
/// then counted without a lookup.
pub(crate) struct StatusCounters {
    family: Family<RequestLabels, Counter>,
    service: String,
    instance: String,
    cells: [OnceLock<Counter>; 5],
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
                    class: format!("{}xx", status / 100),
                })
                .clone()
        })
        .inc();
    }
}

fn label(service: &str) -> ServiceLabels {
    ServiceLabels {
        service: service.to_string(),
    }
}
