//! ACL tokens, policies and the audit log.
//!
//! A token has policies ([`policy`]: rules in Consul's shape), node
//! identities (write on that node only: what an agent joins with) and
//! service identities (write on that service), and may expire. Tokens
//! made before policies have a role, which stands for its built-in
//! policy. Only a SHA-256 hash of each secret is kept
//! (`data_dir/acl.json`, 0600); secrets are 256 random bits, so a fast
//! hash is enough, and the hash indexes the tokens. On first start a
//! bootstrap management token is created and its secret written once to
//! `data_dir/bootstrap-token` (0600); a lost one is replaced through
//! [`Acl::bootstrap_again`], which needs a file only root on a
//! control-plane host can write. Every token change and every refused
//! request goes to the audit log ([`crate::audit`]).

pub mod policy;

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use signpost_core::acl::{Access, Authorizer, DefaultPolicy, Resource, Rules};
use signpost_core::command::now_millis;
use signpost_core::control_plane_config::AuditConfig;

pub use crate::audit::AuditEntry;
use crate::audit::{AuditLog, Private};
use policy::PolicyRecord;
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

/// What a token could do before policies; each stands for a built-in
/// policy ([`policy::role_policy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Agent,
    Operator,
    Admin,
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The token's public name, used to list and delete it.
    pub accessor: String,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// A token made before policies: its role's built-in policy applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Policy IDs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// Nodes this token may register as (and nothing else).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_identities: Vec<String>,
    /// Services this token may register.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_identities: Vec<String>,
    pub description: String,
    /// Unix seconds.
    pub created_at: u64,
    /// When it stops working, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// The accessor of the token that created it (`bootstrap` for the
    /// first).
    pub created_by: String,
}

impl TokenRecord {
    fn expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// What a new token has.
#[derive(Debug, Clone, Default)]
pub struct TokenSpec {
    pub description: String,
    /// Policy IDs or names.
    pub policies: Vec<String>,
    pub node_identities: Vec<String>,
    pub service_identities: Vec<String>,
    /// Consul's `ExpirationTTL`.
    pub ttl: Option<Duration>,
}

/// Shortest and longest `ExpirationTTL`.
pub const TTL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(365 * 24 * 3600);
/// Most policies and identities one token may have, each.
const MAX_PER_TOKEN: usize = 64;

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
    /// The request itself is wrong (400).
    #[error("{0}")]
    Invalid(String),
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
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    policies: BTreeMap<String, PolicyRecord>,
    /// How many times the bootstrap token was made (Consul's reset index).
    #[serde(default)]
    bootstrap_index: u64,
}

/// Tokens, indexed by accessor and by their secret's hash; policies with
/// their parsed rules.
#[derive(Default)]
struct State {
    tokens: BTreeMap<String, TokenRecord>,
    by_hash: HashMap<String, String>,
    policies: BTreeMap<String, (PolicyRecord, Rules)>,
    bootstrap_index: u64,
}

impl State {
    fn insert_token(&mut self, record: TokenRecord) -> Option<TokenRecord> {
        self.by_hash
            .insert(record.secret_sha256.clone(), record.accessor.clone());
        let before = self.tokens.insert(record.accessor.clone(), record);
        if let Some(before) = &before
            && self.tokens[&before.accessor].secret_sha256 != before.secret_sha256
        {
            self.by_hash.remove(&before.secret_sha256);
        }
        before
    }

    fn remove_token(&mut self, accessor: &str) -> Option<TokenRecord> {
        let before = self.tokens.remove(accessor)?;
        self.by_hash.remove(&before.secret_sha256);
        Some(before)
    }

    fn set_policy(&mut self, record: PolicyRecord) {
        let rules = match policy::parse(&record.rules) {
            Ok(rules) => rules,
            Err(e) => {
                // Checked when written: only a hand-edited store gets here.
                tracing::error!(policy = %record.name, error = %e, "a stored policy does not parse: it grants nothing");
                Rules::default()
            }
        };
        self.policies.insert(record.id.clone(), (record, rules));
    }

