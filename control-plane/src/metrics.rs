//! The control plane's Prometheus metrics; state gauges are refreshed from
//! the catalog at scrape time.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::catalog::{Catalog, NodeStatus};
use signpost_daemon::http_server::ServerMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

pub struct Metrics {
    registry: Registry,
    sessions: Gauge,
    nodes: Family<StatusLabels, Gauge>,
    instances: Gauge,
    quorum: Gauge,
    leader: Gauge,
    /// The HTTP API's own closings (`signpost_control_plane_http_connections_closed_total`).
    pub http_server: ServerMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("signpost_control_plane");
        let sessions = Gauge::default();
        registry.register("sessions", "Agent sessions open", sessions.clone());
        let nodes = Family::<StatusLabels, Gauge>::default();
        registry.register("nodes", "Nodes by liveness", nodes.clone());
        let instances = Gauge::default();
        registry.register(
            "instances",
            "Service instances in the catalog",
            instances.clone(),
        );
        let quorum = Gauge::default();
        registry.register(
            "store_quorum",
            "Whether the store takes writes (0: no etcd quorum, served from memory)",
            quorum.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "Whether this replica probes, fails and reaps nodes (always 1 on the file store)",
            leader.clone(),
        );
        let http_server = ServerMetrics::default();
        http_server.register(&mut registry, "http");
        Metrics {
            registry,
            sessions,
            nodes,
            instances,
            quorum,
            leader,
            http_server,
        }
    }
}

impl Metrics {
    pub fn render(&self, catalog: &Catalog, quorum: bool) -> String {
        self.quorum.set(i64::from(quorum));
        self.leader.set(i64::from(catalog.is_leader()));
        let (by_status, instances) = catalog.read(|inner| {
            let by_status = NodeStatus::ALL.map(|status| {
                let n = inner
                    .nodes
                    .values()
                    .filter(|n| n.liveness.status == status)
                    .count();
                (status, n)
            });
            let instances: usize = inner.nodes.values().map(|n| n.instances.len()).sum();
            (by_status, instances)
        });
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.sessions.set(gauge(catalog.session_count()));
        self.instances.set(gauge(instances));
        for (status, n) in by_status {
            self.nodes
                .get_or_create(&StatusLabels {
                    status: status.as_str(),
                })
                .set(gauge(n));
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}
