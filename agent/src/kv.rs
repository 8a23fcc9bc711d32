//! The agent's cache of KV reads: every key (or prefix, for `recurse`
//! and `keys` reads) a client reads through this agent is kept and
//! watched with one blocking query on the control plane (one copy per
//! token, as the control plane filters what each may read), so that default
//! and `?stale` reads and blocking reads are answered on the host, and a
//! change wakes this agent's watchers with one upstream request however
//! many clients wait. The cache is on disk (`data_dir/kv-cache.pb`,
//! 0600: it holds the tokens its watches read with), so a host restarted
//! while the control plane is down still serves its configuration, with
//! `X-Consul-KnownLeader: false`.
//!
//! Bounded: at most [`MAX_UNITS`] keys or prefixes and [`MAX_BYTES`] of
//! values, the least recently read dropped first; one not read for
//! [`UNUSED_TTL`] is dropped.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prost::Message as _;
use signpost_core::kv::KvPair;
use signpost_daemon::kv_answer::Freshness;
use signpost_proto::{KvCache as KvCacheFile, KvCached, KvEntry};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::api::ControlPlaneHttp;

/// Most keys and prefixes cached (each has one blocking query open on
/// the control plane).
pub(crate) const MAX_UNITS: usize = 128;
/// Most bytes of values cached.
pub(crate) const MAX_BYTES: usize = 64 * 1024 * 1024;
/// A key or prefix nobody read for this long is dropped.
pub(crate) const UNUSED_TTL: Duration = Duration::from_secs(72 * 3600);
/// A watch's blocking query waits this long on the control plane.
const WATCH_WAIT: Duration = Duration::from_secs(60);
/// After a failed watch, the next try comes after this, doubling...
const RETRY_MIN: Duration = Duration::from_millis(500);
/// ...up to this.
const RETRY_MAX: Duration = Duration::from_secs(15);
/// How long a write through this agent waits for the cache to show it.
const CATCH_UP: Duration = Duration::from_secs(2);

/// A cached key or prefix (`tree`), as read with a token: the control
/// plane filters what each token may read, so each has its own copy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct UnitKey {
    key: String,
    tree: bool,
    token: Option<String>,
}

impl UnitKey {
    fn new(key: &str, tree: bool, token: Option<&str>) -> UnitKey {
        UnitKey {
            key: key.to_string(),
            tree,
            token: token.map(str::to_string),
        }
    }
}

struct Unit {
    index: u64,
    entries: Vec<KvPair>,
    /// When the control plane last answered for it (Unix ms).
    contact_ms: u64,
    last_read: Instant,
    /// Whether the control plane left entries out for its token.
    filtered: bool,
    /// Whether its watch is up (the control plane answers).
    healthy: bool,
    bytes: usize,
    /// Its index, for the blocking reads waiting on it.
    changes: watch::Sender<u64>,
}

/// What a read sees of a unit.
pub(crate) struct Snapshot {
    pub(crate) index: u64,
    pub(crate) entries: Vec<KvPair>,
    pub(crate) fresh: Freshness,
    pub(crate) healthy: bool,
    pub(crate) filtered: bool,
}

/// Why the control plane did not give a unit.
pub(crate) enum Fetch {
    /// It answered something else than the entries (refused, bad
    /// request): passed to the client as it is.
    Answered(u16, String),
    /// It could not be reached.
    Unreachable(String),
}

