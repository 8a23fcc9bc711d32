//! ACL tokens and the audit log.
//!
//! A token has a role: `read`, `agent` (an agent's sync stream),
//! `operator` (commands) or `admin` (tokens; everything). Only a SHA-256
//! hash of each secret is kept (`data_dir/acl.json`, 0600); secrets are
//! 256 random bits, so a fast hash is enough. On first start a bootstrap
//! admin token is created and its secret written once to
//! `data_dir/bootstrap-token` (0600). Every token change and every refused
//! request goes to the audit log ([`crate::audit`]).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use serde::{Deserialize, Serialize};
use signpost_core::command::now_millis;
use signpost_core::control_plane_config::AuditConfig;

pub use crate::audit::AuditEntry;
use crate::audit::{AuditLog, Private};
use signpost_daemon::fs::write_atomic;

/// The audit log under `data_dir`.
fn open_audit(data_dir: &Path, config: AuditConfig) -> Result<AuditLog, AclError> {
    AuditLog::open(data_dir, config).map_err(|source| AclError::Io {
        path: data_dir.join("audit.jsonl").display().to_string(),
        source,
    })
}

/// Compares secrets in a time that does not depend on where they differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Agent,
    Operator,
    Admin,
}

impl Role {
    /// Whether a token with this role may do what needs `needed`: admin
    /// may do everything, an operator also reads, an agent only syncs.
    pub fn allows(self, needed: Role) -> bool {
        match self {
            Role::Admin => true,
            Role::Operator => matches!(needed, Role::Operator | Role::Read),
            Role::Read => needed == Role::Read,
            Role::Agent => needed == Role::Agent,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Agent => "agent",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(Role::Read),
            "agent" => Ok(Role::Agent),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(format!(
                "unknown role {s:?}: expected read, agent, operator or admin"
            )),
        }
    }
}

/// A token as stored: never its secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The token's public name, used to list and delete it.
    pub accessor: String,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    pub role: Role,
    pub description: String,
    /// Unix seconds.
    pub created_at: u64,
    /// The accessor of the token that created it (`bootstrap` for the
    /// first).
    pub created_by: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AclError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: corrupt token store: {source}")]
    Corrupt {
        path: String,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl AclError {
    /// The shared store has no quorum: try again later (503).
    pub fn unavailable(&self) -> bool {
        matches!(
            self,
            AclError::Store(crate::store::StoreError::Unavailable { .. })
        )
    }
}

#[derive(Serialize, Deserialize, Default)]
struct TokenFile {
    tokens: BTreeMap<String, TokenRecord>,
}

pub struct Acl {
    path: PathBuf,
    tokens: RwLock<BTreeMap<String, TokenRecord>>,
    audit: AuditLog,
    /// Set when replicas share a store: tokens are records there
    /// (`acl/<accessor>`), and come back through [`Acl::store_token`].
    shared: OnceLock<Arc<dyn crate::store::Shared>>,
}

/// Why a request is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// No token, or one we do not know (401).
    Unauthenticated,
    /// A token whose role does not allow it (403).
    Forbidden { role: Role },
}

impl Acl {
    /// Loads the tokens in `data_dir`; on the very first start creates the
    /// bootstrap admin token and writes its secret to
    /// `data_dir/bootstrap-token`.
    pub fn open(data_dir: &Path, audit: AuditConfig) -> Result<Acl, AclError> {
        let path = data_dir.join("acl.json");
        let io = |path: &Path, source| AclError::Io {
            path: path.display().to_string(),
            source,
        };
        let tokens = match std::fs::read(&path) {
            Ok(bytes) => {
                let file: TokenFile =
                    serde_json::from_slice(&bytes).map_err(|source| AclError::Corrupt {
                        path: path.display().to_string(),
                        source,
                    })?;
                file.tokens
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io(&path, e)),
        };
        let audit = open_audit(data_dir, audit)?;
        let first_start = tokens.is_empty() && !path.exists();
        let acl = Acl {
            path,
            tokens: RwLock::new(tokens),
            audit,
            shared: OnceLock::new(),
        };
        if first_start {
            let (record, _) = acl.bootstrap_token(data_dir)?;
            acl.insert_in_file(record)?;
        }
        Ok(acl)
    }

    /// The ACL of a replica on a shared store: no tokens until they are
    /// loaded from it ([`Acl::share`]); the audit file stays local.
    pub fn for_store(data_dir: &Path, audit: AuditConfig) -> Result<Acl, AclError> {
        let audit = open_audit(data_dir, audit)?;
        Ok(Acl {
            path: data_dir.join("acl.json"),
            tokens: RwLock::new(BTreeMap::new()),
            audit,
            shared: OnceLock::new(),
        })
    }

