//! The KV store of a control plane on files: one redb database
//! (`data_dir/kv.redb`), every write one transaction fsynced on commit,
//! so a `200` means the write is on disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message as _;
use redb::{ReadableDatabase as _, ReadableTable as _, TableDefinition};
use signpost_proto::KvStored;

use super::{Backend, Change, Expect, Mirror, RecordKey, Stored, Write};
use crate::store::StoreError;

const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The last index given (every commit takes the next).
const INDEX: &str = "index";

pub struct FileBackend {
    db: Arc<redb::Database>,
    path: PathBuf,
    mirror: Arc<Mirror>,
}

impl FileBackend {
    /// Opens (or creates) the store under `data_dir` and loads it into a
    /// new mirror.
    pub fn open(data_dir: &Path) -> Result<FileBackend, StoreError> {
        let path = data_dir.join("kv.redb");
        let io = |e: &dyn std::fmt::Display| StoreError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        };
        let db = redb::Database::create(&path).map_err(|e| io(&e))?;
        // Create the tables so that reads find them.
        let txn = db.begin_write().map_err(|e| io(&e))?;
        txn.open_table(RECORDS).map_err(|e| io(&e))?;
        txn.open_table(META).map_err(|e| io(&e))?;
        txn.commit().map_err(|e| io(&e))?;
        let read = db.begin_read().map_err(|e| io(&e))?;
        let index = read
            .open_table(META)
            .map_err(|e| io(&e))?
            .get(INDEX)
            .map_err(|e| io(&e))?
            .map(|v| v.value())
            .unwrap_or(0);
        let mut changes = Vec::new();
        for row in read
            .open_table(RECORDS)
            .map_err(|e| io(&e))?
            .iter()
            .map_err(|e| io(&e))?
        {
            let (name, bytes) = row.map_err(|e| io(&e))?;
            let Some(key) = RecordKey::decode(name.value()) else {
                tracing::warn!(record = name.value(), "unknown KV record skipped");
                continue;
            };
            match KvStored::decode(bytes.value()) {
                Ok(s) => changes.push(Change {
                    key,
                    stored: Some(Stored {
                        bytes: s.record,
                        create_index: s.create_index,
                        modify_index: s.modify_index,
                    }),
                }),
                Err(e) => {
                    tracing::error!(record = name.value(), error = %e, "undecodable KV record skipped")
                }
            }
        }
        let mirror = Arc::new(Mirror::new(index));
        let records = changes.len();
        mirror.apply(changes, index);
        tracing::info!(path = %path.display(), records, index, "KV store opened");
        Ok(FileBackend {
            db: Arc::new(db),
            path,
            mirror,
        })
    }

    pub fn mirror(&self) -> Arc<Mirror> {
        self.mirror.clone()
    }

    /// Every record kept under `data_dir` (none without a store), as
    /// `migrate` copies them.
    pub fn export(data_dir: &Path) -> Result<Vec<(RecordKey, Vec<u8>)>, StoreError> {
        if !data_dir.join("kv.redb").exists() {
            return Ok(Vec::new());
        }
        let store = FileBackend::open(data_dir)?;
        let io = |e: &dyn std::fmt::Display| StoreError::Io {
            path: store.path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        };
        let read = store.db.begin_read().map_err(|e| io(&e))?;
        let table = read.open_table(RECORDS).map_err(|e| io(&e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| io(&e))? {
            let (name, bytes) = row.map_err(|e| io(&e))?;
            if let (Some(key), Ok(stored)) = (
                RecordKey::decode(name.value()),
                KvStored::decode(bytes.value()),
            ) {
                out.push((key, stored.record));
            }
        }
        Ok(out)
    }
}

