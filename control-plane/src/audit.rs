//! The audit log: `data_dir/audit.jsonl`, one JSON object per line,
//! appended and synced, the newest entries also in memory for
//! `GET /v1/audit`.
//!
//! It is bounded three ways (`audit:` in the configuration): the live file
//! is rotated to `audit.jsonl.1` (the older ones shifting to `.2`, ...)
//! once it reaches `max_size` or its first entry is `max_age` old; at most
//! `max_files` rotated files are kept, and none last written more than
//! `max_age` ago. Refusals of requests without a valid token cost nothing
//! to send, so they are not written one by one: the first of a period is,
//! and the others of that period are counted and written as one entry
//! when it ends ([`AuditLog::tick`]).

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use signpost_core::command::now_millis;
use signpost_core::control_plane_config::AuditConfig;

/// Entries kept in memory for queries.
const IN_MEMORY: usize = 10_000;

/// Refusals without a valid token are written one per this period, the
/// others counted.
pub const DENIED_PERIOD: Duration = Duration::from_secs(10);

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

pub struct AuditLog {
    path: PathBuf,
    config: AuditConfig,
    inner: Mutex<Inner>,
    /// Set when replicas share a store: every entry also goes there
    /// (`audit/<time>-<replica>-<n>`, the newest [`IN_MEMORY`] kept by the
    /// leader), and the entries in memory are the fleet's, as the store
    /// has them ([`AuditLog::remember`]). The file stays this replica's.
    shared: OnceLock<(Arc<dyn crate::store::Shared>, String)>,
    written: AtomicU64,
    /// Requests this replica refused for their token (or its absence).
    denials: prometheus_client::metrics::counter::Counter,
}

struct Inner {
    entries: VecDeque<AuditEntry>,
    /// Bytes in the live file.
    size: u64,
    /// When the live file's first entry was written (Unix ms).
    started: Option<u64>,
    /// Refusals without a valid token since the last one written.
    denied: u64,
    /// When the last such refusal was written (Unix ms).
    denied_written: Option<u64>,
}

