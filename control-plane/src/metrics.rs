//! The control plane's Prometheus metrics, worth alerting on (the rules
//! and dashboards shipped in `packaging/monitoring/` use them): agent
//! sessions and how far behind the deepest one is, the fan-out's
//! latency, nodes by liveness and the probes that decide it, commands
//! not yet applied, the store's quorum, errors and write latency, ACL
//! denials and when the certificates expire. Counters are kept by the
//! parts that count (the catalog, the store, the audit log); state
//! gauges are read at scrape time.

use std::path::PathBuf;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::catalog::{Catalog, NodeStatus};
use crate::commands::Commands;
use signpost_daemon::http_server::ServerMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

/// A probe's verdict.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// What the store was doing.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabels {
    certificate: &'static str,
}

/// The certificates whose expiry is watched: the HTTP API's, the gRPC
/// listener's and the CA that signs agents' client certificates (files),
/// and the mesh CA's active root (from the store, at scrape time).
pub struct Certificates {
    pub files: Vec<(&'static str, PathBuf)>,
}

pub struct Metrics {
    registry: Registry,
    sessions: Gauge,
    queue_depth_max: Gauge,
    nodes: Family<StatusLabels, Gauge>,
    instances: Gauge,
    quorum: Gauge,
    leader: Gauge,
    commands_active: Gauge,
    command_acks_pending: Gauge,
    command_unapplied_oldest: Gauge,
    certificate_expiry: Family<CertificateLabels, Gauge>,
    certificates: Certificates,
    /// The HTTP API's own closings (`signpost_control_plane_http_connections_closed_total`).
    pub http_server: ServerMetrics,
}

impl Metrics {
    pub fn new(
        catalog: &Catalog,
        acl_denials: prometheus_client::metrics::counter::Counter,
        certificates: Certificates,
    ) -> Self {
        let mut registry = Registry::with_prefix("signpost_control_plane");
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let sessions = gauge(&mut registry, "sessions", "Agent sessions open");
        let queue_depth_max = gauge(
            &mut registry,
            "session_queue_depth_max",
            "Messages waiting for the slowest agent session (dropped at 4096)",
        );
        let nodes = Family::<StatusLabels, Gauge>::default();
        registry.register("nodes", "Nodes by liveness", nodes.clone());
        let instances = gauge(
            &mut registry,
            "instances",
            "Service instances in the catalog",
        );
        let quorum = gauge(
            &mut registry,
            "store_quorum",
            "Whether the store takes writes (0: no etcd quorum, served from memory)",
        );
        let leader = gauge(
            &mut registry,
            "leader",
            "Whether this replica probes, fails and reaps nodes (always 1 on the file store)",
        );
        let commands_active = gauge(
            &mut registry,
            "commands_active",
            "Operator commands in force",
        );
        let command_acks_pending = gauge(
            &mut registry,
            "command_acks_pending",
            "Over the commands in force: agents using the target service that have not applied it",
        );
        let command_unapplied_oldest = gauge(
            &mut registry,
            "command_unapplied_oldest_seconds",
            "Age of the oldest command in force that some agent using its service has not applied (0: none)",
        );
        let certificate_expiry = Family::<CertificateLabels, Gauge>::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When each certificate expires (Unix seconds)",
            certificate_expiry.clone(),
        );
        let stats = catalog.stats();
        registry.register(
            "fanout_seconds",
            "Time to queue one catalog change for every agent subscribed to its services",
            stats.fanout_seconds,
        );
        registry.register(
            "sessions_dropped",
            "Agent sessions dropped because the agent could not keep up",
            stats.sessions_dropped,
        );
        registry.register(
            "probes",
            "Peer probes of unreachable nodes, by verdict",
            stats.probes,
        );
        let store = crate::store::stats();
        registry.register(
            "store_errors",
            "Store writes that failed, by operation",
            store.errors.clone(),
        );
        registry.register(
            "store_write_seconds",
            "Store write latency (the catalog snapshot's file, etcd)",
            store.write_seconds.clone(),
        );
        registry.register(
            "acl_denials",
            "Requests refused for their token (or for having none)",
            acl_denials,
        );
        let http_server = ServerMetrics::default();
        http_server.register(&mut registry, "http");
        Metrics {
            registry,
            sessions,
            queue_depth_max,
            nodes,
            instances,
            quorum,
            leader,
            commands_active,
            command_acks_pending,
            command_unapplied_oldest,
            certificate_expiry,
            certificates,
            http_server,
        }
    }

