//! One watch per replica on the whole prefix: everything any replica
//! writes reaches this one's catalog, commands, tokens and audit entries,
//! in etcd's order. Started from a full read at one revision and resumed
//! from the last revision seen; when etcd has compacted that history the
//! replica reads everything again (and what vanished meanwhile goes).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, KeyValue, WatchOptions};
use prost::Message as _;
use signpost_proto::NodeSnapshot;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Etcd;
use crate::acl::policy::PolicyRecord;
use crate::acl::{Acl, TokenRecord};
use crate::catalog::Catalog;
use crate::commands::Commands;
use crate::store::StoreError;

/// What follows the store.
#[derive(Clone)]
pub struct Followers {
    pub catalog: Arc<Catalog>,
    pub commands: Arc<Commands>,
    pub acl: Arc<Acl>,
    /// Woken when the leader key goes: an election is due.
    pub leader_gone: Arc<Notify>,
    /// The KV store's mirror.
    pub kv: Arc<crate::kv::Mirror>,
}

/// Reads everything at one revision into the followers; the revision and
/// the cluster's id. What the followers had that the store no longer has
/// is removed.
pub async fn load(etcd: &Etcd, followers: &Followers) -> Result<(i64, u64), StoreError> {
    let (kvs, revision, cluster) = etcd.load("").await?;
    // Drains come again with everything else.
    followers.catalog.reset_drains();
    // Audit entries come again with everything else.
    followers.acl.forget_audit();
    let (mut nodes, mut present, mut failed) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    let mut tokens = BTreeMap::new();
    let mut policies = BTreeMap::new();
    let mut commands = BTreeSet::new();
    let mut kv_records = Vec::new();
    // Oldest change first: each service's index is the revision of the
    // last record that changed it.
    let mut kvs: Vec<&KeyValue> = kvs.iter().collect();
    kvs.sort_by_key(|kv| kv.mod_revision());
    for kv in kvs {
        let Some(key) = etcd.relative(kv.key()) else {
            continue;
        };
        if key.starts_with(super::kv::PREFIX) {
            kv_records.extend(super::kv::change(key, kv, false));
            continue;
        }
        if super::drains::apply(&followers.catalog, key, kv, false) {
            continue;
        }
        if let Some(node) = key.strip_prefix("nodes/") {
            nodes.insert(node.to_string());
        } else if let Some(node) = key.strip_prefix("presence/") {
            present.insert(node.to_string());
        } else if let Some(node) = key.strip_prefix("failed/") {
            failed.insert(node.to_string());
        } else if let Some(accessor) = key.strip_prefix("acl/") {
            if let Some(record) = json::<TokenRecord>(key, kv.value()) {
                tokens.insert(accessor.to_string(), record);
            }
            continue;
        } else if let Some(id) = key.strip_prefix("acl-policy/") {
            if let Some(record) = json::<PolicyRecord>(key, kv.value()) {
                policies.insert(id.to_string(), record);
            }
            continue;
        } else if let Some(id) = key.strip_prefix("commands/") {
            commands.insert(id.to_string());
        }
        apply(followers, key, Some(kv.value()), revision_of(kv));
    }
    followers.acl.store_tokens(tokens);
    followers.acl.store_policies(policies);
    let at = u64::try_from(revision).unwrap_or(0);
    followers.kv.reset(kv_records, at);
    let (had_nodes, had_present, had_failed) = followers.catalog.shared_keys();
    for node in had_nodes.difference(&nodes) {
        followers.catalog.store_node(node, None, at);
    }
    for node in had_present.difference(&present) {
        followers.catalog.store_presence(node, false, at);
    }
    for node in had_failed.difference(&failed) {
        followers.catalog.store_failed(node, None, at);
    }
    for command in followers.commands.list() {
        if !commands.contains(&command.id) {
            followers.commands.store_command(&command.id, None);
        }
    }
    Ok((revision, cluster))
}

/// Follows the store from `revision` until `shutdown`; never gives up:
/// while etcd is out of reach it tries again, the replica serving what it
/// has.
pub async fn follow(
    etcd: Arc<Etcd>,
    followers: Followers,
    mut revision: i64,
    shutdown: CancellationToken,
) {
    let mut retry = Duration::from_millis(100);
    loop {
        let ended = tokio::select! {
            _ = shutdown.cancelled() => return,
            ended = watch(&etcd, &followers, &mut revision) => ended,
        };
        match ended {
            Ended::Compacted => {
                tracing::warn!(
                    revision,
                    "etcd compacted the history this replica follows from: reading everything again"
                );
                match load(&etcd, &followers).await {
                    Ok((at, _)) => revision = at,
                    Err(e) => tracing::warn!(error = %e, "cannot read the store yet"),
                }
            }
            Ended::Failed(e) => {
                tracing::warn!(error = %e, again_in = ?retry, "the watch on etcd broke: following again");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(Duration::from_secs(5));
                continue;
            }
        }
        retry = Duration::from_millis(100);
    }
}

enum Ended {
    Compacted,
    Failed(String),
}

