//! An agent's reports on the replica its stream is on: the node's record
//! as the agent says it is, written to etcd by one task per session.
//!
//! The first write takes the node over: its presence key (on this
//! replica's lease), its record, and its failure cleared, in one
//! transaction. Later writes only go through while the presence key is
//! still this session's: an agent that moved to another replica is
//! written by that one only. Reports that arrive while a write is under
//! way are written together next; a write etcd refuses (no quorum) is
//! tried again until it goes through, so nothing an agent reported is
//! lost while the store is out.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use prost::Message as _;
use signpost_proto::{Delta, FullState, Hello, NodeSnapshot};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Etcd, MAX_RECORD, on_lease};
use crate::catalog::{Catalog, SessionId};

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The reports of one agent's session.
pub struct Reports {
    etcd: Arc<Etcd>,
    record: Arc<Mutex<NodeSnapshot>>,
    changed: watch::Sender<u64>,
    closed: CancellationToken,
}

impl Reports {
    /// Starts writing for the agent that said `hello` on `session`.
    /// At the replica's `shutdown` the node stays present: its agent moves
    /// to another replica well within the lease's life.
    pub fn open(
        etcd: Arc<Etcd>,
        catalog: &Catalog,
        hello: Hello,
        session: SessionId,
        shutdown: CancellationToken,
    ) -> Reports {
        let record = Arc::new(Mutex::new(catalog.record_of(hello)));
        let (changed, seen) = watch::channel(1);
        let closed = CancellationToken::new();
        let writer = Writer {
            presence: format!("{}/{session}", etcd.replica),
            etcd: etcd.clone(),
            record: record.clone(),
            shutdown,
        };
        tokio::spawn(writer.run(seen, closed.clone()));
        Reports {
            etcd,
            record,
            changed,
            closed,
        }
    }

    fn update(&self, change: impl FnOnce(&mut NodeSnapshot)) {
        change(&mut self.record.lock().unwrap_or_else(PoisonError::into_inner));
        self.changed.send_modify(|n| *n += 1);
    }

    /// The agent's whole state.
    pub fn full_state(&self, state: FullState) {
        self.update(|record| {
            record.instances = state.instances;
            record.node_checks = state.node_checks;
        });
    }

    /// This agent's answer to a probe the leader asked through the store.
    pub fn probe_result(&self, node: &str, result: &signpost_proto::ProbeResult) {
        let key = format!("probes/{}/{node}", result.probe_id);
        let value = if result.reachable {
            b"1".to_vec()
        } else {
            b"0".to_vec()
        };
        let etcd = self.etcd.clone();
        tokio::spawn(async move {
            // On this replica's lease: gone with it if the leader never
            // clears it.
            let put = TxnOp::put(etcd.key(&key), value, on_lease(etcd.lease()));
            if let Err(e) = etcd.txn(Txn::new().and_then([put])).await {
                tracing::warn!(error = %e, "cannot pass a probe's answer to the leader");
            }
        });
    }

    pub fn delta(&self, delta: Delta) {
        self.update(|record| {
            record.instances.retain(|i| !delta.removed.contains(&i.id));
            for upsert in delta.upserts {
                match record.instances.iter_mut().find(|i| i.id == upsert.id) {
                    Some(old) => *old = upsert,
                    None => record.instances.push(upsert),
                }
            }
            if delta.node_checks_changed {
                record.node_checks = delta.node_checks;
            }
        });
    }
}

impl Drop for Reports {
    /// The stream ended: the node is no longer present (unless its agent
    /// is on another replica by now).
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

struct Writer {
    etcd: Arc<Etcd>,
    record: Arc<Mutex<NodeSnapshot>>,
    /// This session, as the presence key's value.
    presence: String,
    shutdown: CancellationToken,
}

impl Writer {
    async fn run(self, mut seen: watch::Receiver<u64>, closed: CancellationToken) {
        let node = {
            let record = self.record.lock().unwrap_or_else(PoisonError::into_inner);
            record
                .hello
                .as_ref()
                .map(|h| h.node.clone())
                .unwrap_or_default()
        };
        let presence_key = self.etcd.key(&format!("presence/{node}"));
        let node_key = self.etcd.key(&format!("nodes/{node}"));
        let failed_key = self.etcd.key(&format!("failed/{node}"));
        let mut leases = self.etcd.leases();
        // The lease the presence key was last written on, and the record.
        let mut held: Option<i64> = None;
        let mut written: Vec<u8> = Vec::new();
        let mut retry = RETRY_MIN;
        loop {
            if closed.is_cancelled() {
                break;
            }
            let bytes = {
                let record = self.record.lock().unwrap_or_else(PoisonError::into_inner);
                record.encode_to_vec()
            };
            seen.mark_unchanged();
            let lease = self.etcd.lease();
            let outcome = if bytes.len() > MAX_RECORD {
                tracing::error!(
                    node,
                    bytes = bytes.len(),
                    "the node's record is larger than etcd takes: its changes are not shared"
                );
                Ok(true)
            } else if held != Some(lease) {
                // Take the node over (again, on a new lease).
                let txn = Txn::new().and_then([
                    TxnOp::put(presence_key.clone(), self.presence.clone(), on_lease(lease)),
                    TxnOp::put(node_key.clone(), bytes.clone(), None),
                    TxnOp::delete(failed_key.clone(), None),
                ]);
                self.etcd.txn(txn).await.map(|_| true)
            } else if bytes == written {
                Ok(true)
            } else {
                let txn = Txn::new()
                    .when([Compare::value(
                        presence_key.clone(),
                        CompareOp::Equal,
                        self.presence.clone(),
                    )])
                    .and_then([TxnOp::put(node_key.clone(), bytes.clone(), None)]);
                self.etcd.txn(txn).await
            };
            match outcome {
                Ok(true) => {
                    held = Some(lease);
                    written = bytes;
                    retry = RETRY_MIN;
                }
                Ok(false) => {
                    tracing::info!(
                        node,
                        "the node's agent is on another replica now: this session stops writing"
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(node, error = %e, again_in = ?retry, "cannot write the agent's report: trying again");
                    tokio::select! {
                        _ = tokio::time::sleep(retry) => {}
                        _ = closed.cancelled() => {}
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                    continue;
                }
            }
            tokio::select! {
                changed = seen.changed() => if changed.is_err() { break },
                changed = leases.changed() => if changed.is_err() { break },
                _ = closed.cancelled() => break,
            }
        }
        if !self.shutdown.is_cancelled() {
            self.leave(&node, presence_key, held).await;
        }
    }

    /// Removes the presence key if it is still this session's. Tried
    /// until etcd takes it (a node whose agent left must not look alive
    /// once etcd is back), or the key's lease is gone (and the key with
    /// it), or the replica stops.
    async fn leave(&self, node: &str, presence_key: String, held: Option<i64>) {
        let txn = Txn::new()
            .when([Compare::value(
                presence_key.clone(),
                CompareOp::Equal,
                self.presence.clone(),
            )])
            .and_then([TxnOp::delete(presence_key, None)]);
        let mut retry = RETRY_MIN;
        loop {
            if held.is_none_or(|lease| lease != self.etcd.lease()) || self.shutdown.is_cancelled() {
                return;
            }
            match self.etcd.txn(txn.clone()).await {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(node, error = %e, "cannot record that the agent left: trying again");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }
}