    /// The metrics now; `mesh_root` is the mesh CA's active root (PEM),
    /// when there is one.
    pub fn render(
        &self,
        catalog: &Catalog,
        commands: &Commands,
        quorum: bool,
        mesh_root: Option<&str>,
    ) -> String {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.quorum.set(i64::from(quorum));
        self.leader.set(i64::from(catalog.is_leader()));
        let now = signpost_core::command::now_millis();
        let (by_status, instances, queue, pending) = catalog.read(|inner| {
            let by_status = NodeStatus::ALL.map(|status| {
                let n = inner
                    .nodes
                    .values()
                    .filter(|n| n.liveness.status == status)
                    .count();
                (status, n)
            });
            let instances: usize = inner.nodes.values().map(|n| n.instances.len()).sum();
            // Each command in force: how many agents using its service
            // have not applied it, and its age.
            let pending: Vec<(usize, u64)> = commands
                .list()
                .iter()
                .filter(|c| c.state(now) == "active")
                .map(|c| {
                    let applied = commands.applied_by(&c.id);
                    let missing = inner
                        .subscriber_nodes(&c.target.service)
                        .iter()
                        .filter(|n| applied.binary_search(n).is_err())
                        .count();
                    (missing, now.saturating_sub(c.created_at))
                })
                .collect();
            (by_status, instances, inner.queue_depth_max(), pending)
        });
        self.sessions.set(gauge(catalog.session_count()));
        self.instances.set(gauge(instances));
        self.queue_depth_max.set(gauge(queue));
        for (status, n) in by_status {
            self.nodes
                .get_or_create(&StatusLabels {
                    status: status.as_str(),
                })
                .set(gauge(n));
        }
        self.commands_active.set(gauge(pending.len()));
        self.command_acks_pending
            .set(gauge(pending.iter().map(|(missing, _)| missing).sum()));
        let oldest = pending
            .iter()
            .filter(|(missing, _)| *missing > 0)
            .map(|(_, age_ms)| age_ms / 1000)
            .max()
            .unwrap_or(0);
        self.command_unapplied_oldest
            .set(i64::try_from(oldest).unwrap_or(i64::MAX));
        let files = self.certificates.files.iter().map(|(name, path)| {
            let pem = std::fs::read(path)
                .inspect_err(|e| tracing::debug!(path = %path.display(), error = %e, "cannot read a certificate for its expiry"))
                .ok();
            (*name, pem)
        });
        let mesh = std::iter::once(("mesh_ca", mesh_root.map(|p| p.as_bytes().to_vec())));
        for (name, pem) in files.chain(mesh) {
            if let Some(at) = pem.as_deref().and_then(not_after) {
                self.certificate_expiry
                    .get_or_create(&CertificateLabels { certificate: name })
                    .set(at);
            }
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// When the first certificate in `pem` expires (Unix seconds).
fn not_after(pem: &[u8]) -> Option<i64> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    let cert = block.parse_x509().ok()?;
    Some(cert.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expiry_of_a_certificate_is_read_from_its_pem() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 3, 4);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        // 2031-03-04T00:00:00Z
        assert_eq!(not_after(cert.pem().as_bytes()), Some(1_930_348_800));
        assert_eq!(not_after(b"not a certificate"), None);
    }
}
