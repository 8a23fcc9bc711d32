//! Drains across replicas, the store's side (see the catalog's
//! `drains`): `drains/<service>` holds a question asked through some
//! replica (its value: that replica, on its lease), and
//! `drain-acks/<service>/<replica>` each replica's answer (JSON, on its
//! lease). One task per replica writes what the catalog says is due;
//! the watch brings every replica's keys back to every catalog.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, KeyValue, Txn, TxnOp};
use tokio_util::sync::CancellationToken;

use super::{Etcd, MAX_RECORD, on_lease};
use crate::catalog::{Catalog, DrainAnswer};

/// How often the catalog is asked what to write: answers reach the
/// asking replica within about this plus etcd's round trip.
const TICK: Duration = Duration::from_millis(100);
/// A write not yet seen back through the watch is not repeated for this
/// long.
const ECHO_WAIT: Duration = Duration::from_secs(1);

/// Applies a drain key from the store to the catalog; whether `key` was
/// one.
pub fn apply(catalog: &Catalog, key: &str, kv: &KeyValue, deleted: bool) -> bool {
    if let Some(service) = key.strip_prefix("drains/") {
        let created = u64::try_from(kv.create_revision()).unwrap_or(0);
        catalog.store_drain(service, (!deleted).then_some(created));
        return true;
    }
    let Some(rest) = key.strip_prefix("drain-acks/") else {
        return false;
    };
    let Some((service, replica)) = rest.split_once('/') else {
        return true;
    };
    let answer = if deleted {
        None
    } else {
        match serde_json::from_slice::<DrainAnswer>(kv.value()) {
            Ok(answer) => Some(answer),
            Err(error) => {
                tracing::error!(key, %error, "unreadable drain answer in etcd: ignored");
                return true;
            }
        }
    };
    catalog.store_drain_answer(service, replica, answer);
    true
}

/// Writes this replica's drain questions and answers until `shutdown`;
/// a write etcd refuses is tried again on the next tick.
pub async fn run(etcd: Arc<Etcd>, catalog: Arc<Catalog>, shutdown: CancellationToken) {
    // What was written lately, so that a write is not repeated while its
    // echo is on its way.
    let mut recent: HashMap<String, (Option<Vec<u8>>, Instant)> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        recent.retain(|_, (_, at)| now.duration_since(*at) < ECHO_WAIT);
        let work = catalog.drain_work(now);
        for (key, value) in work.puts {
            if recent
                .get(&key)
                .is_some_and(|(v, _)| v.as_ref() == Some(&value))
            {
                continue;
            }
            if value.len() > MAX_RECORD {
                tracing::error!(%key, bytes = value.len(), "drain answer too large for etcd: not written");
                continue;
            }
            let put = TxnOp::put(etcd.key(&key), value.clone(), on_lease(etcd.lease()));
            match etcd.txn(Txn::new().and_then([put])).await {
                Ok(_) => {
                    recent.insert(key, (Some(value), now));
                }
                Err(error) => {
                    tracing::warn!(%key, %error, "cannot write a drain record; trying again")
                }
            }
        }
        for (key, only_if) in work.deletes {
            if recent.get(&key).is_some_and(|(v, _)| v.is_none()) {
                continue;
            }
            let full = etcd.key(&key);
            let delete = TxnOp::delete(full.clone(), None);
            let txn = match &only_if {
                Some(value) => Txn::new()
                    .when([Compare::value(full, CompareOp::Equal, value.clone())])
                    .and_then([delete]),
                None => Txn::new().and_then([delete]),
            };
            match etcd.txn(txn).await {
                Ok(_) => {
                    recent.insert(key, (None, now));
                }
                Err(error) => {
                    tracing::warn!(%key, %error, "cannot remove a drain record; trying again")
                }
            }
        }
    }
}
