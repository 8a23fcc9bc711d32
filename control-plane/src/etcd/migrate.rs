//! `signpost-control-plane migrate --from file --to etcd` (and back): copies
//! a replica's state between its `data_dir` and etcd: every node with its
//! instances and failure, every command, every ACL token, the KV store
//! (keys, sessions, lock delays; their indexes start again in the
//! destination, which clients take as an index reset). The destination
//! must be empty, so that a migration never mixes two fleets; the source
//! is left as it was. Stop the control plane before migrating from files.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use prost::Message as _;
use signpost_proto::{CatalogSnapshot, NodeSnapshot};

use super::Etcd;
use crate::store::Shared as _;

/// What a migration copied.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Copied {
    pub nodes: usize,
    pub commands: usize,
    pub tokens: usize,
    /// KV keys (their sessions and lock delays come along).
    pub keys: usize,
}

impl std::fmt::Display for Copied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} nodes, {} commands, {} tokens, {} keys",
            self.nodes, self.commands, self.tokens, self.keys
        )
    }
}

fn read_json(path: &Path) -> anyhow::Result<Option<serde_json::Value>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
            format!("{}: not the JSON the control plane writes", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Copies `data_dir`'s state into etcd, which must hold none.
pub async fn file_to_etcd(data_dir: &Path, etcd: &Etcd) -> anyhow::Result<Copied> {
    let (existing, _, _) = etcd.load("").await?;
    if !existing.is_empty() {
        anyhow::bail!(
            "etcd already holds {} keys under the prefix: migrate into an empty prefix",
            existing.len()
        );
    }
    let mut copied = Copied::default();
    let catalog = data_dir.join("catalog.pb");
    match std::fs::read(&catalog) {
        Ok(bytes) => {
            let snapshot = CatalogSnapshot::decode(bytes.as_slice())
                .with_context(|| format!("{}: corrupt snapshot", catalog.display()))?;
            for node in snapshot.nodes {
                let Some(name) = node.hello.as_ref().map(|h| h.node.clone()) else {
                    continue;
                };
                if node.failed_at_unix_ms > 0 {
                    etcd.put(
                        format!("failed/{name}"),
                        node.failed_at_unix_ms.to_string().into_bytes(),
                    )
                    .await?;
                }
                let record = NodeSnapshot {
                    failed_at_unix_ms: 0,
                    ..node
                };
                etcd.put(format!("nodes/{name}"), record.encode_to_vec())
                    .await?;
                copied.nodes += 1;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", catalog.display())),
    }
    if let Some(serde_json::Value::Object(commands)) = read_json(&data_dir.join("commands.json"))? {
        for (id, command) in commands {
            etcd.put(format!("commands/{id}"), serde_json::to_vec(&command)?)
                .await?;
            copied.commands += 1;
        }
    }
    if let Some(file) = read_json(&data_dir.join("acl.json"))? {
        if let Some(tokens) = file["tokens"].as_object() {
            for (accessor, record) in tokens {
                etcd.put(format!("acl/{accessor}"), serde_json::to_vec(record)?)
                    .await?;
                copied.tokens += 1;
            }
        }
        if let Some(policies) = file["policies"].as_object() {
            for (id, record) in policies {
                etcd.put(format!("acl-policy/{id}"), serde_json::to_vec(record)?)
                    .await?;
            }
        }
        let index = file["bootstrap_index"].as_u64().unwrap_or(1).max(1);
        etcd.put("acl-reset".to_string(), index.to_string().into_bytes())
            .await?;
        // Its bootstrap token is among them: none is made again.
        etcd.put("acl-bootstrap".to_string(), b"migrated".to_vec())
            .await?;
    }
    let records = crate::kv::file::FileBackend::export(data_dir)
        .with_context(|| format!("cannot read the KV store in {}", data_dir.display()))?;
    for (key, record) in records {
        if matches!(key, crate::kv::RecordKey::Entry(_)) {
            copied.keys += 1;
        }
        etcd.put(format!("{}{}", super::kv::PREFIX, key.encode()), record)
            .await?;
    }
    Ok(copied)
}

/// `acl.json` as the control plane writes it (no empty policies).
fn acl_file(
    tokens: serde_json::Map<String, serde_json::Value>,
    policies: serde_json::Map<String, serde_json::Value>,
    bootstrap_index: u64,
) -> serde_json::Value {
    let mut file = serde_json::json!({ "tokens": tokens, "bootstrap_index": bootstrap_index });
    if !policies.is_empty() {
        file["policies"] = serde_json::Value::Object(policies);
    }
    file
}

/// Copies etcd's state into `data_dir`, which must hold none.
pub async fn etcd_to_file(etcd: &Etcd, data_dir: &Path) -> anyhow::Result<Copied> {
    for name in ["catalog.pb", "commands.json", "acl.json", "kv.redb"] {
        if data_dir.join(name).exists() {
            anyhow::bail!(
                "{} exists: migrate into a data_dir without a control plane's state",
                data_dir.join(name).display()
            );
        }
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let (kvs, _, _) = etcd.load("").await?;
    let mut nodes: BTreeMap<String, NodeSnapshot> = BTreeMap::new();
    let mut failed: BTreeMap<String, u64> = BTreeMap::new();
    let mut commands = serde_json::Map::new();
    let mut tokens = serde_json::Map::new();
    let mut policies = serde_json::Map::new();
    let mut bootstrap_index = 1u64;
    let mut records = Vec::new();
    for kv in &kvs {
        let Some(key) = etcd.relative(kv.key()) else {
            continue;
        };
        if let Some(record) = key
            .strip_prefix(super::kv::PREFIX)
            .and_then(crate::kv::RecordKey::decode)
        {
            records.push((record, Some(kv.value().to_vec())));
        } else if let Some(node) = key.strip_prefix("nodes/") {
            let record = NodeSnapshot::decode(kv.value())
                .with_context(|| format!("etcd key {key}: not a node record"))?;
            nodes.insert(node.to_string(), record);
        } else if let Some(node) = key.strip_prefix("failed/") {
            let at = String::from_utf8_lossy(kv.value()).parse().unwrap_or(1);
            failed.insert(node.to_string(), at);
        } else if let Some(id) = key.strip_prefix("commands/") {
            commands.insert(id.to_string(), serde_json::from_slice(kv.value())?);
        } else if let Some(accessor) = key.strip_prefix("acl/") {
            tokens.insert(accessor.to_string(), serde_json::from_slice(kv.value())?);
        } else if let Some(id) = key.strip_prefix("acl-policy/") {
            policies.insert(id.to_string(), serde_json::from_slice(kv.value())?);
        } else if key == "acl-reset" {
            bootstrap_index = String::from_utf8_lossy(kv.value()).parse().unwrap_or(1);
        }
    }
    let copied = Copied {
        nodes: nodes.len(),
        commands: commands.len(),
        tokens: tokens.len(),
        keys: records
            .iter()
            .filter(|(k, _)| matches!(k, crate::kv::RecordKey::Entry(_)))
            .count(),
    };
    if !records.is_empty() {
        use crate::kv::Backend as _;
        let store = crate::kv::file::FileBackend::open(data_dir)
            .with_context(|| format!("cannot create the KV store in {}", data_dir.display()))?;
        store
            .commit(Vec::new(), records)
            .await
            .with_context(|| format!("cannot write the KV store in {}", data_dir.display()))?;
    }
    let snapshot = CatalogSnapshot {
        nodes: nodes
            .into_iter()
            .map(|(name, mut record)| {
                record.failed_at_unix_ms = failed.get(&name).copied().unwrap_or(0);
                record
            })
            .collect(),
    };
    let write = |name: &str, bytes: &[u8]| {
        let path = data_dir.join(name);
        signpost_daemon::fs::write_atomic(&path, bytes)
            .with_context(|| format!("cannot write {}", path.display()))
    };
    write("catalog.pb", &snapshot.encode_to_vec())?;
    write(
        "commands.json",
        &serde_json::to_vec_pretty(&serde_json::Value::Object(commands))?,
    )?;
    write(
        "acl.json",
        &serde_json::to_vec_pretty(&acl_file(tokens, policies, bootstrap_index))?,
    )?;
    Ok(copied)
}
