//! Where the control plane keeps what must survive its restart: the last
//! catalog snapshot, so that a restarted control plane answers agents with
//! every known instance (nodes `unreachable` until their agents reconnect)
//! instead of an empty catalog that would make services vanish.
//!
//! Behind a trait: an embedded file store for one replica now, etcd for
//! several later.

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
    #[error("store {path}: corrupt snapshot: {source}")]
    Corrupt {
        path: String,
        source: prost::DecodeError,
    },
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
        CatalogSnapshot::decode(bytes.as_slice())
            .map(Some)
            .map_err(|source| StoreError::Corrupt {
                path: self.path.display().to_string(),
                source,
            })
    }

    async fn save(&self, snapshot: CatalogSnapshot) -> Result<(), StoreError> {
        let path = self.path.clone();
        let bytes = snapshot.encode_to_vec();
        let written =
            tokio::task::spawn_blocking(move || signpost_daemon::fs::write_atomic(&path, &bytes))
                .await
                .map_err(|e| self.io(std::io::Error::other(e)))?;
        written.map_err(|e| self.io(e))
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