    fn file(&self) -> TokenFile {
        TokenFile {
            tokens: self.tokens.clone(),
            policies: self
                .policies
                .iter()
                .map(|(id, (record, _))| (id.clone(), record.clone()))
                .collect(),
            bootstrap_index: self.bootstrap_index,
        }
    }

    /// The policy with this ID or name (built-in or stored).
    fn policy_id(&self, id_or_name: &str) -> Option<String> {
        if let Some(b) = policy::builtin(id_or_name) {
            return Some(b.id.to_string());
        }
        self.policies
            .iter()
            .find(|(id, (record, _))| id.as_str() == id_or_name || record.name == id_or_name)
            .map(|(id, _)| id.clone())
    }

    /// A token's rules: its role's, its policies' and its identities'.
    fn rules_of(&self, token: &TokenRecord) -> Rules {
        let mut rules = Rules::default();
        let role = token.role.map(policy::role_policy);
        for id in token.policies.iter().map(String::as_str).chain(role) {
            if let Some(b) = policy::builtin(id) {
                rules.merge(&policy::builtin_rules(b));
            } else if let Some((_, r)) = self.policies.get(id) {
                rules.merge(r);
            }
        }
        for node in &token.node_identities {
            rules.merge(&Rules::node_identity(node));
        }
        for service in &token.service_identities {
            rules.merge(&Rules::service_identity(service));
        }
        rules
    }
}

pub struct Acl {
    path: PathBuf,
    state: RwLock<State>,
    audit: AuditLog,
    /// What resources no rule names give (`acl.default_policy`).
    default: DefaultPolicy,
    /// Set when replicas share a store: tokens and policies are records
    /// there (`acl/<accessor>`, `acl-policy/<id>`), and come back
    /// through [`Acl::store_token`] and [`Acl::store_policy`].
    shared: OnceLock<Arc<dyn crate::store::Shared>>,
}

/// Who a request comes from, and what that token may do.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The token's accessor, or `anonymous`.
    pub accessor: String,
    pub record: Option<TokenRecord>,
    pub authorizer: Authorizer,
}

impl Resolved {
    /// Who, for the audit log (empty: anonymous).
    pub fn who(&self) -> &str {
        match self.record {
            Some(_) => &self.accessor,
            None => "",
        }
    }
}

/// Why a request is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// A token we do not know (401).
    Unknown,
    /// A token past its expiration time (401).
    Expired { accessor: String },
    /// A token, or no token, that may not (403, or 401 without a token).
    Forbidden {
        accessor: Option<String>,
        needs: String,
    },
}

