//! Where the control plane keeps what must survive its restart: the last
//! catalog snapshot, so that a restarted control plane answers agents with
//! every known instance (nodes `unreachable` until their agents reconnect)
//! instead of an empty catalog that would make services vanish.
//!
//! Behind a trait, so that another store can take the file's place.
//!
//! Replicas that share an etcd cluster (`store: etcd`, the `etcd` feature)
//! keep nothing here: every record lives in etcd ([`crate::etcd`]), and
//! what writes a record (commands, tokens, the audit log) does it through
//! [`Shared`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use signpost_proto::CatalogSnapshot;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;

/// Changes within this window are written together.
const COALESCE: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("store {path}: corrupt snapshot, kept as {aside}: {source}")]
    Corrupt {
        path: String,
        /// Where the corrupt file was moved, for a look.
        aside: String,
        source: prost::DecodeError,
    },
    /// The shared store cannot take writes now (no quorum, unreachable).
    #[error("no store quorum: {reason}")]
    Unavailable { reason: String },
}

/// What the store's writes cost and how often they fail, for the
/// metrics: one per process, whichever store it runs on (the catalog
/// snapshot's file, etcd).
pub struct StoreStats {
    pub errors: prometheus_client::metrics::family::Family<
        crate::metrics::OperationLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    pub write_seconds: prometheus_client::metrics::histogram::Histogram,
}

/// The process's store statistics.
pub fn stats() -> &'static StoreStats {
    static STATS: std::sync::OnceLock<StoreStats> = std::sync::OnceLock::new();
    STATS.get_or_init(|| {
        let stats = StoreStats {
            errors: Default::default(),
            write_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.000_1, 4.0, 10),
            ),
        };
        // Shown at 0 before the first error, for `rate()` to see it.
        for operation in ["catalog_save", "etcd_write"] {
            drop(
                stats
                    .errors
                    .get_or_create(&crate::metrics::OperationLabels { operation }),
            );
        }
        stats
    })
}

impl StoreStats {
    /// Notes a write of `operation` begun at `started` and how it ended.
    pub fn wrote<T, E>(
        &self,
        operation: &'static str,
        started: std::time::Instant,
        outcome: &Result<T, E>,
    ) {
        self.write_seconds.observe(started.elapsed().as_secs_f64());
        if outcome.is_err() {
            self.errors
                .get_or_create(&crate::metrics::OperationLabels { operation })
                .inc();
        }
    }
}

/// Records shared by every replica; keys are relative to the store's
/// prefix. A call returns once the record is durable in the store.
#[tonic::async_trait]
pub trait Shared: Send + Sync {
    async fn put(&self, key: String, value: Vec<u8>) -> Result<(), StoreError>;
    async fn delete(&self, key: String) -> Result<(), StoreError>;
    /// Creates `key` unless it exists; whether this call created it.
    async fn create(&self, key: String, value: Vec<u8>) -> Result<bool, StoreError>;
}

#[tonic::async_trait]
pub trait Store: Send + Sync {
    async fn load(&self) -> Result<Option<CatalogSnapshot>, StoreError>;
    async fn save(&self, snapshot: CatalogSnapshot) -> Result<(), StoreError>;
}

/// One protobuf file under `data_dir`, replaced atomically.
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    pub fn new(data_dir: &std::path::Path) -> Self {
        FileStore {
            path: data_dir.join("catalog.pb"),
        }
    }

    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }
}

#[tonic::async_trait]
impl Store for FileStore {
    async fn load(&self) -> Result<Option<CatalogSnapshot>, StoreError> {
        let bytes = match tokio::fs::read(&self.path).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        match CatalogSnapshot::decode(bytes.as_slice()) {
            Ok(snapshot) => Ok(Some(snapshot)),
            // Set aside before the next save replaces it.
            Err(source) => {
                let aside = signpost_daemon::fs::move_aside(&self.path).map_err(|e| self.io(e))?;
                Err(StoreError::Corrupt {
                    path: self.path.display().to_string(),
                    aside: aside.display().to_string(),
                    source,
                })
            }
        }
    }

    async fn save(&self, snapshot: CatalogSnapshot) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let path = self.path.clone();
        let bytes = snapshot.encode_to_vec();
        let written =
            tokio::task::spawn_blocking(move || signpost_daemon::fs::write_atomic(&path, &bytes))
                .await
                .map_err(|e| self.io(std::io::Error::other(e)))
                .and_then(|w| w.map_err(|e| self.io(e)));
        stats().wrote("catalog_save", started, &written);
        written
    }
}

/// Saves the catalog after every change (coalesced) and once at shutdown.
pub async fn keep(catalog: Arc<Catalog>, store: Arc<dyn Store>, shutdown: CancellationToken) {
    let mut changes = catalog.subscribe_changes();
    while signpost_daemon::fs::next_write(&mut changes, COALESCE, &shutdown).await {
        if let Err(e) = store.save(catalog.snapshot()).await {
            tracing::error!(error = %e, "cannot save the catalog snapshot");
        }
    }
    if let Err(e) = store.save(catalog.snapshot()).await {
        tracing::error!(error = %e, "cannot save the catalog snapshot");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_corrupt_snapshot_is_set_aside_and_a_new_one_saved() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        assert!(store.load().await.unwrap().is_none(), "nothing kept yet");
        let catalog_pb = dir.path().join("catalog.pb");
        // A length-delimited field whose length runs past the end.
        std::fs::write(&catalog_pb, [0x0a, 0xff, 0x01, 0x00]).unwrap();
        let Err(StoreError::Corrupt { aside, .. }) = store.load().await else {
            panic!("a corrupt snapshot must be reported");
        };
        assert!(!catalog_pb.exists(), "moved, not left to be overwritten");
        assert_eq!(std::fs::read(&aside).unwrap(), [0x0a, 0xff, 0x01, 0x00]);
        store.save(CatalogSnapshot::default()).await.unwrap();
        assert!(store.load().await.unwrap().is_some());
        assert!(std::path::Path::new(&aside).exists(), "the evidence stays");
    }
}
