//! ACL tokens and the audit log.
//!
//! A token has a role: `read`, `agent` (an agent's sync stream),
//! `operator` (commands) or `admin` (tokens; everything). Only a SHA-256
//! hash of each secret is kept (`data_dir/acl.json`, 0600); secrets are
//! 256 random bits, so a fast hash is enough. On first start a bootstrap
//! admin token is created and its secret written once to
//! `data_dir/bootstrap-token` (0600). Every token change and every refused
//! request goes to the audit log (`data_dir/audit.jsonl`, one JSON object
//! per line, appended).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

use serde::{Deserialize, Serialize};
use signpost_core::command::now_millis;

use crate::store::write_atomic;

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

/// One audit entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Unix milliseconds.
    pub time: u64,
    /// The accessor that acted; empty when no valid token was presented.
    pub who: String,
    /// `token.create`, `token.delete`, `auth.denied`...
    pub action: String,
    /// What it acted on.
    pub target: String,
    /// `ok`, or why it was refused.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
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
}

/// Audit entries kept in memory for queries (the file keeps them all).
const AUDIT_IN_MEMORY: usize = 10_000;

#[derive(Serialize, Deserialize, Default)]
struct TokenFile {
    tokens: BTreeMap<String, TokenRecord>,
}

pub struct Acl {
    path: PathBuf,
    tokens: RwLock<BTreeMap<String, TokenRecord>>,
    audit_path: PathBuf,
    audit: Mutex<Vec<AuditEntry>>,
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
    pub fn open(data_dir: &Path) -> Result<Acl, AclError> {
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
        let audit_path = data_dir.join("audit.jsonl");
        let audit = match std::fs::read_to_string(&audit_path) {
            Ok(text) => {
                let mut entries: Vec<AuditEntry> = text
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
                let skip = entries.len().saturating_sub(AUDIT_IN_MEMORY);
                entries.drain(..skip);
                entries
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(&audit_path, e)),
        };
        let first_start = tokens.is_empty() && !path.exists();
        let acl = Acl {
            path,
            tokens: RwLock::new(tokens),
            audit_path,
            audit: Mutex::new(audit),
        };
        if first_start {
            let bootstrap = data_dir.join("bootstrap-token");
            let (record, secret) = new_token(Role::Admin, "bootstrap admin token", "bootstrap");
            acl.insert(record.clone())?;
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
            acl.record(AuditEntry::new(
                "bootstrap",
                "token.create",
                &record.accessor,
                "ok",
                "bootstrap admin token",
            ));
            tracing::warn!(file = %bootstrap.display(), "created the bootstrap admin token; keep it safe and delete the file");
        }
        Ok(acl)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, TokenRecord>> {
        self.tokens.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn audit_lock(&self) -> MutexGuard<'_, Vec<AuditEntry>> {
        self.audit.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The token whose secret is `secret`.
    pub fn lookup(&self, secret: &str) -> Option<TokenRecord> {
        let hash = sha256_hex(secret);
        self.read()
            .values()
            .find(|t| crate::sync::constant_time_eq(t.secret_sha256.as_bytes(), hash.as_bytes()))
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
    pub fn create(
        &self,
        role: Role,
        description: &str,
        by: &str,
    ) -> Result<(TokenRecord, String), AclError> {
        let (record, secret) = new_token(role, description, by);
        self.insert(record.clone())?;
        Ok((record, secret))
    }

    /// Adds a token; one that cannot be saved is not added.
    fn insert(&self, record: TokenRecord) -> Result<(), AclError> {
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
    pub fn delete(&self, accessor: &str) -> Result<bool, AclError> {
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

    /// Appends to the audit log (file and memory). A write error is
    /// logged: refusing the request would not undo what it did.
    pub fn record(&self, entry: AuditEntry) {
        let line = match serde_json::to_string(&entry) {
            Ok(line) => line,
            Err(error) => {
                tracing::error!(%error, "cannot encode an audit entry");
                return;
            }
        };
        let mut audit = self.audit_lock();
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode_0600()
            .open(&self.audit_path)
            .and_then(|mut f| {
                f.write_all(format!("{line}\n").as_bytes())?;
                f.sync_data()
            });
        if let Err(error) = appended {
            tracing::error!(path = %self.audit_path.display(), %error, "cannot append to the audit log");
        }
        tracing::info!(target: "signpost::audit", who = %entry.who, action = %entry.action, target = %entry.target, outcome = %entry.outcome, reason = %entry.reason);
        audit.push(entry);
        let excess = audit.len().saturating_sub(AUDIT_IN_MEMORY);
        audit.drain(..excess);
    }

    /// The newest `limit` audit entries at or after `since` (Unix ms),
    /// oldest first.
    pub fn audit(&self, since: u64, limit: usize) -> Vec<AuditEntry> {
        let audit = self.audit_lock();
        let matching: Vec<&AuditEntry> = audit.iter().filter(|e| e.time >= since).collect();
        let skip = matching.len().saturating_sub(limit);
        matching.into_iter().skip(skip).cloned().collect()
    }
}

impl AuditEntry {
    pub fn new(who: &str, action: &str, target: &str, outcome: &str, reason: &str) -> Self {
        AuditEntry {
            time: now_millis(),
            who: who.to_string(),
            action: action.to_string(),
            target: target.to_string(),
            outcome: outcome.to_string(),
            reason: reason.to_string(),
        }
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

/// `OpenOptions::mode(0o600)`, named.
trait Private {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Private for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
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

    #[test]
    fn bootstrap_once_secrets_hashed_and_tokens_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let acl = Acl::open(dir.path()).unwrap();
        let bootstrap = std::fs::read_to_string(dir.path().join("bootstrap-token")).unwrap();
        let admin = acl.authorize(Some(bootstrap.trim()), Role::Admin).unwrap();
        let (op, secret) = acl.create(Role::Operator, "ci", &admin.accessor).unwrap();
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
        let again = Acl::open(dir.path()).unwrap();
        assert!(
            !dir.path().join("bootstrap-token").exists(),
            "no second bootstrap"
        );
        assert_eq!(again.lookup(&secret).unwrap().accessor, op.accessor);
        assert!(again.delete(&op.accessor).unwrap());
        assert!(again.lookup(&secret).is_none());
        let actions: Vec<String> = again.audit(0, 10).into_iter().map(|e| e.action).collect();
        assert_eq!(actions, vec!["token.create"]);
    }
}
