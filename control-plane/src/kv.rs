//! Consul's key/value store, sessions and user events, kept by the control plane and
//! reached through every agent (`/v1/kv`, `/v1/txn`, `/v1/session`).
//!
//! Every replica holds a [`Mirror`] of the store in memory: reads and
//! blocking queries are answered from it. A write is planned against the
//! mirror with Consul's semantics ([`plan`]), then committed to the
//! [`Backend`] with what it read as expectations (each record's modify
//! index): the file backend ([`file`], redb, fsync on commit) commits and
//! feeds the mirror itself; the etcd backend commits an etcd transaction
//! and the replica's watch feeds the mirror. A plan that lost a race with
//! another replica is planned again on the newer mirror. A write answers
//! once it is durable and in this replica's mirror, so a client reads its
//! own writes through the same replica.

pub mod file;
#[cfg(test)]
mod fuzz;
mod mirror;
mod plan;
pub mod sessions;

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

pub use mirror::{Entry, Mirror, Session};
pub use plan::{OpFailure, TxnResult};
use signpost_core::event::UserEvent;
pub use signpost_core::kv::ServiceDefaults;
use signpost_core::kv::{Behavior, SessionSpec, TxnOp};

use crate::store::StoreError;

/// A record of the store: a key's entry, a session, a key's lock delay,
/// or a user event.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordKey {
    Entry(String),
    Session(String),
    Delay(String),
    Event(String),
    /// A `service-defaults` config entry, by service.
    Config(String),
    /// The service mesh's records: its CA (`ca`) and each intention
    /// (`intention/<id>`), as JSON (see [`crate::mesh`]).
    Mesh(String),
}

impl RecordKey {
    /// How the record is named in a store (under the store's KV prefix).
    pub fn encode(&self) -> String {
        match self {
            RecordKey::Entry(k) => format!("e/{k}"),
            RecordKey::Session(id) => format!("s/{id}"),
            RecordKey::Delay(k) => format!("d/{k}"),
            RecordKey::Event(id) => format!("v/{id}"),
            RecordKey::Config(name) => format!("c/{name}"),
            RecordKey::Mesh(name) => format!("m/{name}"),
        }
    }

    pub fn decode(name: &str) -> Option<RecordKey> {
        let (kind, rest) = name.split_at_checked(2)?;
        Some(match kind {
            "e/" => RecordKey::Entry(rest.to_string()),
            "s/" => RecordKey::Session(rest.to_string()),
            "d/" => RecordKey::Delay(rest.to_string()),
            "v/" => RecordKey::Event(rest.to_string()),
            "c/" => RecordKey::Config(rest.to_string()),
            "m/" => RecordKey::Mesh(rest.to_string()),
            _ => return None,
        })
    }
}

/// A record as a store holds it: its bytes and indexes.
#[derive(Debug, Clone)]
pub struct Stored {
    pub bytes: Vec<u8>,
    pub create_index: u64,
    pub modify_index: u64,
}

/// A record changed in the store (`None`: deleted).
#[derive(Debug, Clone)]
pub struct Change {
    pub key: RecordKey,
    pub stored: Option<Stored>,
}

/// A record a plan read: its modify index then (`None`: absent).
pub type Expect = (RecordKey, Option<u64>);
/// A record a plan writes (`None`: deletes).
pub type Write = (RecordKey, Option<Vec<u8>>);

/// Where the records live.
#[tonic::async_trait]
pub trait Backend: Send + Sync {
    /// Commits `writes` as one transaction if every expectation still
    /// holds: the index the writes got, or `None` when one did not hold
    /// (another replica wrote first).
    async fn commit(
        &self,
        expect: Vec<Expect>,
        writes: Vec<Write>,
    ) -> Result<Option<u64>, StoreError>;
    /// The store's latest index: a consistent read waits until the
    /// mirror has applied it.
    async fn latest(&self) -> Result<u64, StoreError>;
}

/// How many times a write is planned again after losing a race.
const MAX_REPLANS: usize = 16;
/// How long a write waits for its own commit to reach the mirror.
const APPLY_WAIT: Duration = Duration::from_secs(10);

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The request cannot be applied as asked (unknown session, ...).
    #[error("{0}")]
    Invalid(String),
    #[error("the store did not settle: {0}")]
    Contended(String),
}

impl KvError {
    /// The same error, for every write of a batch that failed.
    fn again(&self) -> KvError {
        match self {
            KvError::Store(StoreError::Unavailable { reason }) => {
                KvError::Store(StoreError::Unavailable {
                    reason: reason.clone(),
                })
            }
            KvError::Store(StoreError::Io { path, source }) => KvError::Store(StoreError::Io {
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            }),
            KvError::Store(other) => KvError::Contended(other.to_string()),
            KvError::Invalid(m) => KvError::Invalid(m.clone()),
            KvError::Contended(m) => KvError::Contended(m.clone()),
        }
    }
}