pub(crate) struct KvCache {
    units: Mutex<HashMap<UnitKey, Unit>>,
    /// One read of the control plane at a time per key: clients that
    /// miss together wait for the first one's answer.
    filling: Mutex<HashMap<UnitKey, Arc<tokio::sync::Mutex<()>>>>,
    path: PathBuf,
    dirty: Notify,
    http: Arc<ControlPlaneHttp>,
    /// The control plane's HTTP API (`control_plane.http`).
    base: String,
    shutdown: CancellationToken,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn size(entries: &[KvPair]) -> usize {
    entries
        .iter()
        .map(|e| e.key.len() + e.value.as_ref().map_or(0, Vec::len))
        .sum()
}

/// `key` for a URL path: every byte but unreserved ones and `/` escaped.
fn escape(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl KvCache {
    /// The cache kept in `data_dir`, its watches started again.
    pub(crate) fn open(
        data_dir: &std::path::Path,
        http: Arc<ControlPlaneHttp>,
        base: String,
        shutdown: CancellationToken,
    ) -> Arc<KvCache> {
        let path = data_dir.join("kv-cache.pb");
        let mut units = HashMap::new();
        match std::fs::read(&path) {
            Ok(bytes) => match KvCacheFile::decode(bytes.as_slice()) {
                Ok(file) => {
                    for u in file.units {
                        let entries: Vec<KvPair> = u
                            .entries
                            .into_iter()
                            .map(|e| KvPair {
                                lock_index: e.lock_index,
                                key: e.key,
                                flags: e.flags,
                                value: Some(e.value),
                                session: Some(e.session).filter(|s| !s.is_empty()),
                                create_index: e.create_index,
                                modify_index: e.modify_index,
                            })
                            .collect();
                        let token = Some(u.token).filter(|t| !t.is_empty());
                        units.insert(
                            UnitKey {
                                key: u.key,
                                tree: u.recurse,
                                token,
                            },
                            Unit {
                                index: u.index,
                                bytes: size(&entries),
                                entries,
                                contact_ms: u.contact_unix_ms,
                                last_read: Instant::now(),
                                filtered: u.filtered,
                                healthy: false,
                                changes: watch::Sender::new(u.index),
                            },
                        );
                    }
                    tracing::info!(path = %path.display(), cached = units.len(), "KV cache loaded");
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "the KV cache does not decode: starting without it");
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the KV cache: starting without it");
            }
        }
        let keys: Vec<UnitKey> = units.keys().cloned().collect();
        let cache = Arc::new(KvCache {
            units: Mutex::new(units),
            filling: Mutex::new(HashMap::new()),
            path,
            dirty: Notify::new(),
            http,
            base,
            shutdown,
        });
        for key in keys {
            tokio::spawn(cache.clone().watch(key));
        }
        tokio::spawn(cache.clone().keep());
        cache
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<UnitKey, Unit>> {
        self.units
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached `key` (a prefix when `tree`), marked as read.
    pub(crate) fn lookup(&self, key: &str, tree: bool, token: Option<&str>) -> Option<Snapshot> {
        let mut units = self.lock();
        let unit = units.get_mut(&UnitKey::new(key, tree, token))?;
        unit.last_read = Instant::now();
        Some(Snapshot {
            index: unit.index,
            entries: unit.entries.clone(),
            healthy: unit.healthy,
            filtered: unit.filtered,
            fresh: if unit.healthy {
                Freshness::LEADER
            } else {
                Freshness {
                    known_leader: false,
                    last_contact_ms: now_ms().saturating_sub(unit.contact_ms),
                }
            },
        })
    }

    /// Reads `key` from the control plane with `token`, caches it and
    /// starts watching it.
    pub(crate) async fn fill(
        self: &Arc<Self>,
        key: &str,
        tree: bool,
        token: Option<&str>,
    ) -> Result<Snapshot, Fetch> {
        let unit_key = UnitKey::new(key, tree, token);
        let gate = self
            .filling
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(unit_key.clone())
            .or_default()
            .clone();
        let filled = {
            let _one = gate.lock().await;
            // Filled while this one waited: that answer is as fresh.
            match self.lookup(key, tree, token).filter(|s| s.healthy) {
                Some(snapshot) => Ok(snapshot),
                None => self.fill_now(unit_key.clone()).await,
            }
        };
        let mut filling = self
            .filling
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if filling
            .get(&unit_key)
            .is_some_and(|g| Arc::strong_count(g) == 2)
        {
            filling.remove(&unit_key);
        }
        filled
    }

    async fn fill_now(self: &Arc<Self>, unit_key: UnitKey) -> Result<Snapshot, Fetch> {
        let (key, tree, token) = (
            unit_key.key.as_str(),
            unit_key.tree,
            unit_key.token.as_deref(),
        );
        let (index, entries, filtered) = self.fetch(key, tree, token, None).await?;
        let started = {
            let mut units = self.lock();
            let new = !units.contains_key(&unit_key);
            let bytes = size(&entries);
            let unit = units.entry(unit_key.clone()).or_insert_with(|| Unit {
                index,
                entries: Vec::new(),
                contact_ms: 0,
                last_read: Instant::now(),
                filtered,
                healthy: true,
                bytes: 0,
                changes: watch::Sender::new(index),
            });
            unit.index = index;
            unit.entries = entries.clone();
            unit.bytes = bytes;
            unit.contact_ms = now_ms();
            unit.filtered = filtered;
            unit.healthy = true;
            unit.last_read = Instant::now();
            unit.changes.send_replace(index);
            evict(&mut units, &unit_key);
            new && units.contains_key(&unit_key)
        };
        if started {
            tokio::spawn(self.clone().watch(unit_key));
        }
        self.dirty.notify_one();
        Ok(Snapshot {
            index,
            entries,
            fresh: Freshness::LEADER,
            healthy: true,
            filtered,
        })
    }

    /// One read of the control plane: the index, the entries (none for a
    /// 404) and whether some were left out for the token.
    async fn fetch(
        &self,
        key: &str,
        tree: bool,
        token: Option<&str>,
        after: Option<u64>,
    ) -> Result<(u64, Vec<KvPair>, bool), Fetch> {
        let http = self
            .http
            .get()
            .map_err(|e| Fetch::Unreachable(format!("{e:#}")))?;
        let mut url = format!("{}/v1/kv/{}", self.base, escape(key));
        let mut params = Vec::new();
        if tree {
            params.push("recurse".to_string());
        }
        let mut timeout = Duration::from_secs(30);
        if let Some(after) = after {
            params.push(format!("index={after}&wait={}s", WATCH_WAIT.as_secs()));
            timeout += WATCH_WAIT + WATCH_WAIT / 16;
        }
        if !params.is_empty() {
            url = format!("{url}?{}", params.join("&"));
        }
        let mut request = http.get(url).timeout(timeout);
        if let Some(token) = token {
            request = request.header("X-Consul-Token", token);
        }
        let response = request.send().await.map_err(|e| {
            Fetch::Unreachable(format!(
                "cannot reach the control plane at {}: {e}",
                self.base
            ))
        })?;
        let status = response.status().as_u16();
        let index = response
            .headers()
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let filtered = response
            .headers()
            .contains_key("x-consul-results-filtered-by-acls");
        let body = response.bytes().await.map_err(|e| {
            Fetch::Unreachable(format!("the control plane broke off its answer: {e}"))
        })?;
        match (status, index) {
            (404, Some(index)) => Ok((index, Vec::new(), filtered)),
            (200, Some(index)) => serde_json::from_slice(&body)
                .map(|entries| (index, entries, filtered))
                .map_err(|e| {
                    Fetch::Unreachable(format!("the control plane's answer does not decode: {e}"))
                }),
            _ if status >= 500 => Err(Fetch::Unreachable(format!(
                "the control plane answered {status}: {}",
                String::from_utf8_lossy(&body)
            ))),
            _ => Err(Fetch::Answered(
                status,
                String::from_utf8_lossy(&body).into_owned(),
            )),
        }
    }

    /// Keeps one unit up to date with blocking queries until it is
    /// dropped, refused, or unused for [`UNUSED_TTL`].
    async fn watch(self: Arc<Self>, key: UnitKey) {
        let mut retry = RETRY_MIN;
        loop {
            let index = {
                let mut units = self.lock();
                let Some(unit) = units.get(&key) else { return };
                if unit.last_read.elapsed() > UNUSED_TTL {
                    units.remove(&key);
                    self.dirty.notify_one();
                    tracing::debug!(key = key.key, "KV cache: unused, dropped");
                    return;
                }
                unit.index
            };
            let fetched = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                f = self.fetch(&key.key, key.tree, key.token.as_deref(), Some(index)) => f,
            };
            match fetched {
                Ok((new_index, entries, filtered)) => {
                    retry = RETRY_MIN;
                    let mut units = self.lock();
                    let Some(unit) = units.get_mut(&key) else {
                        return;
                    };
                    let was_down = !unit.healthy;
                    unit.healthy = true;
                    unit.contact_ms = now_ms();
                    unit.filtered = filtered;
                    if new_index != unit.index || entries != unit.entries {
                        unit.index = new_index;
                        unit.bytes = size(&entries);
                        unit.entries = entries;
                        unit.changes.send_replace(new_index);
                        evict(&mut units, &key);
                        self.dirty.notify_one();
                    } else if was_down {
                        self.dirty.notify_one();
                    }
                }
                Err(Fetch::Answered(status, body)) => {
                    tracing::info!(
                        key = key.key,
                        status,
                        answer = body,
                        "KV cache: the control plane refused the watch, dropped"
                    );
                    self.lock().remove(&key);
                    self.dirty.notify_one();
                    return;
                }
                Err(Fetch::Unreachable(why)) => {
                    if let Some(unit) = self.lock().get_mut(&key)
                        && unit.healthy
                    {
                        unit.healthy = false;
                        tracing::warn!(
                            key = key.key,
                            error = why,
                            "KV cache: the control plane does not answer; serving the cached value"
                        );
                    }
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// Waits until the cached `key` (or prefix) passes `after`, at most
    /// `timeout`.
    pub(crate) async fn wait(
        &self,
        key: &str,
        tree: bool,
        token: Option<&str>,
        after: u64,
        timeout: Duration,
    ) {
        let Some(mut rx) = self
            .lock()
            .get(&UnitKey::new(key, tree, token))
            .map(|u| u.changes.subscribe())
        else {
            return;
        };
        tokio::select! {
            _ = self.shutdown.cancelled() => {}
            _ = tokio::time::timeout(timeout, rx.wait_for(|i| *i > after)) => {}
        }
    }

    /// The cached keys that session `id` holds.
    pub(crate) fn held_by(&self, id: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .lock()
            .values()
            .flat_map(|u| u.entries.iter())
            .filter(|e| e.session.as_deref() == Some(id))
            .map(|e| e.key.clone())
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// After a write of `key` at `index` through this agent, waits (a
    /// little) until every cached unit that holds `key` shows it, so the
    /// writer reads its own write here.
    pub(crate) async fn caught_up(&self, key: &str, index: u64) {
        let waiting: Vec<watch::Receiver<u64>> = self
            .lock()
            .iter()
            .filter(|(k, u)| {
                u.healthy
                    && if k.tree {
                        key.starts_with(k.key.as_str())
                    } else {
                        k.key == key
                    }
            })
            .map(|(_, u)| u.changes.subscribe())
            .collect();
        let all = futures_util::future::join_all(
            waiting
                .into_iter()
                .map(|mut rx| async move { rx.wait_for(|i| *i >= index).await.map(|_| ()) }),
        );
        let _ = tokio::time::timeout(CATCH_UP, all).await;
    }

    /// Writes the cache to disk after changes (at most once a second),
    /// and once more at shutdown.
    async fn keep(self: Arc<Self>) {
        loop {
            let stop = tokio::select! {
                _ = self.shutdown.cancelled() => true,
                _ = self.dirty.notified() => false,
            };
            if !stop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            let bytes = self.encode();
            let path = self.path.clone();
            let written = tokio::task::spawn_blocking(move || {
                signpost_daemon::fs::write_atomic(&path, &bytes)?;
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            })
            .await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot write the KV cache")
                }
                Err(e) => tracing::warn!(error = %e, "the KV cache writer failed"),
            }
            if stop || self.shutdown.is_cancelled() {
                return;
            }
        }
    }

    fn encode(&self) -> Vec<u8> {
        let units = self.lock();
        KvCacheFile {
            units: units
                .iter()
                .map(|(k, u)| KvCached {
                    key: k.key.clone(),
                    recurse: k.tree,
                    index: u.index,
                    contact_unix_ms: u.contact_ms,
                    token: k.token.clone().unwrap_or_default(),
                    filtered: u.filtered,
                    entries: u
                        .entries
                        .iter()
                        .map(|e| KvEntry {
                            key: e.key.clone(),
                            value: e.value.clone().unwrap_or_default(),
                            flags: e.flags,
                            lock_index: e.lock_index,
                            session: e.session.clone().unwrap_or_default(),
                            create_index: e.create_index,
                            modify_index: e.modify_index,
                        })
                        .collect(),
                })
                .collect(),
        }
        .encode_to_vec()
    }
}

/// Drops the least recently read units (never `keep`) while over the
/// bounds; a `keep` that alone is over them goes too.
fn evict(units: &mut HashMap<UnitKey, Unit>, keep: &UnitKey) {
    loop {
        let bytes: usize = units.values().map(|u| u.bytes).sum();
        if units.len() <= MAX_UNITS && bytes <= MAX_BYTES {
            return;
        }
        let oldest = units
            .iter()
            .filter(|(k, _)| *k != keep)
            .min_by_key(|(_, u)| u.last_read)
            .map(|(k, _)| k.clone());
        match oldest {
            Some(k) => {
                units.remove(&k);
            }
            None => {
                units.remove(keep);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_escaped_for_paths() {
        assert_eq!(escape("a/b c?d#%"), "a/b%20c%3Fd%23%25");
        assert_eq!(escape("ü"), "%C3%BC");
    }
}
