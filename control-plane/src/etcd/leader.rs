//! The work that must happen once, on one replica: probing unreachable
//! nodes, failing and reaping them, dropping ended commands and trimming
//! the shared audit log. The leader is the replica whose id is in the
//! `leader` key, which hangs on its lease: when it dies the key goes with
//! the lease and every replica campaigns again (the follow loop wakes
//! them); the first to create the key leads.
//!
//! The leader's verdicts are written guarded by its leadership and by the
//! node's state: a node that reconnected meanwhile (its presence key is
//! back) is never failed or reaped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Etcd, on_lease, prefix_end};
use crate::catalog::{Catalog, Decision};
use crate::store::Shared as _;

/// How often the leader moves liveness on (as the lone replica does).
const TICK: Duration = Duration::from_millis(250);
/// A follower campaigns at least this often (and whenever the key goes).
const CAMPAIGN: Duration = Duration::from_secs(2);
/// A decision not applied yet is written again after this.
const RESEND: Duration = Duration::from_secs(5);
/// How often the leader trims the shared audit log and ended commands.
const HOUSEKEEPING: Duration = Duration::from_secs(30);
/// Audit entries kept in the store.
const AUDIT_KEPT: i64 = 10_000;

/// Campaigns and leads until `shutdown`.
pub async fn run(
    etcd: Arc<Etcd>,
    catalog: Arc<Catalog>,
    commands: Arc<crate::commands::Commands>,
    reap_after: Duration,
    leader_gone: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let leader_key = etcd.key("leader");
    loop {
        let lease = etcd.lease();
        let campaign = Txn::new()
            .when([Compare::create_revision(
                leader_key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(
                leader_key.clone(),
                etcd.replica.clone(),
                on_lease(lease),
            )]);
        match etcd.txn(campaign).await {
            Ok(true) => {
                tracing::info!(replica = %etcd.replica, "elected leader: this replica probes, fails and reaps nodes");
                catalog.set_leader(true);
                lead(&etcd, &catalog, &commands, reap_after, lease, &shutdown).await;
                catalog.set_leader(false);
                if shutdown.is_cancelled() {
                    resign(&etcd).await;
                    return;
                }
                tracing::warn!(replica = %etcd.replica, "no longer the leader");
            }
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e, "cannot campaign"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = leader_gone.notified() => {}
            _ = tokio::time::sleep(CAMPAIGN) => {}
        }
    }
}

/// Leads while the lease it was elected on lives and the key is ours.
async fn lead(
    etcd: &Etcd,
    catalog: &Catalog,
    commands: &crate::commands::Commands,
    reap_after: Duration,
    lease: i64,
    shutdown: &CancellationToken,
) {
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent: HashMap<Decision, Instant> = HashMap::new();
    let mut housekeeping = Instant::now();
    let mut checked = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        if etcd.lease() != lease {
            return;
        }
        catalog.tick(reap_after);
        let now = Instant::now();
        sent.retain(|_, at| now.duration_since(*at) < RESEND);
        for decision in catalog.take_decisions() {
            if sent.contains_key(&decision) {
                continue;
            }
            sent.insert(decision.clone(), now);
            match record(etcd, &decision, lease).await {
                Ok(true) => tracing::debug!(?decision, "recorded"),
                Ok(false) => tracing::info!(
                    ?decision,
                    "not recorded: the node changed meanwhile, or this replica no longer leads"
                ),
                Err(e) => tracing::warn!(?decision, error = %e, "cannot record; trying again"),
            }
        }
        if now.duration_since(checked) >= CAMPAIGN {
            checked = now;
            if !still_leader(etcd).await {
                return;
            }
        }
        if now.duration_since(housekeeping) >= HOUSEKEEPING {
            housekeeping = now;
            keep_house(etcd, commands).await;
        }
    }
}

async fn still_leader(etcd: &Etcd) -> bool {
    let mut client = etcd.client();
    match etcd.call(client.get(etcd.key("leader"), None)).await {
        Ok(answer) => answer
            .kvs()
            .first()
            .is_some_and(|kv| kv.value() == etcd.replica.as_bytes()),
        // Cannot tell: keep leading; the guarded writes refuse if not.
        Err(_) => true,
    }
}