/// The store as the HTTP API uses it.
pub struct Kv {
    mirror: Arc<Mirror>,
    backend: Arc<dyn Backend>,
    /// One writer at a time on this replica: plans are made against the
    /// mirror as the last commit left it.
    writer: tokio::sync::Mutex<()>,
    /// Writes waiting for the writer.
    queue: std::sync::Mutex<Vec<(Job, Reply)>>,
}

/// A queued write: plans itself, answering what its caller gets.
type Job = Box<dyn FnMut(&mut plan::Plan<'_>) -> Box<dyn Any + Send> + Send>;
/// A batch's plan: each write's answer and whether it wrote, and what
/// the batch reads and writes.
type Planned = (Vec<(Box<dyn Any + Send>, bool)>, Vec<Expect>, Vec<Write>);
type Reply = tokio::sync::oneshot::Sender<Result<(Box<dyn Any + Send>, Option<u64>), KvError>>;

impl Kv {
    pub fn new(mirror: Arc<Mirror>, backend: Arc<dyn Backend>) -> Kv {
        Kv {
            mirror,
            backend,
            writer: tokio::sync::Mutex::new(()),
            queue: std::sync::Mutex::new(Vec::new()),
        }
    }

    pub fn mirror(&self) -> &Arc<Mirror> {
        &self.mirror
    }

    /// Waits until the mirror has everything the store has committed
    /// (`?consistent`).
    pub async fn sync(&self) -> Result<(), StoreError> {
        let latest = self.backend.latest().await?;
        self.mirror.wait_applied(latest, APPLY_WAIT).await;
        Ok(())
    }

    /// Plans with `f` against the mirror and commits, planning again
    /// after a lost race; `f` returns what the caller gets and the plan.
    ///
    /// Group commit: a write is queued, and whoever holds the writer
    /// plans every queued write in turn (each sees the ones before it)
    /// and commits them as one transaction, one fsync (or one etcd
    /// transaction) for all, each answered with the index they share.
    async fn write<R: Send + 'static>(
        &self,
        mut f: impl FnMut(&mut plan::Plan<'_>) -> R + Send + 'static,
    ) -> Result<(R, Option<u64>), KvError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |p| Box::new(f(p)) as Box<dyn Any + Send>);
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((job, reply));
        {
            let _one = self.writer.lock().await;
            let batch = std::mem::take(
                &mut *self
                    .queue
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            if !batch.is_empty() {
                self.commit_batch(batch).await;
            }
        }
        let (answer, index) = answer
            .await
            .map_err(|_| KvError::Contended("the write was dropped; try again".into()))??;
        answer
            .downcast::<R>()
            .map(|a| (*a, index))
            .map_err(|_| KvError::Contended("a write's answer of another type".into()))
    }

    /// Plans and commits `batch` (see [`Kv::write`]), answering each.
    async fn commit_batch(&self, mut batch: Vec<(Job, Reply)>) {
        let outcome = async {
            for _ in 0..MAX_REPLANS {
                let (answers, expect, writes) = self.mirror.plan_batch(&mut batch);
                if writes.is_empty() {
                    return Ok((answers, None));
                }
                match self.backend.commit(expect, writes).await? {
                    Some(index) => {
                        self.mirror.wait_applied(index, APPLY_WAIT).await;
                        return Ok((answers, Some(index)));
                    }
                    // Another replica wrote what the plan read: wait for
                    // the mirror to have it and plan again.
                    None => {
                        let latest = self.backend.latest().await?;
                        self.mirror.wait_applied(latest, APPLY_WAIT).await;
                    }
                }
            }
            Err(KvError::Contended(format!(
                "the write lost {MAX_REPLANS} races with other replicas in a row; try again"
            )))
        }
        .await;
        match outcome {
            Ok((answers, index)) => {
                for ((answer, wrote), (_, reply)) in answers.into_iter().zip(batch) {
                    let _ = reply.send(Ok((answer, index.filter(|_| wrote))));
                }
            }
            Err(e) => {
                for (_, reply) in batch {
                    let _ = reply.send(Err(e.again()));
                }
            }
        }
    }

    /// A transaction: every operation applies, or none (the failures,
    /// by position); with the index it was committed at (none when it
    /// wrote nothing).
    pub async fn txn(
        &self,
        ops: &[TxnOp],
    ) -> Result<(Result<Vec<TxnResult>, Vec<OpFailure>>, Option<u64>), KvError> {
        let now = now_ms();
        let ops = ops.to_vec();
        let (outcome, index) = self.write(move |p| p.txn(&ops, now)).await?;
        Ok((
            match outcome {
                Ok(mut results) => {
                    if let Some(index) = index {
                        results.iter_mut().for_each(|r| r.committed(index));
                    }
                    Ok(results)
                }
                Err(failures) => Err(failures),
            },
            index,
        ))
    }

    /// One write of the plain KV API (`PUT`/`DELETE /v1/kv/<key>`):
    /// whether it applied (`false`: a CAS index, a held lock, a lock
    /// delay) and at which index, or why it cannot.
    pub async fn apply(&self, op: TxnOp) -> Result<(bool, Option<u64>), KvError> {
        match self.txn(std::slice::from_ref(&op)).await? {
            (Ok(_), index) => Ok((true, index)),
            (Err(failures), _) => match failures.into_iter().next() {
                Some(f) if f.invalid => Err(KvError::Invalid(f.what)),
                _ => Ok((false, None)),
            },
        }
    }

    /// Creates a session for `spec` (its node filled in); its ID.
    pub async fn create_session(&self, spec: &SessionSpec, node: &str) -> Result<String, KvError> {
        let id = new_uuid();
        let now = now_ms();
        let (spec, node, for_plan) = (spec.clone(), node.to_string(), id.clone());
        self.write(move |p| p.create_session(&for_plan, &spec, &node, now))
            .await?;
        Ok(id)
    }

    /// Renews a session's TTL: the session, or `None` when it is gone.
    pub async fn renew_session(&self, id: &str) -> Result<Option<Session>, KvError> {
        let now = now_ms();
        let for_plan = id.to_string();
        let (found, _) = self.write(move |p| p.renew_session(&for_plan, now)).await?;
        Ok(if found { self.mirror.session(id) } else { None })
    }

    /// Destroys or invalidates a session: its locks released or its keys
    /// deleted (its behavior), with its lock delay. Whether it existed.
    pub async fn end_session(&self, id: &str, why: &str) -> Result<bool, KvError> {
        Ok(self.end_session_at(id, why).await?.is_some())
    }

    /// [`Kv::end_session`], with the index its keys were released (or
    /// deleted) at: `None` when there was no such session.
    pub async fn end_session_at(&self, id: &str, why: &str) -> Result<Option<u64>, KvError> {
        let now = now_ms();
        let for_plan = id.to_string();
        let (found, index) = self.write(move |p| p.end_session(&for_plan, now)).await?;
        if found {
            tracing::info!(session = id, reason = why, "session ended");
        }
        Ok(index.filter(|_| found))
    }

    /// Fires a user event: kept with the last
    /// [`signpost_core::event::MAX_EVENTS`], the oldest forgotten. The
    /// event, its `LTime` the index it was stored at.
    pub async fn fire(&self, mut event: UserEvent) -> Result<UserEvent, KvError> {
        event.id = new_uuid();
        let for_plan = event.clone();
        let (_, index) = self.write(move |p| p.fire_event(&for_plan)).await?;
        event.ltime = index.unwrap_or(0);
        Ok(event)
    }

    /// Writes (`Some`) or deletes a service's `service-defaults` entry;
    /// the index it was written at.
    pub async fn put_config(
        &self,
        service: &str,
        entry: Option<&ServiceDefaults>,
    ) -> Result<Option<u64>, KvError> {
        let record = entry.map(|e| serde_json::to_vec(e).unwrap_or_default());
        let (_, index) = self
            .write({
                let service = service.to_string();
                move |p| p.put_config(&service, record.clone())
            })
            .await?;
        Ok(index)
    }

    /// Writes (`Some`) or deletes the mesh record `name`, if its modify
    /// index is still `expected` (`Some(None)`: if there is none;
    /// `None`: whatever it is). Whether it did, and the index it was
    /// written at.
    pub async fn put_mesh(
        &self,
        name: &str,
        record: Option<Vec<u8>>,
        expected: Option<Option<u64>>,
    ) -> Result<(bool, Option<u64>), KvError> {
        let name = name.to_string();
        self.write(move |p| p.put_mesh(&name, record.clone(), expected))
            .await
    }

    /// Deletes lock delays that have passed.
    pub async fn forget_delays(&self) -> Result<(), KvError> {
        let now = now_ms();
        self.write(move |p| p.forget_delays(now)).await?;
        Ok(())
    }
}

pub(crate) fn behavior_of(text: &str) -> Behavior {
    if text == "delete" {
        Behavior::Delete
    } else {
        Behavior::Release
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A random (version 4) UUID, as Consul's session IDs.
pub(crate) fn new_uuid() -> String {
    signpost_core::uuid::new_v4()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_names_round_trip() {
        for k in [
            RecordKey::Entry("a/b".into()),
            RecordKey::Session("x".into()),
            RecordKey::Delay("".into()),
        ] {
            assert_eq!(RecordKey::decode(&k.encode()), Some(k));
        }
        assert_eq!(RecordKey::decode("x/a"), None);
    }

    #[test]
    fn session_ids_are_uuids() {
        let id = new_uuid();
        assert_eq!(signpost_core::kv::check_session_id(&id), Ok(()));
        assert_ne!(id, new_uuid());
    }
}