fn commit(
    db: &redb::Database,
    expect: Vec<Expect>,
    writes: Vec<Write>,
) -> Result<Option<(u64, Vec<Change>)>, String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    let (index, changes) = {
        let mut records = txn.open_table(RECORDS).map_err(|e| e.to_string())?;
        let modify_of =
            |records: &redb::Table<&str, &[u8]>, name: &str| -> Result<Option<KvStored>, String> {
                let found = records.get(name).map_err(|e| e.to_string())?;
                found
                    .map(|v| KvStored::decode(v.value()).map_err(|e| e.to_string()))
                    .transpose()
            };
        for (key, modify) in &expect {
            let now = modify_of(&records, &key.encode())?.map(|s| s.modify_index);
            if now != *modify {
                return Ok(None);
            }
        }
        let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
        // The first commit is index 2: reads of an empty store answer 1
        // (never 0), and a blocking read at 1 must wake for it.
        let index = meta
            .get(INDEX)
            .map_err(|e| e.to_string())?
            .map(|v| v.value())
            .unwrap_or(1)
            + 1;
        meta.insert(INDEX, index).map_err(|e| e.to_string())?;
        let mut changes = Vec::with_capacity(writes.len());
        for (key, record) in writes {
            let name = key.encode();
            match record {
                Some(bytes) => {
                    let create_index = modify_of(&records, &name)?
                        .map(|s| s.create_index)
                        .unwrap_or(index);
                    let stored = KvStored {
                        create_index,
                        modify_index: index,
                        record: bytes,
                    };
                    records
                        .insert(name.as_str(), stored.encode_to_vec().as_slice())
                        .map_err(|e| e.to_string())?;
                    changes.push(Change {
                        key,
                        stored: Some(Stored {
                            bytes: stored.record,
                            create_index,
                            modify_index: index,
                        }),
                    });
                }
                None => {
                    records.remove(name.as_str()).map_err(|e| e.to_string())?;
                    changes.push(Change { key, stored: None });
                }
            }
        }
        (index, changes)
    };
    txn.commit().map_err(|e| e.to_string())?;
    Ok(Some((index, changes)))
}

#[tonic::async_trait]
impl Backend for FileBackend {
    async fn commit(
        &self,
        expect: Vec<Expect>,
        writes: Vec<Write>,
    ) -> Result<Option<u64>, StoreError> {
        let db = self.db.clone();
        let done = tokio::task::spawn_blocking(move || commit(&db, expect, writes))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
        match done {
            Ok(Some((index, changes))) => {
                self.mirror.apply(changes, index);
                Ok(Some(index))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(StoreError::Io {
                path: self.path.display().to_string(),
                source: std::io::Error::other(e),
            }),
        }
    }

    async fn latest(&self) -> Result<u64, StoreError> {
        Ok(self.mirror.applied())
    }
}

#[cfg(test)]
mod tests {
    use signpost_core::kv::{SessionSpec, TxnOp, Verb};

    use super::*;
    use crate::kv::Kv;

    fn op(verb: Verb, key: &str, value: &str) -> TxnOp {
        TxnOp {
            verb,
            key: key.into(),
            value: value.as_bytes().to_vec(),
            flags: 0,
            index: 0,
            session: String::new(),
        }
    }

    impl Kv {
        async fn apply_ok(&self, op: TxnOp) -> Result<bool, crate::kv::KvError> {
            self.apply(op).await.map(|(applied, _)| applied)
        }
    }

    fn open(dir: &Path) -> Kv {
        let backend = FileBackend::open(dir).unwrap();
        Kv::new(backend.mirror(), Arc::new(backend))
    }