    /// Tokens live in the shared store from now on: none here until
    /// they are loaded from it. The first replica ever to share it
    /// creates the bootstrap admin token (its secret in its `data_dir`).
    pub async fn share(
        &self,
        shared: Arc<dyn crate::store::Shared>,
        data_dir: &Path,
    ) -> Result<(), AclError> {
        self.shared.get_or_init(|| shared.clone());
        self.audit.share(shared.clone());
        let marker = format!("{:016x}", rand::random::<u64>());
        if shared
            .create("acl-bootstrap".to_string(), marker.into_bytes())
            .await?
        {
            let (record, _) = self.bootstrap_token(data_dir)?;
            self.put_shared(&shared, &record).await?;
            self.store_token(&record.accessor.clone(), Some(record));
        }
        Ok(())
    }

    /// A token as the shared store has it (`None`: deleted).
    pub fn store_token(&self, accessor: &str, record: Option<TokenRecord>) {
        let mut tokens = self.tokens.write().unwrap_or_else(PoisonError::into_inner);
        match record {
            Some(record) => tokens.insert(accessor.to_string(), record),
            None => tokens.remove(accessor),
        };
    }

    /// Every token, as the shared store has them after a reload.
    pub fn store_tokens(&self, all: BTreeMap<String, TokenRecord>) {
        *self.tokens.write().unwrap_or_else(PoisonError::into_inner) = all;
    }

    /// Forgets the audit entries in memory (the shared store's are read
    /// again).
    pub fn forget_audit(&self) {
        self.audit.forget();
    }

    /// An audit entry as the shared store has it.
    pub fn store_audit(&self, entry: AuditEntry) {
        self.audit.remember(entry);
    }

    async fn put_shared(
        &self,
        shared: &Arc<dyn crate::store::Shared>,
        record: &TokenRecord,
    ) -> Result<(), AclError> {
        let bytes = serde_json::to_vec(record).map_err(|source| AclError::Corrupt {
            path: format!("acl/{}", record.accessor),
            source,
        })?;
        shared
            .put(format!("acl/{}", record.accessor), bytes)
            .await?;
        Ok(())
    }

