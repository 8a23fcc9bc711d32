//! A replica's copy of the store in memory, and the blocking queries
//! that wait on it: a waiter on a key or prefix is woken by a change of a
//! key under it, and by nothing else.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use prost::Message as _;
use signpost_core::event::UserEvent;
use signpost_core::kv::{Behavior, KvPair, ServiceDefaults};
use signpost_proto::{KvDelay, KvSession, KvValue};
use tokio::sync::{Notify, watch};

use super::plan::Plan;
use super::{Change, RecordKey};

/// Most deleted keys remembered for blocking queries' indexes; the
/// oldest are forgotten beyond (their index becomes the floor).
const MAX_TOMBSTONES: usize = 100_000;

/// A key's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: Vec<u8>,
    pub flags: u64,
    pub lock_index: u64,
    /// The session holding its lock ("" for none).
    pub session: String,
    pub create_index: u64,
    pub modify_index: u64,
}

impl Entry {
    pub fn pair(&self, key: &str, with_value: bool) -> KvPair {
        KvPair {
            lock_index: self.lock_index,
            key: key.to_string(),
            flags: self.flags,
            value: with_value.then(|| self.value.clone()),
            session: (!self.session.is_empty()).then(|| self.session.clone()),
            create_index: self.create_index,
            modify_index: self.modify_index,
        }
    }

    pub(super) fn record(&self) -> Vec<u8> {
        KvValue {
            value: self.value.clone(),
            flags: self.flags,
            lock_index: self.lock_index,
            session: self.session.clone(),
        }
        .encode_to_vec()
    }
}

/// A session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: String,
    pub name: String,
    pub node: String,
    pub node_health: bool,
    pub checks: Vec<String>,
    pub lock_delay: Duration,
    pub behavior: Behavior,
    pub ttl: Option<Duration>,
    pub renewed_ms: u64,
    pub create_index: u64,
}

impl Session {
    /// Consul's shape (`/v1/session/info/<id>` and lists).
    pub fn json(&self) -> serde_json::Value {
        let mut node_checks: Vec<&str> = Vec::new();
        if self.node_health {
            node_checks.push(signpost_core::kv::NODE_HEALTH_CHECK);
        }
        let all: Vec<&str> = node_checks
            .iter()
            .copied()
            .chain(self.checks.iter().map(String::as_str))
            .collect();
        serde_json::json!({
            "ID": self.id,
            "Name": self.name,
            "Node": self.node,
            "LockDelay": u64::try_from(self.lock_delay.as_nanos()).unwrap_or(u64::MAX),
            "Behavior": self.behavior.as_str(),
            "TTL": self.ttl.map(signpost_core::duration::format).unwrap_or_default(),
            "Checks": all,
            "NodeChecks": node_checks,
            "ServiceChecks": self.checks.iter().map(|c| serde_json::json!({"ID": c, "Namespace": ""})).collect::<Vec<_>>(),
            "Namespace": "default",
            "CreateIndex": self.create_index,
            "ModifyIndex": self.create_index,
        })
    }

    pub(super) fn record(&self) -> Vec<u8> {
        KvSession {
            name: self.name.clone(),
            node: self.node.clone(),
            node_health: self.node_health,
            checks: self.checks.clone(),
            lock_delay_ms: u64::try_from(self.lock_delay.as_millis()).unwrap_or(u64::MAX),
            behavior: self.behavior.as_str().to_string(),
            ttl_ms: self
                .ttl
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            renewed_unix_ms: self.renewed_ms,
        }
        .encode_to_vec()
    }

