//! The KV store on etcd: every record under `kv/` (`kv/e/<key>`,
//! `kv/s/<session>`, `kv/d/<key>`), a write one etcd transaction that
//! checks the modify revision of every record its plan read. Records'
//! indexes are etcd's revisions, the same on every replica; the
//! replica's watch ([`super::follow`]) feeds its mirror.

use std::sync::Arc;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};

use super::Etcd;
use crate::kv::{Backend, Change, Expect, RecordKey, Stored, Write};
use crate::store::StoreError;

/// Where the records live, relative to the store's prefix.
pub const PREFIX: &str = "kv/";

pub struct EtcdKv {
    pub etcd: Arc<Etcd>,
}

impl EtcdKv {
    fn key(&self, record: &RecordKey) -> String {
        self.etcd.key(&format!("{PREFIX}{}", record.encode()))
    }
}

/// The change an etcd key-value makes to the mirror, if it is a KV record.
pub fn change(relative: &str, kv: &etcd_client::KeyValue, deleted: bool) -> Option<Change> {
    let key = RecordKey::decode(relative.strip_prefix(PREFIX)?)?;
    let stored = (!deleted).then(|| Stored {
        bytes: kv.value().to_vec(),
        create_index: u64::try_from(kv.create_revision()).unwrap_or(0),
        modify_index: u64::try_from(kv.mod_revision()).unwrap_or(0),
    });
    Some(Change { key, stored })
}

#[tonic::async_trait]
impl Backend for EtcdKv {
    async fn commit(
        &self,
        expect: Vec<Expect>,
        writes: Vec<Write>,
    ) -> Result<Option<u64>, StoreError> {
        let compares: Vec<Compare> = expect
            .iter()
            .map(|(record, modify)| match modify {
                Some(m) => Compare::mod_revision(
                    self.key(record),
                    CompareOp::Equal,
                    i64::try_from(*m).unwrap_or(i64::MAX),
                ),
                None => Compare::version(self.key(record), CompareOp::Equal, 0),
            })
            .collect();
        let ops: Vec<TxnOp> = writes
            .into_iter()
            .map(|(record, value)| match value {
                Some(bytes) => TxnOp::put(self.key(&record), bytes, None),
                None => TxnOp::delete(self.key(&record), None),
            })
            .collect();
        let txn = Txn::new().when(compares).and_then(ops);
        let answer = self.etcd.txn_answer(txn).await?;
        if !answer.succeeded() {
            return Ok(None);
        }
        let revision = answer.header().map(|h| h.revision()).unwrap_or(0);
        Ok(Some(u64::try_from(revision).unwrap_or(0)))
    }

    async fn latest(&self) -> Result<u64, StoreError> {
        let options = GetOptions::new().with_count_only();
        let revision = self.etcd.revision(self.etcd.key(PREFIX), options).await?;
        Ok(u64::try_from(revision).unwrap_or(0))
    }
}