    /// Creates the bootstrap admin token and writes its secret, once, to
    /// `data_dir/bootstrap-token`.
    fn bootstrap_token(&self, data_dir: &Path) -> Result<(TokenRecord, String), AclError> {
        let io = |path: &Path, source| AclError::Io {
            path: path.display().to_string(),
            source,
        };
        {
            let bootstrap = data_dir.join("bootstrap-token");
            let (record, secret) = new_token(Role::Admin, "bootstrap admin token", "bootstrap");
            // create_new: written once, never overwritten.
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode_0600()
                .open(&bootstrap)
                .and_then(|mut f| {
                    f.write_all(format!("{secret}\n").as_bytes())?;
                    f.sync_all()
                });
            written.map_err(|e| io(&bootstrap, e))?;
            self.record(AuditEntry::new(
                "bootstrap",
                "token.create",
                &record.accessor,
                "ok",
                "bootstrap admin token",
            ));
            tracing::warn!(file = %bootstrap.display(), "created the bootstrap admin token; keep it safe and delete the file");
            Ok((record, secret))
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, TokenRecord>> {
        self.tokens.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The token whose secret is `secret`.
    pub fn lookup(&self, secret: &str) -> Option<TokenRecord> {
        let hash = sha256_hex(secret);
        self.read()
            .values()
            .find(|t| constant_time_eq(t.secret_sha256.as_bytes(), hash.as_bytes()))
            .cloned()
    }

    /// Checks that `secret` (if any) may do what needs `role`.
    pub fn authorize(&self, secret: Option<&str>, needed: Role) -> Result<TokenRecord, Denied> {
        let token = secret
            .and_then(|s| self.lookup(s))
            .ok_or(Denied::Unauthenticated)?;
        if token.role.allows(needed) {
            Ok(token)
        } else {
            Err(Denied::Forbidden { role: token.role })
        }
    }

    /// Creates a token; returns it and its secret (shown this once).
    pub async fn create(
        &self,
        role: Role,
        description: &str,
        by: &str,
    ) -> Result<(TokenRecord, String), AclError> {
        let (record, secret) = new_token(role, description, by);
        if let Some(shared) = self.shared.get() {
            self.put_shared(shared, &record).await?;
            self.store_token(&record.accessor.clone(), Some(record.clone()));
        } else {
            self.insert_in_file(record.clone())?;
        }
        Ok((record, secret))
    }

    /// Adds a token; one that cannot be saved is not added.
    fn insert_in_file(&self, record: TokenRecord) -> Result<(), AclError> {
        let mut tokens = self.tokens.write().unwrap_or_else(PoisonError::into_inner);
        let accessor = record.accessor.clone();
        let before = tokens.insert(accessor.clone(), record);
        self.save(&tokens).inspect_err(|_| match before {
            Some(before) => {
                tokens.insert(accessor, before);
            }
            None => {
                tokens.remove(&accessor);
            }
        })
    }

    /// Deletes a token; false if there is none with that accessor. A
    /// deletion that cannot be saved leaves the token in place.
    pub async fn delete(&self, accessor: &str) -> Result<bool, AclError> {
        if let Some(shared) = self.shared.get() {
            if self.read().get(accessor).is_none() {
                return Ok(false);
            }
            shared.delete(format!("acl/{accessor}")).await?;
            self.store_token(accessor, None);
            return Ok(true);
        }
        let mut tokens = self.tokens.write().unwrap_or_else(PoisonError::into_inner);
        let Some(before) = tokens.remove(accessor) else {
            return Ok(false);
        };
        self.save(&tokens).map(|()| true).inspect_err(|_| {
            tokens.insert(accessor.to_string(), before);
        })
    }

    fn save(&self, tokens: &BTreeMap<String, TokenRecord>) -> Result<(), AclError> {
        let file = TokenFile {
            tokens: tokens.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|source| AclError::Corrupt {
            path: self.path.display().to_string(),
            source,
        })?;
        write_atomic(&self.path, &bytes).map_err(|source| AclError::Io {
            path: self.path.display().to_string(),
            source,
        })
    }

    pub fn tokens(&self) -> Vec<TokenRecord> {
        self.read().values().cloned().collect()
    }

    /// Appends to the audit log (file and memory).
    pub fn record(&self, entry: AuditEntry) {
        self.audit.record(entry);
    }

    /// A request refused for want of a valid token: audited once a
    /// period, with a count (see [`crate::audit`]).
    pub fn record_anonymous_refusal(&self, entry: AuditEntry) {
        self.audit.denied_anonymous(entry);
    }

    /// The audit log's periodic work ([`AuditLog::tick`]).
    pub fn audit_tick(&self) {
        self.audit.tick();
    }

    /// The newest `limit` audit entries at or after `since` (Unix ms),
    /// oldest first.
    pub fn audit(&self, since: u64, limit: usize) -> Vec<AuditEntry> {
        self.audit.query(since, limit)
    }
}

fn new_token(role: Role, description: &str, by: &str) -> (TokenRecord, String) {
    let secret = hex(&rand::random::<[u8; 32]>());
    let accessor = hex(&rand::random::<[u8; 8]>());
    let record = TokenRecord {
        accessor,
        secret_sha256: sha256_hex(&secret),
        role,
        description: description.to_string(),
        created_at: now_millis() / 1000,
        created_by: by.to_string(),
    };
    (record, secret)
}

fn sha256_hex(secret: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_allow_what_they_should() {
        assert!(Role::Admin.allows(Role::Operator));
        assert!(Role::Operator.allows(Role::Read));
        assert!(!Role::Operator.allows(Role::Admin));
        assert!(!Role::Read.allows(Role::Operator));
        assert!(!Role::Agent.allows(Role::Read));
        assert!(Role::Agent.allows(Role::Agent));
    }

    #[tokio::test]
    async fn bootstrap_once_secrets_hashed_and_tokens_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let acl = Acl::open(dir.path(), AuditConfig::default()).unwrap();
        let bootstrap = std::fs::read_to_string(dir.path().join("bootstrap-token")).unwrap();
        let admin = acl.authorize(Some(bootstrap.trim()), Role::Admin).unwrap();
        let (op, secret) = acl
            .create(Role::Operator, "ci", &admin.accessor)
            .await
            .unwrap();
        let stored = std::fs::read_to_string(dir.path().join("acl.json")).unwrap();
        assert!(!stored.contains(&secret), "secrets are never stored");
        assert!(!stored.contains(bootstrap.trim()));
        assert_eq!(
            acl.authorize(Some(&secret), Role::Admin).unwrap_err(),
            Denied::Forbidden {
                role: Role::Operator
            }
        );
        assert_eq!(
            acl.authorize(Some("nope"), Role::Read).unwrap_err(),
            Denied::Unauthenticated
        );
        use std::os::unix::fs::PermissionsExt;
        for file in ["bootstrap-token", "acl.json"] {
            let mode = std::fs::metadata(dir.path().join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }

        std::fs::remove_file(dir.path().join("bootstrap-token")).unwrap();
        let again = Acl::open(dir.path(), AuditConfig::default()).unwrap();
        assert!(
            !dir.path().join("bootstrap-token").exists(),
            "no second bootstrap"
        );
        assert_eq!(again.lookup(&secret).unwrap().accessor, op.accessor);
        assert!(again.delete(&op.accessor).await.unwrap());
        assert!(again.lookup(&secret).is_none());
        let actions: Vec<String> = again.audit(0, 10).into_iter().map(|e| e.action).collect();
        assert_eq!(actions, vec!["token.create"]);
    }
}