    #[tokio::test]
    async fn writes_survive_a_reopen_with_their_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let kv = open(dir.path());
        assert!(kv.apply_ok(op(Verb::Set, "a/b", "1")).await.unwrap());
        assert!(kv.apply_ok(op(Verb::Set, "a/c", "2")).await.unwrap());
        assert!(kv.apply_ok(op(Verb::Set, "a/b", "3")).await.unwrap());
        let (_, b) = kv.mirror().get("a/b");
        let b = b.unwrap();
        assert_eq!(
            (b.create_index, b.modify_index, b.value.as_slice()),
            (2, 4, &b"3"[..])
        );
        drop(kv);
        let kv = open(dir.path());
        let (index, all) = kv.mirror().list("a/");
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].1, b);
        assert!(index >= 4, "an index never goes back after a restart");
        // The next write takes the next index.
        assert!(kv.apply_ok(op(Verb::Set, "a/d", "4")).await.unwrap());
        assert_eq!(kv.mirror().get("a/d").1.unwrap().modify_index, 5);
    }

    #[tokio::test]
    async fn cas_and_locks_follow_consul() {
        let dir = tempfile::tempdir().unwrap();
        let kv = open(dir.path());
        let mut cas = op(Verb::Cas, "k", "v");
        assert!(kv.apply_ok(cas.clone()).await.unwrap(), "cas=0 creates");
        assert!(
            !kv.apply_ok(cas.clone()).await.unwrap(),
            "cas=0 never replaces"
        );
        cas.index = kv.mirror().get("k").1.unwrap().modify_index;
        assert!(kv.apply_ok(cas.clone()).await.unwrap());
        assert!(!kv.apply_ok(cas).await.unwrap(), "a stale index fails");

        let spec = SessionSpec::parse(br#"{"LockDelay": "0s", "Behavior": "delete"}"#).unwrap();
        let s1 = kv.create_session(&spec, "n1").await.unwrap();
        let s2 = kv.create_session(&spec, "n1").await.unwrap();
        let mut lock = op(Verb::Lock, "leader", "me");
        lock.session = s1.clone();
        assert!(kv.apply_ok(lock.clone()).await.unwrap());
        lock.session = s2.clone();
        assert!(!kv.apply_ok(lock.clone()).await.unwrap(), "held by another");
        let entry = kv.mirror().get("leader").1.unwrap();
        assert_eq!((entry.lock_index, entry.session.as_str()), (1, s1.as_str()));
        // Ending the session deletes its key (behavior delete).
        assert!(kv.end_session(&s1, "test").await.unwrap());
        assert!(kv.mirror().get("leader").1.is_none());
        assert!(kv.apply_ok(lock).await.unwrap());
        let mut bogus = op(Verb::Lock, "x", "");
        bogus.session = "00000000-0000-4000-8000-000000000000".into();
        assert!(matches!(
            kv.apply(bogus).await,
            Err(crate::kv::KvError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn lock_delay_holds_a_released_lock() {
        let dir = tempfile::tempdir().unwrap();
        let kv = open(dir.path());
        let spec = SessionSpec::parse(br#"{"LockDelay": "60s"}"#).unwrap();
        let s1 = kv.create_session(&spec, "n1").await.unwrap();
        let s2 = kv.create_session(&spec, "n1").await.unwrap();
        let mut lock = op(Verb::Lock, "l", "");
        lock.session = s1.clone();
        assert!(kv.apply_ok(lock.clone()).await.unwrap());
        kv.end_session(&s1, "test").await.unwrap();
        let entry = kv.mirror().get("l").1.unwrap();
        assert!(entry.session.is_empty(), "released, the key stays");
        lock.session = s2;
        assert!(!kv.apply_ok(lock).await.unwrap(), "within the lock delay");
    }

    #[tokio::test]
    async fn a_failed_transaction_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let kv = open(dir.path());
        let ops = vec![
            op(Verb::Set, "t/a", "1"),
            op(Verb::CheckNotExists, "t/a", ""),
        ];
        let failed = kv.txn(&ops).await.unwrap().0.unwrap_err();
        assert_eq!(failed[0].op_index, 1);
        assert!(kv.mirror().get("t/a").1.is_none());
        let ops = vec![
            op(Verb::Set, "t/a", "1"),
            op(Verb::Set, "t/b", "2"),
            op(Verb::GetTree, "t/", ""),
        ];
        let results = kv.txn(&ops).await.unwrap().0.unwrap();
        assert_eq!(results.len(), 4);
        assert_eq!(
            results[0].kv.modify_index, results[1].kv.modify_index,
            "one index per transaction"
        );
        assert_eq!(results[2].kv.value.as_deref(), Some(&b"1"[..]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_each_keep_their_answer_when_grouped() {
        let dir = tempfile::tempdir().unwrap();
        let kv = Arc::new(open(dir.path()));
        let mut cas = op(Verb::Cas, "race", "first");
        cas.index = 0;
        let writers: Vec<_> = (0..64)
            .map(|i| {
                let (kv, cas) = (kv.clone(), cas.clone());
                tokio::spawn(async move {
                    let mine = kv
                        .apply(op(Verb::Set, &format!("many/{i}"), "v"))
                        .await
                        .unwrap();
                    let raced = kv.apply(cas).await.unwrap();
                    (mine, raced)
                })
            })
            .collect();
        let mut won = 0;
        for w in writers {
            let ((applied, index), (raced, _)) = w.await.unwrap();
            assert!(
                applied && index.is_some(),
                "every set applies with an index"
            );
            won += usize::from(raced);
        }
        assert_eq!(won, 1, "one cas=0 creates, whatever the batching");
        assert_eq!(kv.mirror().keys("many/").1.len(), 64);
    }

    #[tokio::test]
    async fn a_waiter_wakes_for_its_prefix_only() {
        let dir = tempfile::tempdir().unwrap();
        let kv = Arc::new(open(dir.path()));
        kv.apply_ok(op(Verb::Set, "cfg/a", "1")).await.unwrap();
        let index = kv.mirror().index_of("cfg/", true);
        let waiter = {
            let kv = kv.clone();
            tokio::spawn(async move {
                kv.mirror()
                    .wait("cfg/", true, index, std::time::Duration::from_secs(30))
                    .await
            })
        };
        kv.apply_ok(op(Verb::Set, "other", "x")).await.unwrap();
        tokio::task::yield_now().await;
        assert!(
            !waiter.is_finished(),
            "another prefix's write does not wake it"
        );
        kv.apply_ok(op(Verb::Delete, "cfg/a", "")).await.unwrap();
        let woke = waiter.await.unwrap();
        assert!(woke > index);
    }
}
