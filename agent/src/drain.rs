//! Draining instances: an instance in maintenance gets no new request
//! from any agent once they all applied that, and is drained once what
//! their proxies still had in flight to it is done (they report it on
//! their streams, see `fleet::FleetCache::in_flight_changes`).
//! `signpost drain` drains one instance; the agent's own shutdown (not a
//! handover) drains every instance on its node first.

use std::sync::Arc;
use std::time::Duration;

use signpost_proto::AckStatus;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::fleet::FleetCache;

/// The node maintenance reason while the agent stops: never saved, so
/// the agent starts again in service.
pub(crate) const STOPPING: &str = "Agent stopping: draining its instances (signpost)";

/// How long after every consumer applied a drain their in-flight counts
/// may still be on their way (they look every 200 ms).
const IN_FLIGHT_SETTLE: Duration = Duration::from_millis(600);

/// How often the control plane is asked while waiting.
const POLL: Duration = Duration::from_millis(100);

/// Waits until every agent subscribed to `service` applied its latest
/// change and has nothing in flight to the instance at `address`, or
/// `deadline`, or `cancel`. The last status heard, if any.
pub(crate) async fn wait(
    fleet: &FleetCache,
    service: &str,
    address: &str,
    deadline: Instant,
    cancel: &CancellationToken,
) -> Option<AckStatus> {
    let mut index = 0;
    let mut last: Option<AckStatus> = None;
    let mut acked_at: Option<Instant> = None;
    loop {
        let ask = fleet.ack_status(service, index, address);
        match tokio::time::timeout_at(deadline, ask).await {
            Ok(Some(status)) => {
                index = status.index;
                let now = Instant::now();
                let done = if status.acked >= status.subscribers {
                    let since = *acked_at.get_or_insert(now);
                    status.in_flight.is_empty() && now.duration_since(since) >= IN_FLIGHT_SETTLE
                } else {
                    acked_at = None;
                    false
                };
                last = Some(status);
                if done {
                    return last;
                }
            }
            Ok(None) | Err(_) => return last,
        }
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => return last,
            () = tokio::time::sleep(POLL) => {}
            () = cancel.cancelled() => return last,
        }
    }
}

/// Whether a status says the instance is drained.
pub(crate) fn drained(status: Option<&AckStatus>) -> bool {
    status.is_some_and(|s| s.acked >= s.subscribers && s.in_flight.is_empty())
}

/// The address consumers' proxies know an instance by: its own, or its
/// node's, and its port.
pub(crate) fn instance_address(service_address: &str, node_address: &str, port: u16) -> String {
    let ip = if service_address.is_empty() {
        node_address
    } else {
        service_address
    };
    match ip.parse::<std::net::IpAddr>() {
        Ok(ip) => std::net::SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{ip}:{port}"),
    }
}

/// The agent's own shutdown: puts the node in maintenance (not saved)
/// and waits, up to `limit`, until every instance on it is drained. Not
/// connected to a control plane, there is nobody to wait for.
pub(crate) async fn node(agent: &Arc<Agent>, fleet: &FleetCache, limit: Duration) {
    if !fleet.read(|f| f.connected) {
        tracing::info!("stopping without a control plane connection: no instance to drain");
        return;
    }
    let mut instances: Vec<(String, String)> = agent.state.read(|inner| {
        inner
            .services
            .values()
            .filter(|s| s.def.port != 0)
            .map(|s| {
                let address = instance_address(&s.def.address, &inner.node.address, s.def.port);
                (s.def.name.to_string(), address)
            })
            .collect()
    });
    instances.sort();
    instances.dedup();
    if instances.is_empty() {
        return;
    }
    tracing::info!(instances = instances.len(), limit = %signpost_core::duration::format(limit), "stopping: draining this node's instances");
    agent.set_node_maintenance(Some(STOPPING.to_string()));
    let deadline = Instant::now() + limit;
    let never = CancellationToken::new();
    for (service, address) in &instances {
        let status = wait(fleet, service, address, deadline, &never).await;
        if !drained(status.as_ref()) {
            let (pending, in_flight) = status.map_or((Vec::new(), Vec::new()), |s| {
                (s.pending, s.in_flight.into_iter().map(|f| f.node).collect())
            });
            tracing::warn!(%service, %address, ?pending, ?in_flight, "stopping before the instance was drained (drain_timeout)");
        }
    }
    tracing::info!("this node's instances are drained");
}