impl Acl {
    /// Loads the tokens and policies in `data_dir`; on the very first
    /// start creates the bootstrap management token and writes its secret
    /// to `data_dir/bootstrap-token`.
    pub fn open(
        data_dir: &Path,
        audit: AuditConfig,
        default: DefaultPolicy,
    ) -> Result<Acl, AclError> {
        let path = data_dir.join("acl.json");
        let file =
            match std::fs::read(&path) {
                Ok(bytes) => Some(serde_json::from_slice::<TokenFile>(&bytes).map_err(
                    |source| AclError::Corrupt {
                        path: path.display().to_string(),
                        source,
                    },
                )?),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(AclError::Io {
                        path: path.display().to_string(),
                        source: e,
                    });
                }
            };
        let acl = Acl::for_store(data_dir, audit, default)?;
        let first_start = file.is_none();
        if let Some(file) = file {
            let mut state = acl.write();
            file.tokens.into_values().for_each(|t| {
                state.insert_token(t);
            });
            file.policies
                .into_values()
                .for_each(|p| state.set_policy(p));
            state.bootstrap_index = file.bootstrap_index.max(1);
        }
        if first_start {
            let record = acl.bootstrap_token(data_dir)?;
            acl.change_in_file(|state| {
                state.insert_token(record);
                state.bootstrap_index = 1;
            })?;
        }
        Ok(acl)
    }

    /// The ACL of a replica on a shared store: nothing until it is loaded
    /// from it ([`Acl::share`]); the audit file stays local.
    pub fn for_store(
        data_dir: &Path,
        audit: AuditConfig,
        default: DefaultPolicy,
    ) -> Result<Acl, AclError> {
        let audit = open_audit(data_dir, audit)?;
        Ok(Acl {
            path: data_dir.join("acl.json"),
            state: RwLock::new(State::default()),
            audit,
            default,
            shared: OnceLock::new(),
        })
    }

    /// Tokens live in the shared store from now on: none here until
    /// they are loaded from it. The first replica ever to share it
    /// creates the bootstrap management token (its secret in its
    /// `data_dir`).
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
            let record = self.bootstrap_token(data_dir)?;
            self.put_shared("acl", &record.accessor, &record).await?;
            shared.put("acl-reset".to_string(), b"1".to_vec()).await?;
            self.store_token(&record.accessor.clone(), Some(record));
            self.store_bootstrap_index(1);
        }
        Ok(())
    }

    /// A token as the shared store has it (`None`: deleted).
    pub fn store_token(&self, accessor: &str, record: Option<TokenRecord>) {
        let mut state = self.write();
        match record {
            Some(record) => state.insert_token(record),
            None => state.remove_token(accessor),
        };
    }

    /// Every token, as the shared store has them after a reload.
    pub fn store_tokens(&self, all: BTreeMap<String, TokenRecord>) {
        let mut state = self.write();
        state.tokens.clear();
        state.by_hash.clear();
        all.into_values().for_each(|t| {
            state.insert_token(t);
        });
    }

    /// A policy as the shared store has it (`None`: deleted).
    pub fn store_policy(&self, id: &str, record: Option<PolicyRecord>) {
        let mut state = self.write();
        match record {
            Some(record) => state.set_policy(record),
            None => {
                state.policies.remove(id);
            }
        }
    }

    /// Every policy, as the shared store has them after a reload.
    pub fn store_policies(&self, all: BTreeMap<String, PolicyRecord>) {
        let mut state = self.write();
        state.policies.clear();
        all.into_values().for_each(|p| state.set_policy(p));
    }

    /// The bootstrap reset index as the shared store has it.
    pub fn store_bootstrap_index(&self, index: u64) {
        self.write().bootstrap_index = index;
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

    async fn put_shared<T: Serialize>(
        &self,
        kind: &str,
        id: &str,
        record: &T,
    ) -> Result<(), AclError> {
        let Some(shared) = self.shared.get() else {
            return Ok(());
        };
        let bytes = serde_json::to_vec(record).map_err(|source| AclError::Corrupt {
            path: format!("{kind}/{id}"),
            source,
        })?;
        shared.put(format!("{kind}/{id}"), bytes).await?;
        Ok(())
    }

    /// Creates a management token and writes its secret, once, to
    /// `data_dir/bootstrap-token`.
    fn bootstrap_token(&self, data_dir: &Path) -> Result<TokenRecord, AclError> {
        let bootstrap = data_dir.join("bootstrap-token");
        let spec = TokenSpec {
            description: "bootstrap management token".to_string(),
            policies: vec![policy::GLOBAL_MANAGEMENT.to_string()],
            ..TokenSpec::default()
        };
        let (record, secret) = new_token(&spec, spec.policies.clone(), "bootstrap");
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
        written.map_err(|source| AclError::Io {
            path: bootstrap.display().to_string(),
            source,
        })?;
        self.record(AuditEntry::new(
            "bootstrap",
            "token.create",
            &record.accessor,
            "ok",
            "bootstrap management token",
        ));
        tracing::warn!(file = %bootstrap.display(), "created the bootstrap management token; keep it safe and delete the file");
        Ok(record)
    }

    /// Consul's ACL reset: a new management token, allowed only when
    /// `data_dir/acl-bootstrap-reset` holds the current reset index (so
    /// only someone who can write there, root on a control-plane host,
    /// can). The file is removed; the index moves on. `Err` with the
    /// index when the file is missing or stale.
    pub async fn bootstrap_again(
        &self,
        data_dir: &Path,
    ) -> Result<(TokenRecord, String), BootstrapRefused> {
        let index = self.read().bootstrap_index;
        let reset = data_dir.join("acl-bootstrap-reset");
        let written = std::fs::read_to_string(&reset).ok();
        if written.as_deref().map(str::trim) != Some(index.to_string().as_str()) {
            return Err(BootstrapRefused::NotAllowed { index });
        }
        let spec = TokenSpec {
            description: format!("bootstrap management token (reset {index})"),
            policies: vec![policy::GLOBAL_MANAGEMENT.to_string()],
            ..TokenSpec::default()
        };
        let (record, secret) = new_token(&spec, spec.policies.clone(), "bootstrap");
        let next = index + 1;
        let stored = if let Some(shared) = self.shared.get() {
            match self.put_shared("acl", &record.accessor, &record).await {
                Ok(()) => shared
                    .put("acl-reset".to_string(), next.to_string().into_bytes())
                    .await
                    .map_err(AclError::from),
                Err(e) => Err(e),
            }
            .map(|()| {
                self.store_token(&record.accessor.clone(), Some(record.clone()));
                self.store_bootstrap_index(next);
            })
        } else {
            let r = record.clone();
            self.change_in_file(move |state| {
                state.insert_token(r);
                state.bootstrap_index = next;
            })
        };
        stored.map_err(BootstrapRefused::Store)?;
        if let Err(e) = std::fs::remove_file(&reset) {
            tracing::warn!(file = %reset.display(), error = %e, "cannot remove the reset file: it no longer matches the index anyway");
        }
        self.record(AuditEntry::new(
            "bootstrap",
            "acl.bootstrap",
            &record.accessor,
            "ok",
            &format!("reset index {index}"),
        ));
        Ok((record, secret))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Who presents `secret` (`None`: nobody, the anonymous token), with
    /// what its rules allow.
    pub fn resolve(&self, secret: Option<&str>) -> Result<Resolved, Denied> {
        let Some(secret) = secret else {
            return Ok(Resolved {
                accessor: "anonymous".to_string(),
                record: None,
                authorizer: Authorizer::new(Rules::default(), self.default),
            });
        };
        let hash = sha256_hex(secret);
        let state = self.read();
        let token = state
            .by_hash
            .get(&hash)
            .and_then(|accessor| state.tokens.get(accessor))
            .ok_or(Denied::Unknown)?;
        if token.expired(now_millis() / 1000) {
            return Err(Denied::Expired {
                accessor: token.accessor.clone(),
            });
        }
        Ok(Resolved {
            accessor: token.accessor.clone(),
            authorizer: Authorizer::new(state.rules_of(token), self.default),
            record: Some(token.clone()),
        })
    }

    /// Checks that `secret` (if any) may do `needed` on `resource`.
    pub fn authorize(
        &self,
        secret: Option<&str>,
        resource: Resource<'_>,
        needed: Access,
    ) -> Result<Resolved, Denied> {
        let resolved = self.resolve(secret)?;
        if resolved.authorizer.allows(resource, needed) {
            Ok(resolved)
        } else {
            Err(Denied::Forbidden {
                accessor: resolved.record.map(|r| r.accessor),
                needs: policy::needs(&resource, needed),
            })
        }
    }

    /// Creates a token; returns it and its secret (shown this once).
    pub async fn create(
        &self,
        spec: &TokenSpec,
        by: &str,
    ) -> Result<(TokenRecord, String), AclError> {
        let invalid = |m: String| Err(AclError::Invalid(m));
        if spec.policies.len() > MAX_PER_TOKEN
            || spec.node_identities.len() > MAX_PER_TOKEN
            || spec.service_identities.len() > MAX_PER_TOKEN
        {
            return invalid(format!(
                "at most {MAX_PER_TOKEN} policies, node identities and service identities each"
            ));
        }
        if spec.description.len() > 1024 {
            return invalid("Description: at most 1024 bytes".to_string());
        }
        if let Some(ttl) = spec.ttl
            && !TTL_RANGE.contains(&ttl)
        {
            return invalid("ExpirationTTL: must be between 1s and 8760h".to_string());
        }
        for name in spec.node_identities.iter().chain(&spec.service_identities) {
            if !valid_name(name) {
                return invalid(format!(
                    "identity {name:?}: 1 to 128 letters, digits, '.', '_' or '-'"
                ));
            }
        }
        let policies = {
            let state = self.read();
            let mut ids = Vec::new();
            for p in &spec.policies {
                match state.policy_id(p) {
                    Some(id) => ids.push(id),
                    None => return invalid(format!("Policies: no policy {p:?}")),
                }
            }
            ids
        };
        if policies.is_empty()
            && spec.node_identities.is_empty()
            && spec.service_identities.is_empty()
        {
            return invalid(
                "a token needs Policies, NodeIdentities or ServiceIdentities (or a legacy Role)"
                    .to_string(),
            );
        }
        let (record, secret) = new_token(spec, policies, by);
        if self.shared.get().is_some() {
            self.put_shared("acl", &record.accessor, &record).await?;
            self.store_token(&record.accessor.clone(), Some(record.clone()));
        } else {
            let r = record.clone();
            self.change_in_file(move |state| {
                state.insert_token(r);
            })?;
        }
        Ok((record, secret))
    }

    /// Creates a policy, or changes the one with `id`.
    pub async fn put_policy(
        &self,
        id: Option<&str>,
        name: &str,
        description: &str,
        rules: &str,
    ) -> Result<PolicyRecord, AclError> {
        let invalid = |m: String| Err(AclError::Invalid(m));
        if name.is_empty()
            || name.len() > 128
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return invalid(format!(
                "Name {name:?}: 1 to 128 letters, digits, '-' or '_'"
            ));
        }
        if description.len() > 1024 {
            return invalid("Description: at most 1024 bytes".to_string());
        }
        if let Some(id) = id
            && policy::builtin(id).is_some()
        {
            return invalid(format!("{id}: built-in policies cannot be changed"));
        }
        if let Err(e) = policy::parse(rules) {
            return invalid(format!("Rules: {e}"));
        }
        let (created_at, id) = {
            let state = self.read();
            if let Some(other) = state.policy_id(name)
                && Some(other.as_str()) != id
            {
                return invalid(format!("a policy named {name:?} exists ({other})"));
            }
            match id {
                Some(id) => match state.policies.get(id) {
                    Some((existing, _)) => (existing.created_at, id.to_string()),
                    None => return invalid(format!("no policy {id:?}")),
                },
                None => (now_millis() / 1000, signpost_core::uuid::new_v4()),
            }
        };
        let record = PolicyRecord {
            id,
            name: name.to_string(),
            description: description.to_string(),
            rules: rules.to_string(),
            created_at,
        };
        if self.shared.get().is_some() {
            self.put_shared("acl-policy", &record.id, &record).await?;
            self.store_policy(&record.id.clone(), Some(record.clone()));
        } else {
            let r = record.clone();
            self.change_in_file(move |state| state.set_policy(r))?;
        }
        Ok(record)
    }

    /// Deletes a policy; false if there is none with that ID. Tokens that
    /// had it keep its ID, which grants nothing.
    pub async fn delete_policy(&self, id: &str) -> Result<bool, AclError> {
        if policy::builtin(id).is_some() {
            return Err(AclError::Invalid(format!(
                "{id}: built-in policies cannot be deleted"
            )));
        }
        if !self.read().policies.contains_key(id) {
            return Ok(false);
        }
        if let Some(shared) = self.shared.get() {
            shared.delete(format!("acl-policy/{id}")).await?;
            self.store_policy(id, None);
        } else {
            self.change_in_file(|state| {
                state.policies.remove(id);
            })?;
        }
        Ok(true)
    }

    /// Every policy: built-in ones first.
    pub fn policies(&self) -> Vec<PolicyRecord> {
        let builtins = policy::BUILTINS.iter().map(|b| PolicyRecord {
            id: b.id.to_string(),
            name: b.name.to_string(),
            description: b.description.to_string(),
            rules: b.rules.to_string(),
            created_at: 0,
        });
        let state = self.read();
        builtins
            .chain(state.policies.values().map(|(r, _)| r.clone()))
            .collect()
    }

    /// The policy with this ID or name.
    pub fn policy(&self, id_or_name: &str) -> Option<PolicyRecord> {
        self.policies()
            .into_iter()
            .find(|p| p.id == id_or_name || p.name == id_or_name)
    }

    /// The name of the policy with this ID (empty if it was deleted).
    pub fn policy_name(&self, id: &str) -> String {
        if let Some(b) = policy::builtin(id) {
            return b.name.to_string();
        }
        self.read()
            .policies
            .get(id)
            .map(|(r, _)| r.name.clone())
            .unwrap_or_default()
    }

    /// Changes the state and saves it; a change that cannot be saved is
    /// undone.
    fn change_in_file(&self, change: impl FnOnce(&mut State)) -> Result<(), AclError> {
        let mut state = self.write();
        let before = state.file();
        change(&mut state);
        let saved = self.save(&state.file());
        if saved.is_err() {
            let mut restored = State {
                bootstrap_index: before.bootstrap_index,
                ..State::default()
            };
            before.tokens.into_values().for_each(|t| {
                restored.insert_token(t);
            });
            before
                .policies
                .into_values()
                .for_each(|p| restored.set_policy(p));
            *state = restored;
        }
        saved
    }

    /// Deletes a token; false if there is none with that accessor. A
    /// deletion that cannot be saved leaves the token in place.
    pub async fn delete(&self, accessor: &str) -> Result<bool, AclError> {
        if !self.read().tokens.contains_key(accessor) {
            return Ok(false);
        }
        if let Some(shared) = self.shared.get() {
            shared.delete(format!("acl/{accessor}")).await?;
            self.store_token(accessor, None);
        } else {
            self.change_in_file(|state| {
                state.remove_token(accessor);
            })?;
        }
        Ok(true)
    }

    /// Deletes tokens past their expiration time (they are refused
    /// already); returns how many.
    pub async fn purge_expired(&self) -> usize {
        let now = now_millis() / 1000;
        let expired: Vec<String> = self
            .read()
            .tokens
            .values()
            .filter(|t| t.expired(now))
            .map(|t| t.accessor.clone())
            .collect();
        let mut purged = 0;
        for accessor in expired {
            match self.delete(&accessor).await {
                Ok(true) => {
                    purged += 1;
                    self.record(AuditEntry::new(
                        "",
                        "token.expire",
                        &accessor,
                        "ok",
                        "expiration time reached",
                    ));
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(accessor = %accessor, error = %e, "cannot delete an expired token; it is refused anyway")
                }
            }
        }
        purged
    }

    fn save(&self, file: &TokenFile) -> Result<(), AclError> {
        let bytes = serde_json::to_vec_pretty(file).map_err(|source| AclError::Corrupt {
            path: self.path.display().to_string(),
            source,
        })?;
        write_atomic(&self.path, &bytes).map_err(|source| AclError::Io {
            path: self.path.display().to_string(),
            source,
        })
    }

    pub fn tokens(&self) -> Vec<TokenRecord> {
        self.read().tokens.values().cloned().collect()
    }

    /// The token with this accessor.
    pub fn token(&self, accessor: &str) -> Option<TokenRecord> {
        self.read().tokens.get(accessor).cloned()
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

    /// Requests refused for their token, counted for the metrics.
    pub fn denials(&self) -> prometheus_client::metrics::counter::Counter {
        self.audit.denials()
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

/// Why `PUT /v1/acl/bootstrap` was refused.
#[derive(Debug)]
pub enum BootstrapRefused {
    /// No reset file with the current index.
    NotAllowed {
        index: u64,
    },
    Store(AclError),
}

/// Node, service and policy names in tokens.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn new_token(spec: &TokenSpec, policies: Vec<String>, by: &str) -> (TokenRecord, String) {
    let secret = hex(&rand::random::<[u8; 32]>());
    let accessor = hex(&rand::random::<[u8; 8]>());
    let now = now_millis() / 1000;
    let record = TokenRecord {
        accessor,
        secret_sha256: sha256_hex(&secret),
        role: None,
        policies,
        node_identities: spec.node_identities.clone(),
        service_identities: spec.service_identities.clone(),
        description: spec.description.clone(),
        created_at: now,
        expires_at: spec.ttl.map(|ttl| now + ttl.as_secs().max(1)),
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

    fn open(dir: &Path) -> Acl {
        Acl::open(dir, AuditConfig::default(), DefaultPolicy::Deny).unwrap()
    }

    #[tokio::test]
    async fn bootstrap_once_secrets_hashed_and_tokens_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let acl = open(dir.path());
        let bootstrap = std::fs::read_to_string(dir.path().join("bootstrap-token")).unwrap();
        let admin = acl
            .authorize(Some(bootstrap.trim()), Resource::Acl, Access::Write)
            .unwrap();
        let spec = TokenSpec {
            description: "ci".to_string(),
            policies: vec!["builtin/operator".to_string()],
            ..TokenSpec::default()
        };
        let (op, secret) = acl.create(&spec, &admin.accessor).await.unwrap();
        let stored = std::fs::read_to_string(dir.path().join("acl.json")).unwrap();
        assert!(!stored.contains(&secret), "secrets are never stored");
        assert!(!stored.contains(bootstrap.trim()));
        assert_eq!(
            acl.authorize(Some(&secret), Resource::Acl, Access::Write)
                .unwrap_err(),
            Denied::Forbidden {
                accessor: Some(op.accessor.clone()),
                needs: "acl write".to_string()
            }
        );
        assert!(
            acl.authorize(Some(&secret), Resource::Operator, Access::Write)
                .is_ok()
        );
        assert_eq!(acl.resolve(Some("nope")).unwrap_err(), Denied::Unknown);
        use std::os::unix::fs::PermissionsExt;
        for file in ["bootstrap-token", "acl.json"] {
            let mode = std::fs::metadata(dir.path().join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }

        std::fs::remove_file(dir.path().join("bootstrap-token")).unwrap();
        let again = open(dir.path());
        assert!(
            !dir.path().join("bootstrap-token").exists(),
            "no second bootstrap"
        );
        assert_eq!(again.resolve(Some(&secret)).unwrap().accessor, op.accessor);
        assert!(again.delete(&op.accessor).await.unwrap());
        assert_eq!(again.resolve(Some(&secret)).unwrap_err(), Denied::Unknown);
        let actions: Vec<String> = again.audit(0, 10).into_iter().map(|e| e.action).collect();
        assert_eq!(actions, vec!["token.create"]);
    }

    #[tokio::test]
    async fn policies_identities_legacy_roles_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let acl = open(dir.path());
        let web = acl
            .put_policy(
                None,
                "web-writer",
                "",
                r#"service "web" { policy = "write" }"#,
            )
            .await
            .unwrap();
        assert!(
            acl.put_policy(None, "web-writer", "", "").await.is_err(),
            "names are unique"
        );
        let e = acl
            .put_policy(None, "bad", "", "service \"web\" { policy = \"all\" }")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("Rules:"), "{e}");
        let spec = TokenSpec {
            policies: vec!["web-writer".to_string()],
            node_identities: vec!["host-a".to_string()],
            ..TokenSpec::default()
        };
        let (token, secret) = acl.create(&spec, "t").await.unwrap();
        assert_eq!(token.policies, vec![web.id.clone()]);
        let r = acl.resolve(Some(&secret)).unwrap();
        assert!(r.authorizer.allows(Resource::Service("web"), Access::Write));
        assert!(!r.authorizer.allows(Resource::Service("db"), Access::Write));
        assert!(r.authorizer.allows(Resource::Node("host-a"), Access::Write));
        assert!(!r.authorizer.allows(Resource::Node("host-b"), Access::Write));

        // A token from before policies keeps its role's rights.
        let mut legacy = token.clone();
        legacy.accessor = "legacy".to_string();
        legacy.secret_sha256 = sha256_hex("legacy-secret");
        legacy.policies.clear();
        legacy.node_identities.clear();
        legacy.role = Some(Role::Agent);
        acl.store_token("legacy", Some(legacy));
        let r = acl.resolve(Some("legacy-secret")).unwrap();
        assert!(
            r.authorizer
                .allows(Resource::Node("anything"), Access::Write)
        );

        // Deleting the policy takes its rights away from the token.
        assert!(acl.delete_policy(&web.id).await.unwrap());
        let r = acl.resolve(Some(&secret)).unwrap();
        assert!(!r.authorizer.allows(Resource::Service("web"), Access::Write));

        let (expiring, secret) = acl
            .create(
                &TokenSpec {
                    policies: vec!["builtin/global-read-only".to_string()],
                    ttl: Some(Duration::from_secs(1)),
                    ..TokenSpec::default()
                },
                "t",
            )
            .await
            .unwrap();
        let mut past = expiring.clone();
        past.expires_at = Some(1);
        acl.store_token(&expiring.accessor, Some(past));
        assert!(matches!(
            acl.resolve(Some(&secret)),
            Err(Denied::Expired { .. })
        ));
        assert_eq!(acl.purge_expired().await, 1);
        assert!(acl.token(&expiring.accessor).is_none());
    }

    #[tokio::test]
    async fn bootstrap_again_needs_the_reset_file_with_the_current_index() {
        let dir = tempfile::tempdir().unwrap();
        let acl = open(dir.path());
        let refused = acl.bootstrap_again(dir.path()).await.unwrap_err();
        assert!(matches!(refused, BootstrapRefused::NotAllowed { index: 1 }));
        std::fs::write(dir.path().join("acl-bootstrap-reset"), "0\n").unwrap();
        assert!(
            acl.bootstrap_again(dir.path()).await.is_err(),
            "stale index"
        );
        std::fs::write(dir.path().join("acl-bootstrap-reset"), "1\n").unwrap();
        let (_, secret) = acl.bootstrap_again(dir.path()).await.unwrap();
        assert!(
            acl.authorize(Some(&secret), Resource::Acl, Access::Write)
                .is_ok()
        );
        assert!(!dir.path().join("acl-bootstrap-reset").exists());
        std::fs::write(dir.path().join("acl-bootstrap-reset"), "1\n").unwrap();
        assert!(
            matches!(
                acl.bootstrap_again(dir.path()).await,
                Err(BootstrapRefused::NotAllowed { index: 2 })
            ),
            "each index works once"
        );
        let reopened = open(dir.path());
        assert!(reopened.resolve(Some(&secret)).is_ok());
    }
}
