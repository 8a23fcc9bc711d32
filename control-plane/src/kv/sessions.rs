//! What ends a session besides its owner: its node failing, one of its
//! checks going critical (or away), its TTL running out (Consul's grace:
//! twice the TTL after the last renewal). The leader watches every
//! session against the catalog and ends those that must end, which
//! releases (or deletes) their keys with their lock delay.

use std::sync::Arc;
use std::time::Duration;

use signpost_core::kv::SessionSpec;
use signpost_core::model::Health;
use tokio_util::sync::CancellationToken;

use super::{Kv, Session, now_ms};
use crate::catalog::{Catalog, Inner, NodeEntry, NodeStatus};

/// How often sessions are looked at besides every catalog change (TTLs).
const TICK: Duration = Duration::from_millis(500);

/// Whether a session may be created on `node` with `spec`'s checks: the
/// node is known and not failed, every check exists and is not critical.
pub fn check_new(catalog: &Catalog, spec: &SessionSpec, node: &str) -> Result<(), String> {
    catalog.read(|inner| {
        let Some(entry) = inner.nodes.get(node) else {
            return Err(format!(
                "Missing node registration: node {node:?} is not in the catalog"
            ));
        };
        if spec.node_health && entry.liveness.status == NodeStatus::Failed {
            return Err(format!("node {node:?} has failed"));
        }
        for check in &spec.checks {
            match check_health(entry, check) {
                None => {
                    return Err(format!(
                        "Missing check {check:?} registration on node {node:?}"
                    ));
                }
                Some(Health::Critical) => {
                    return Err(format!("Check {check:?} is in critical state"));
                }
                Some(_) => {}
            }
        }
        Ok(())
    })
}

/// The health of check `id` on a node (a service's or the node's).
fn check_health(node: &NodeEntry, id: &str) -> Option<Health> {
    node.instances
        .values()
        .flat_map(|i| i.checks.iter())
        .chain(node.node_checks.iter())
        .find(|c| c.id == id)
        .map(|c| c.health().unwrap_or(Health::Critical))
}

/// Why a session must end now, if it must.
fn verdict(
    inner: &Inner,
    s: &Session,
    leader_since_ms: u64,
    now: u64,
    warming_up: bool,
) -> Option<String> {
    if let Some(ttl) = s.ttl {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX / 4);
        if s.renewed_ms.max(leader_since_ms) + 2 * ttl_ms < now {
            return Some(format!(
                "TTL {} ran out",
                signpost_core::duration::format(ttl)
            ));
        }
    }
    let Some(node) = inner.nodes.get(&s.node) else {
        // A control plane warming up has not heard from every agent yet.
        return (!warming_up).then(|| format!("node {:?} left the catalog", s.node));
    };
    if s.node_health && node.liveness.status == NodeStatus::Failed {
        return Some(format!("node {:?} failed", s.node));
    }
    for check in &s.checks {
        match check_health(node, check) {
            None => return Some(format!("check {check:?} was deregistered")),
            Some(Health::Critical) => return Some(format!("check {check:?} is critical")),
            Some(_) => {}
        }
    }
    None
}

/// Ends sessions as they must end, while this replica leads.
pub async fn run(kv: Arc<Kv>, catalog: Arc<Catalog>, stop: CancellationToken) {
    let mut changes = catalog.subscribe_changes();
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leader_since: Option<u64> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
            _ = changes.changed() => {}
        }
        if !catalog.is_leader() {
            leader_since = None;
            continue;
        }
        let now = now_ms();
        // A new leader gives every session a full grace period: the
        // renewals went to whichever replica the clients talked to.
        let since = *leader_since.get_or_insert(now);
        let warming_up = catalog.warming_up().is_some();
        let (_, sessions) = kv.mirror().sessions(None);
        let doomed: Vec<(String, String)> = catalog.read(|inner| {
            sessions
                .iter()
                .filter_map(|s| {
                    verdict(inner, s, since, now, warming_up).map(|why| (s.id.clone(), why))
                })
                .collect()
        });
        for (id, why) in doomed {
            if let Err(e) = kv.end_session(&id, &why).await {
                tracing::warn!(session = id, reason = why, error = %e, "cannot end the session; trying again");
            }
        }
        if kv.mirror().delays_passed(now) > 0
            && let Err(e) = kv.forget_delays().await
        {
            tracing::warn!(error = %e, "cannot delete passed lock delays; trying again");
        }
    }
}