    fn from_record(id: &str, r: KvSession, create_index: u64) -> Session {
        Session {
            id: id.to_string(),
            name: r.name,
            node: r.node,
            node_health: r.node_health,
            checks: r.checks,
            lock_delay: Duration::from_millis(r.lock_delay_ms),
            behavior: super::behavior_of(&r.behavior),
            ttl: (r.ttl_ms > 0).then(|| Duration::from_millis(r.ttl_ms)),
            renewed_ms: r.renewed_unix_ms,
            create_index,
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Inner {
    pub(super) entries: BTreeMap<String, Entry>,
    pub(super) sessions: BTreeMap<String, Session>,
    /// Each session record's modify index (renewals change it).
    pub(super) session_versions: HashMap<String, u64>,
    /// Lock delays: key → until (Unix ms), with the record's modify index.
    pub(super) delays: HashMap<String, (u64, u64)>,
    /// The keys each session holds.
    pub(super) held: HashMap<String, BTreeSet<String>>,
    /// Deleted keys and when.
    tombstones: BTreeMap<String, u64>,
    /// What a read's index is at least: the store's index when the
    /// mirror was loaded, or the last tombstone forgotten.
    floor: u64,
    /// The sessions' index: the last create or end of one.
    session_index: u64,
    /// User events by ID, with the index they were stored at.
    pub(super) events: HashMap<String, (u64, UserEvent)>,
    /// `service-defaults` entries by service: create and modify index.
    pub(super) configs: BTreeMap<String, (u64, u64, ServiceDefaults)>,
    /// The mesh's records by name: create and modify index, bytes.
    pub(super) mesh: BTreeMap<String, (u64, u64, Vec<u8>)>,
}

impl Inner {
    /// Events' IDs and indexes, oldest first.
    pub(super) fn events_by_index(&self) -> impl Iterator<Item = (String, u64)> + '_ {
        let mut all: Vec<(u64, &String)> =
            self.events.iter().map(|(id, (i, _))| (*i, id)).collect();
        all.sort_unstable();
        all.into_iter().map(|(i, id)| (id.clone(), i))
    }
}

/// The mirror, its applied index and its waiters.
pub struct Mirror {
    inner: Mutex<Inner>,
    applied: watch::Sender<u64>,
    /// Waiters by the key or prefix they watch.
    waiters: Mutex<HashMap<String, Weak<Notify>>>,
    sessions_changed: watch::Sender<u64>,
    /// The last event's index.
    events_changed: watch::Sender<u64>,
    /// Bumped when a config entry changes.
    configs_changed: watch::Sender<u64>,
    /// Bumped when a mesh record changes.
    mesh_changed: watch::Sender<u64>,
}

impl Mirror {
    /// An empty mirror of a store at `index`.
    pub fn new(index: u64) -> Mirror {
        Mirror {
            inner: Mutex::new(Inner {
                floor: index,
                ..Inner::default()
            }),
            applied: watch::Sender::new(index),
            waiters: Mutex::new(HashMap::new()),
            sessions_changed: watch::Sender::new(0),
            events_changed: watch::Sender::new(0),
            configs_changed: watch::Sender::new(0),
            mesh_changed: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies records changed in the store, up to `index`, and wakes the
    /// waiters of every key changed. A record that does not decode is
    /// logged and skipped (it cannot have been written by a replica).
    pub fn apply(&self, changes: Vec<Change>, index: u64) {
        let mut touched = Vec::new();
        let mut sessions = false;
        let mut fired = 0;
        let mut configs = false;
        let mut mesh = false;
        {
            let mut inner = self.lock();
            for change in changes {
                let name = change.key.encode();
                match (change.key, change.stored) {
                    (RecordKey::Entry(key), Some(s)) => match KvValue::decode(s.bytes.as_slice()) {
                        Ok(v) => {
                            let holder = inner.entries.get(&key).map(|old| old.session.clone());
                            if let Some(holder) = holder.filter(|h| !h.is_empty())
                                && let Some(held) = inner.held.get_mut(&holder)
                            {
                                held.remove(&key);
                            }
                            if !v.session.is_empty() {
                                inner
                                    .held
                                    .entry(v.session.clone())
                                    .or_default()
                                    .insert(key.clone());
                            }
                            inner.tombstones.remove(&key);
                            inner.entries.insert(
                                key.clone(),
                                Entry {
                                    value: v.value,
                                    flags: v.flags,
                                    lock_index: v.lock_index,
                                    session: v.session,
                                    create_index: s.create_index,
                                    modify_index: s.modify_index,
                                },
                            );
                            touched.push(key);
                        }
                        Err(e) => {
                            tracing::error!(record = name, error = %e, "undecodable KV record skipped")
                        }
                    },
                    (RecordKey::Entry(key), None) => {
                        if let Some(old) = inner.entries.remove(&key) {
                            if let Some(held) = inner.held.get_mut(&old.session) {
                                held.remove(&key);
                            }
                            inner.tombstones.insert(key.clone(), index);
                            touched.push(key);
                        }
                    }
                    (RecordKey::Session(id), Some(s)) => {
                        match KvSession::decode(s.bytes.as_slice()) {
                            Ok(r) => {
                                inner.session_versions.insert(id.clone(), s.modify_index);
                                let session = Session::from_record(&id, r, s.create_index);
                                if !inner.sessions.contains_key(&id) {
                                    inner.session_index = inner.session_index.max(s.modify_index);
                                    sessions = true;
                                }
                                inner.sessions.insert(id, session);
                            }
                            Err(e) => {
                                tracing::error!(record = name, error = %e, "undecodable session record skipped")
                            }
                        }
                    }
                    (RecordKey::Session(id), None) => {
                        inner.session_versions.remove(&id);
                        if inner.sessions.remove(&id).is_some() {
                            inner.session_index = inner.session_index.max(index);
                            sessions = true;
                        }
                        inner.held.remove(&id);
                    }
                    (RecordKey::Delay(key), Some(s)) => match KvDelay::decode(s.bytes.as_slice()) {
                        Ok(d) => {
                            inner.delays.insert(key, (d.until_unix_ms, s.modify_index));
                        }
                        Err(e) => {
                            tracing::error!(record = name, error = %e, "undecodable lock delay skipped")
                        }
                    },
                    (RecordKey::Delay(key), None) => {
                        inner.delays.remove(&key);
                    }
                    (RecordKey::Event(id), Some(s)) => {
                        match serde_json::from_slice::<UserEvent>(&s.bytes) {
                            Ok(mut event) => {
                                event.ltime = s.create_index;
                                inner.events.insert(id, (s.create_index, event));
                                fired = fired.max(s.create_index);
                            }
                            Err(e) => {
                                tracing::error!(record = name, error = %e, "undecodable event skipped")
                            }
                        }
                    }
                    (RecordKey::Event(id), None) => {
                        inner.events.remove(&id);
                    }
                    (RecordKey::Config(service), Some(s)) => {
                        match serde_json::from_slice::<ServiceDefaults>(&s.bytes) {
                            Ok(entry) => {
                                inner
                                    .configs
                                    .insert(service, (s.create_index, s.modify_index, entry));
                                configs = true;
                            }
                            Err(e) => {
                                tracing::error!(record = name, error = %e, "undecodable config entry skipped")
                            }
                        }
                    }
                    (RecordKey::Config(service), None) => {
                        configs |= inner.configs.remove(&service).is_some();
                    }
                    (RecordKey::Mesh(name), Some(s)) => {
                        inner
                            .mesh
                            .insert(name, (s.create_index, s.modify_index, s.bytes));
                        mesh = true;
                    }
                    (RecordKey::Mesh(name), None) => {
                        mesh |= inner.mesh.remove(&name).is_some();
                    }
                }
            }
            if inner.tombstones.len() > MAX_TOMBSTONES {
                let mut by_age: Vec<(u64, String)> = inner
                    .tombstones
                    .iter()
                    .map(|(k, i)| (*i, k.clone()))
                    .collect();
                by_age.sort_unstable();
                for (i, key) in by_age.into_iter().take(MAX_TOMBSTONES / 2) {
                    inner.tombstones.remove(&key);
                    inner.floor = inner.floor.max(i);
                }
            }
        }
        self.wake(&touched);
        if sessions {
            self.sessions_changed.send_modify(|v| *v += 1);
        }
        if configs {
            self.configs_changed.send_modify(|v| *v += 1);
        }
        if mesh {
            self.mesh_changed.send_modify(|v| *v += 1);
        }
        if fired > 0 {
            self.events_changed.send_if_modified(|last| {
                let newer = fired > *last;
                *last = (*last).max(fired);
                newer
            });
        }
        self.applied.send_if_modified(|applied| {
            let moved = index > *applied;
            *applied = (*applied).max(index);
            moved
        });
    }

    /// Replaces everything with the records of a store read whole at
    /// `index` (a replica that fell behind etcd's history); every waiter
    /// looks again.
    pub fn reset(&self, records: Vec<Change>, index: u64) {
        {
            let mut inner = self.lock();
            let floor = inner.floor.max(index);
            *inner = Inner {
                floor,
                ..Inner::default()
            };
        }
        self.apply(records, index);
        let waiters = self
            .waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for notify in waiters.values().filter_map(Weak::upgrade) {
            notify.notify_waiters();
        }
        drop(waiters);
        self.sessions_changed.send_modify(|v| *v += 1);
        self.configs_changed.send_modify(|v| *v += 1);
        self.mesh_changed.send_modify(|v| *v += 1);
    }

    /// Wakes the waiters of every prefix of the keys changed.
    fn wake(&self, keys: &[String]) {
        if keys.is_empty() {
            return;
        }
        let waiters = self
            .waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if waiters.is_empty() {
            return;
        }
        for key in keys {
            for end in (0..=key.len()).filter(|&e| key.is_char_boundary(e)) {
                if let Some(notify) = waiters.get(&key[..end]).and_then(Weak::upgrade) {
                    notify.notify_waiters();
                }
            }
        }
    }

    /// The last index applied.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Waits (at most `timeout`) until `index` is applied.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) {
        let mut rx = self.applied.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|applied| *applied >= index)).await;
    }

    /// One plan for a batch of writes against the mirror as it is now,
    /// each write seeing the ones before it: what each answers and
    /// whether it wrote, and what the batch reads and writes.
    pub(super) fn plan_batch(&self, batch: &mut [(super::Job, super::Reply)]) -> super::Planned {
        let inner = self.lock();
        let mut plan = Plan::new(&inner);
        let answers = batch
            .iter_mut()
            .map(|(job, _)| {
                let before = plan.changes();
                let answer = job(&mut plan);
                (answer, plan.changes() != before)
            })
            .collect();
        let (expect, writes) = plan.finish();
        (answers, expect, writes)
    }

    /// The index of `key` (`recurse`: of everything under it): the last
    /// change to it, never below the floor nor 1.
    pub fn index_of(&self, key: &str, recurse: bool) -> u64 {
        let inner = self.lock();
        index_in(&inner, key, recurse)
    }

    /// `key`'s entry, with the index of the read.
    pub fn get(&self, key: &str) -> (u64, Option<Entry>) {
        let inner = self.lock();
        (
            index_in(&inner, key, false),
            inner.entries.get(key).cloned(),
        )
    }

    /// Every entry under `prefix`, in key order, with the read's index.
    pub fn list(&self, prefix: &str) -> (u64, Vec<(String, Entry)>) {
        let inner = self.lock();
        let found = under(&inner.entries, prefix)
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        (index_in(&inner, prefix, true), found)
    }

    /// Every key under `prefix`, with the read's index.
    pub fn keys(&self, prefix: &str) -> (u64, Vec<String>) {
        let inner = self.lock();
        let found = under(&inner.entries, prefix)
            .map(|(k, _)| k.clone())
            .collect();
        (index_in(&inner, prefix, true), found)
    }

    /// Waits until the index of `key` (or everything under it) passes
    /// `after`, at most `timeout`; the index then.
    pub async fn wait(&self, key: &str, recurse: bool, after: u64, timeout: Duration) -> u64 {
        let notify = self.waiter(key);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let index = self.index_of(key, recurse);
            if index > after {
                return index;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.index_of(key, recurse);
            }
        }
    }