async fn resign(etcd: &Etcd) {
    let key = etcd.key("leader");
    let txn = Txn::new()
        .when([Compare::value(
            key.clone(),
            CompareOp::Equal,
            etcd.replica.clone(),
        )])
        .and_then([TxnOp::delete(key, None)]);
    if let Err(e) = etcd.txn(txn).await {
        tracing::warn!(error = %e, "cannot resign: another replica leads once the lease ends");
    }
}

/// A probe request for agents on other replicas (`probes/<id>`; their
/// answers are `probes/<id>/<peer>`, `1` when they reach the node).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ProbeRecord {
    pub node: String,
    pub address: String,
    pub peers: Vec<String>,
}

/// Writes a decision, guarded: whether it went through.
async fn record(
    etcd: &Etcd,
    decision: &Decision,
    lease: i64,
) -> Result<bool, crate::store::StoreError> {
    let leading = Compare::value(etcd.key("leader"), CompareOp::Equal, etcd.replica.clone());
    let txn = match decision {
        Decision::Failed { node, at_unix_ms } => Txn::new()
            .when([
                leading,
                Compare::create_revision(
                    etcd.key(&format!("presence/{node}")),
                    CompareOp::Equal,
                    0,
                ),
                Compare::create_revision(etcd.key(&format!("nodes/{node}")), CompareOp::Greater, 0),
            ])
            .and_then([TxnOp::put(
                etcd.key(&format!("failed/{node}")),
                at_unix_ms.to_string(),
                None,
            )]),
        Decision::Reap { node } => Txn::new()
            .when([
                leading,
                Compare::create_revision(
                    etcd.key(&format!("presence/{node}")),
                    CompareOp::Equal,
                    0,
                ),
                Compare::create_revision(
                    etcd.key(&format!("failed/{node}")),
                    CompareOp::Greater,
                    0,
                ),
            ])
            .and_then([
                TxnOp::delete(etcd.key(&format!("nodes/{node}")), None),
                TxnOp::delete(etcd.key(&format!("failed/{node}")), None),
            ]),
        Decision::Probe {
            id,
            node,
            address,
            peers,
        } => {
            let record = ProbeRecord {
                node: node.clone(),
                address: address.clone(),
                peers: peers.clone(),
            };
            let bytes = serde_json::to_vec(&record).unwrap_or_default();
            // On the leader's lease: gone with it.
            Txn::new().when([leading]).and_then([TxnOp::put(
                etcd.key(&format!("probes/{id}")),
                bytes,
                on_lease(lease),
            )])
        }
        Decision::ProbeDone { id } => {
            let key = etcd.key(&format!("probes/{id}"));
            let end = prefix_end(&format!("{key}/"));
            Txn::new().and_then([TxnOp::delete(
                key,
                Some(etcd_client::DeleteOptions::new().with_range(end)),
            )])
        }
    };
    etcd.txn(txn).await
}

/// Drops ended commands past what is kept and the oldest audit entries
/// past [`AUDIT_KEPT`].
async fn keep_house(etcd: &Etcd, commands: &crate::commands::Commands) {
    for id in commands.ended_to_drop() {
        if let Err(e) = etcd.delete(format!("commands/{id}")).await {
            tracing::warn!(error = %e, "cannot drop an ended command");
            return;
        }
    }
    let start = etcd.key("audit/");
    let end = prefix_end(&start);
    let mut client = etcd.client();
    let count = match etcd
        .call(client.get(
            start.clone(),
            Some(GetOptions::new().with_range(end.clone()).with_count_only()),
        ))
        .await
    {
        Ok(answer) => answer.count(),
        Err(_) => return,
    };
    let excess = count - AUDIT_KEPT;
    if excess <= 0 {
        return;
    }
    // Keys sort by time: the first `excess` are the oldest.
    let oldest = etcd
        .call(
            client.get(
                start.clone(),
                Some(
                    GetOptions::new()
                        .with_range(end)
                        .with_keys_only()
                        .with_limit(excess),
                ),
            ),
        )
        .await;
    if let Ok(answer) = oldest
        && let Some(last) = answer.kvs().last()
    {
        let mut upto = last.key().to_vec();
        upto.push(0);
        let deleted = etcd
            .call(client.delete(
                start,
                Some(etcd_client::DeleteOptions::new().with_range(upto)),
            ))
            .await;
        if let Err(e) = deleted {
            tracing::warn!(error = %e, "cannot trim the shared audit log");
        }
    }
}