/// One watch from `revision` + 1; `revision` follows the events applied.
async fn watch(etcd: &Etcd, followers: &Followers, revision: &mut i64) -> Ended {
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(*revision + 1);
    let mut client = etcd.client();
    let mut stream = match client.watch(etcd.key(""), Some(options)).await {
        Ok(stream) => stream,
        Err(e) => return Ended::Failed(e.to_string()),
    };
    loop {
        let answer = match stream.message().await {
            Ok(Some(answer)) => answer,
            Ok(None) => return Ended::Failed("etcd closed the watch".to_string()),
            Err(e) => return Ended::Failed(e.to_string()),
        };
        if answer.compact_revision() > 0 {
            return Ended::Compacted;
        }
        if answer.canceled() {
            return Ended::Failed(format!("watch canceled: {}", answer.cancel_reason()));
        }
        for event in answer.events() {
            let Some(kv) = event.kv() else { continue };
            let Some(key) = etcd.relative(kv.key()) else {
                continue;
            };
            let deleted = event.event_type() == EventType::Delete;
            if key.starts_with(super::kv::PREFIX) {
                if let Some(change) = super::kv::change(key, kv, deleted) {
                    followers.kv.apply(vec![change], revision_of(kv));
                }
            } else if !super::drains::apply(&followers.catalog, key, kv, deleted) {
                apply(
                    followers,
                    key,
                    (!deleted).then(|| kv.value()),
                    revision_of(kv),
                );
            }
            *revision = (*revision).max(kv.mod_revision());
        }
        // Every revision seen is applied, KV or not: a consistent read
        // waits for the store's latest.
        let seen = answer
            .header()
            .map(|h| h.revision())
            .unwrap_or(0)
            .max(*revision);
        followers
            .kv
            .apply(Vec::new(), u64::try_from(seen).unwrap_or(0));
    }
}

fn revision_of(kv: &KeyValue) -> u64 {
    u64::try_from(kv.mod_revision()).unwrap_or(0)
}

fn json<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Option<T> {
    serde_json::from_slice(value)
        .inspect_err(|e| tracing::error!(key, error = %e, "unreadable record in etcd: ignored"))
        .ok()
}

/// Applies one key's new value (`None`: deleted) at `revision`.
fn apply(followers: &Followers, key: &str, value: Option<&[u8]>, revision: u64) {
    let catalog = &followers.catalog;
    if let Some(node) = key.strip_prefix("nodes/") {
        let record = match value.map(NodeSnapshot::decode) {
            Some(Ok(mut record)) => {
                record
                    .instances
                    .iter_mut()
                    .for_each(signpost_proto::Instance::normalize);
                record
                    .node_checks
                    .iter_mut()
                    .for_each(signpost_proto::Check::normalize);
                Some(record)
            }
            Some(Err(e)) => {
                tracing::error!(key, error = %e, "unreadable node record in etcd: ignored");
                return;
            }
            None => None,
        };
        catalog.store_node(node, record, revision);
    } else if let Some(node) = key.strip_prefix("presence/") {
        // The replica holding the stream, then the session's id there.
        let holder = value
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(|v| v.split_once('/').map_or(v, |(replica, _)| replica));
        catalog.store_holder(node, holder);
        catalog.store_presence(node, value.is_some(), revision);
    } else if let Some(node) = key.strip_prefix("failed/") {
        let at = value.map(|v| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1)
        });
        catalog.store_failed(node, at, revision);
    } else if let Some(id) = key.strip_prefix("commands/") {
        let command = match value {
            Some(v) => match json(key, v) {
                Some(c) => Some(c),
                None => return,
            },
            None => None,
        };
        followers.commands.store_command(id, command);
    } else if let Some(rest) = key.strip_prefix("acks/") {
        if let (Some((id, node)), Some(_)) = (rest.split_once('/'), value) {
            followers.commands.store_ack(id, node);
        }
    } else if let Some(accessor) = key.strip_prefix("acl/") {
        let record = match value {
            Some(v) => match json(key, v) {
                Some(r) => Some(r),
                None => return,
            },
            None => None,
        };
        followers.acl.store_token(accessor, record);
    } else if let Some(id) = key.strip_prefix("acl-policy/") {
        let record = match value {
            Some(v) => match json(key, v) {
                Some(r) => Some(r),
                None => return,
            },
            None => None,
        };
        followers.acl.store_policy(id, record);
    } else if key == "acl-reset" {
        if let Some(index) = value.and_then(|v| std::str::from_utf8(v).ok()?.parse().ok()) {
            followers.acl.store_bootstrap_index(index);
        }
    } else if key.starts_with("audit/") {
        if let Some(entry) = value.and_then(|v| json(key, v)) {
            followers.acl.store_audit(entry);
        }
    } else if let Some(rest) = key.strip_prefix("probes/") {
        let Some(value) = value else { return };
        match rest.split_once('/') {
            // An agent on some replica answered the leader's probe.
            Some((id, peer)) => {
                if let Ok(id) = id.parse() {
                    let answer = crate::catalog::PeerAnswer {
                        peer: peer.to_string(),
                        reachable: value == b"1",
                        error: String::new(),
                    };
                    catalog.probe_result(id, answer);
                }
            }
            None => {
                let (Ok(id), Some(probe)) =
                    (rest.parse(), json::<super::leader::ProbeRecord>(key, value))
                else {
                    return;
                };
                catalog.relay_probe(id, &probe.node, &probe.address, &probe.peers);
            }
        }
    } else if key == "leader" && value.is_none() {
        followers.leader_gone.notify_one();
    }
}