    /// The notify woken by changes under `key`, shared by its waiters.
    fn waiter(&self, key: &str) -> Arc<Notify> {
        let mut waiters = self
            .waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = waiters.get(key).and_then(Weak::upgrade) {
            return n;
        }
        // Forget the prefixes nobody waits on any more.
        if waiters.len() > 1024 {
            waiters.retain(|_, w| w.strong_count() > 0);
        }
        let n = Arc::new(Notify::new());
        waiters.insert(key.to_string(), Arc::downgrade(&n));
        n
    }

    /// A session by ID.
    pub fn session(&self, id: &str) -> Option<Session> {
        self.lock().sessions.get(id).cloned()
    }

    /// Every session (of `node` if given), with the sessions' index.
    pub fn sessions(&self, node: Option<&str>) -> (u64, Vec<Session>) {
        let inner = self.lock();
        let found = inner
            .sessions
            .values()
            .filter(|s| node.is_none_or(|n| s.node == n))
            .cloned()
            .collect();
        (inner.session_index.max(inner.floor).max(1), found)
    }

    /// Waits until the sessions' index passes `after`, at most `timeout`.
    pub async fn wait_sessions(&self, after: u64, timeout: Duration) {
        let mut rx = self.sessions_changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.sessions(None).0 > after {
                return;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// The events named `name` (every event without one), oldest first,
    /// with the index of the last event.
    pub fn events(&self, name: Option<&str>) -> (u64, Vec<UserEvent>) {
        let inner = self.lock();
        let mut found: Vec<&(u64, UserEvent)> = inner
            .events
            .values()
            .filter(|(_, e)| name.is_none_or(|n| e.name == n))
            .collect();
        found.sort_by_key(|(i, _)| *i);
        let last = inner.events.values().map(|(i, _)| *i).max().unwrap_or(0);
        (
            last.max(1),
            found.into_iter().map(|(_, e)| e.clone()).collect(),
        )
    }

    /// Waits until an event newer than `after` is fired, at most `timeout`.
    pub async fn wait_events(&self, after: u64, timeout: Duration) {
        let mut rx = self.events_changed.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|last| *last > after)).await;
    }