impl AuditLog {
    /// Opens `data_dir/audit.jsonl`, reading its newest entries (the file
    /// is at most `max_size`, so reading it is bounded).
    pub fn open(data_dir: &Path, config: AuditConfig) -> std::io::Result<AuditLog> {
        let path = data_dir.join("audit.jsonl");
        let (entries, size, started) = match std::fs::read(&path) {
            Ok(bytes) => {
                let mut entries: VecDeque<AuditEntry> = bytes
                    .split(|&b| b == b'\n')
                    .filter_map(|l| serde_json::from_slice(l).ok())
                    .collect();
                let started = entries.front().map(|e| e.time);
                let excess = entries.len().saturating_sub(IN_MEMORY);
                entries.drain(..excess);
                (entries, bytes.len() as u64, started)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (VecDeque::new(), 0, None),
            Err(e) => return Err(e),
        };
        let log = AuditLog {
            path,
            config,
            inner: Mutex::new(Inner {
                entries,
                size,
                started,
                denied: 0,
                denied_written: None,
            }),
            shared: OnceLock::new(),
            written: AtomicU64::new(0),
            denials: Default::default(),
        };
        log.expire_rotated();
        Ok(log)
    }

    /// Entries also go to the shared store from now on.
    pub fn share(&self, shared: Arc<dyn crate::store::Shared>) {
        let replica = format!("{:08x}", rand::random::<u32>());
        self.shared.get_or_init(|| (shared, replica));
        self.forget();
    }

    /// Forgets the entries in memory.
    pub fn forget(&self) {
        self.lock().entries.clear();
    }

    /// An entry from the shared store.
    pub fn remember(&self, entry: AuditEntry) {
        let mut inner = self.lock();
        inner.entries.push_back(entry);
        let excess = inner.entries.len().saturating_sub(IN_MEMORY);
        inner.entries.drain(..excess);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends `entry` (file and memory). A write error is logged:
    /// refusing the request would not undo what it did.
    pub fn record(&self, entry: AuditEntry) {
        if entry.outcome.starts_with("denied") {
            self.denials.inc();
        }
        let mut inner = self.lock();
        self.append(&mut inner, entry);
    }

    /// The count of requests refused for their token, for the metrics.
    pub fn denials(&self) -> prometheus_client::metrics::counter::Counter {
        self.denials.clone()
    }

    /// A request refused for want of a valid token: written if it is the
    /// first of its period, else counted for [`AuditLog::tick`].
    pub fn denied_anonymous(&self, entry: AuditEntry) {
        self.denials.inc();
        let mut inner = self.lock();
        let now = entry.time;
        let quiet = inner
            .denied_written
            .is_none_or(|at| now.saturating_sub(at) >= DENIED_PERIOD.as_millis() as u64);
        if quiet && inner.denied == 0 {
            inner.denied_written = Some(now);
            self.append(&mut inner, entry);
        } else {
            inner.denied += 1;
        }
    }

    /// Called every few seconds: writes the refusals counted in a period
    /// that has ended, and rotates a live file that has grown too old.
    pub fn tick(&self) {
        let mut inner = self.lock();
        let now = now_millis();
        let period_over = inner
            .denied_written
            .is_none_or(|at| now.saturating_sub(at) >= DENIED_PERIOD.as_millis() as u64);
        if inner.denied > 0 && period_over {
            let count = std::mem::take(&mut inner.denied);
            inner.denied_written = Some(now);
            let entry = AuditEntry::new(
                "",
                "auth.denied",
                "",
                "denied: no or unknown token",
                &format!("{count} more requests without a valid token were refused"),
            );
            self.append(&mut inner, entry);
        }
        if inner
            .started
            .is_some_and(|at| now.saturating_sub(at) >= self.config.max_age.as_millis() as u64)
        {
            self.rotate(&mut inner);
        }
    }

    /// The newest `limit` entries at or after `since` (Unix ms), oldest
    /// first.
    pub fn query(&self, since: u64, limit: usize) -> Vec<AuditEntry> {
        let inner = self.lock();
        let matching: Vec<&AuditEntry> = inner.entries.iter().filter(|e| e.time >= since).collect();
        let skip = matching.len().saturating_sub(limit);
        matching.into_iter().skip(skip).cloned().collect()
    }

    fn append(&self, inner: &mut Inner, entry: AuditEntry) {
        let mut line = match serde_json::to_string(&entry) {
            Ok(line) => line,
            Err(error) => {
                tracing::error!(%error, "cannot encode an audit entry");
                return;
            }
        };
        line.push('\n');
        if inner.size > 0 && inner.size + line.len() as u64 > self.config.max_size {
            self.rotate(inner);
        }
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode_0600()
            .open(&self.path)
            .and_then(|mut f| {
                f.write_all(line.as_bytes())?;
                f.sync_data()
            });
        match appended {
            Ok(()) => {
                inner.size += line.len() as u64;
                inner.started.get_or_insert(entry.time);
            }
            Err(error) => {
                tracing::error!(path = %self.path.display(), %error, "cannot append to the audit log");
            }
        }
        tracing::info!(target: "signpost::audit", who = %entry.who, action = %entry.action, target = %entry.target, outcome = %entry.outcome, reason = %entry.reason);
        if let Some((shared, replica)) = self.shared.get() {
            let n = self.written.fetch_add(1, Ordering::Relaxed);
            let key = format!("audit/{:016}-{replica}-{n:08}", entry.time);
            let (shared, bytes) = (
                shared.clone(),
                serde_json::to_vec(&entry).unwrap_or_default(),
            );
            tokio::spawn(async move {
                if let Err(error) = shared.put(key, bytes).await {
                    tracing::error!(%error, "cannot share an audit entry: it is in this replica's file only");
                }
            });
            return;
        }
        inner.entries.push_back(entry);
        let excess = inner.entries.len().saturating_sub(IN_MEMORY);
        inner.entries.drain(..excess);
    }

    /// `audit.jsonl.N` (N from 1).
    fn rotated(&self, n: u32) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    /// Moves the live file to `.1` (shifting the others up, dropping the
    /// one beyond `max_files`) and starts a new one.
    fn rotate(&self, inner: &mut Inner) {
        let keep = self.config.max_files;
        let shifted = (1..=keep).rev().try_for_each(|n| {
            let from = if n == 1 {
                self.path.clone()
            } else {
                self.rotated(n - 1)
            };
            match std::fs::rename(&from, self.rotated(n)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        });
        let done = shifted.and_then(|()| match keep {
            // Nothing is kept: the live file goes.
            0 => std::fs::remove_file(&self.path),
            _ => Ok(()),
        });
        if let Err(error) = done {
            tracing::error!(path = %self.path.display(), %error, "cannot rotate the audit log; it keeps growing");
            return;
        }
        inner.size = 0;
        inner.started = None;
        tracing::info!(path = %self.path.display(), "audit log rotated");
        self.expire_rotated();
    }

    /// Deletes rotated files beyond `max_files` or last written more than
    /// `max_age` ago.
    fn expire_rotated(&self) {
        let now = SystemTime::now();
        // Beyond max_files: left over from a larger setting.
        for n in 1..=self.config.max_files.saturating_add(100) {
            let path = self.rotated(n);
            let Ok(meta) = std::fs::metadata(&path) else {
                if n > self.config.max_files {
                    break;
                }
                continue;
            };
            let old = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age >= self.config.max_age);
            if (n > self.config.max_files || old)
                && let Err(error) = std::fs::remove_file(&path)
            {
                tracing::warn!(path = %path.display(), %error, "cannot delete an old audit log");
            }
        }
    }
}

/// `OpenOptions::mode(0o600)`, named.
pub(crate) trait Private {
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

    fn config(max_size: u64, max_files: u32) -> AuditConfig {
        AuditConfig {
            max_size,
            max_files,
            max_age: Duration::from_secs(3600),
        }
    }

    fn entry(n: usize) -> AuditEntry {
        AuditEntry::new("someone", "token.create", &format!("t{n}"), "ok", "")
    }

    #[test]
    fn the_live_file_is_rotated_at_its_size_and_old_ones_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), config(1000, 2)).unwrap();
        for n in 0..100 {
            log.record(entry(n));
        }
        let size = |name: &str| std::fs::metadata(dir.path().join(name)).map(|m| m.len());
        assert!(size("audit.jsonl").unwrap() <= 1000);
        assert!(size("audit.jsonl.1").unwrap() <= 1000);
        assert!(size("audit.jsonl.2").unwrap() <= 1000);
        assert!(size("audit.jsonl.3").is_err(), "only two rotated files");
        // Memory still answers for all of them.
        assert_eq!(log.query(0, 1000).len(), 100);
        // After a restart, the live file's entries are back.
        let again = AuditLog::open(dir.path(), config(1000, 2)).unwrap();
        let last = again.query(0, 1).pop().unwrap();
        assert_eq!(last.target, "t99");
    }

    #[test]
    fn refusals_without_a_token_are_written_once_a_period_with_a_count() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), config(1 << 20, 1)).unwrap();
        let denied = || AuditEntry::new("", "commands.create", "", "denied: no token", "");
        for _ in 0..500 {
            log.denied_anonymous(denied());
        }
        assert_eq!(log.query(0, 1000).len(), 1, "the first is written at once");
        log.tick();
        assert_eq!(log.query(0, 1000).len(), 1, "the period is not over");
        log.lock().denied_written = Some(now_millis() - DENIED_PERIOD.as_millis() as u64);
        log.tick();
        let entries = log.query(0, 1000);
        assert_eq!(entries.len(), 2);
        assert!(
            entries[1].reason.starts_with("499 more"),
            "{:?}",
            entries[1]
        );
        let lines = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 2);
    }
}