    /// Every `service-defaults` entry: service → (create index, modify
    /// index, entry).
    pub fn configs(&self) -> BTreeMap<String, (u64, u64, ServiceDefaults)> {
        self.lock().configs.clone()
    }

    /// The mesh's records whose names start with `prefix`: name, create
    /// and modify index, bytes.
    pub fn mesh(&self, prefix: &str) -> Vec<(String, u64, u64, Vec<u8>)> {
        self.lock()
            .mesh
            .range(prefix.to_string()..)
            .take_while(|(name, _)| name.starts_with(prefix))
            .map(|(name, (c, m, b))| (name.clone(), *c, *m, b.clone()))
            .collect()
    }

    /// Changes of the mesh's records.
    pub fn mesh_changes(&self) -> watch::Receiver<u64> {
        self.mesh_changed.subscribe()
    }

    /// Changes of the config entries.
    pub fn config_changes(&self) -> watch::Receiver<u64> {
        self.configs_changed.subscribe()
    }

    /// Lock delays that have passed by `now_ms`.
    pub fn delays_passed(&self, now_ms: u64) -> usize {
        self.lock()
            .delays
            .values()
            .filter(|(until, _)| *until <= now_ms)
            .count()
    }
}

fn under<'a, V>(
    map: &'a BTreeMap<String, V>,
    prefix: &str,
) -> impl Iterator<Item = (&'a String, &'a V)> {
    map.range(prefix.to_string()..)
        .take_while(move |(k, _)| k.starts_with(prefix))
}

fn index_in(inner: &Inner, key: &str, recurse: bool) -> u64 {
    let changed = if recurse {
        let entries = under(&inner.entries, key)
            .map(|(_, e)| e.modify_index)
            .max();
        let deleted = under(&inner.tombstones, key).map(|(_, i)| *i).max();
        entries.max(deleted).unwrap_or(0)
    } else {
        inner
            .entries
            .get(key)
            .map(|e| e.modify_index)
            .or_else(|| inner.tombstones.get(key).copied())
            .unwrap_or(0)
    };
    changed.max(inner.floor).max(1)
}
