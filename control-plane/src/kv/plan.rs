//! Consul's semantics for every write, planned against the mirror: what
//! the write reads (each record's modify index, the expectations the
//! commit checks) and what it writes. Nothing here touches a store.

use std::collections::BTreeMap;
use std::time::Duration;

use prost::Message as _;
use serde::Serialize;
use signpost_core::event::UserEvent;
use signpost_core::kv::{Behavior, KvPair, SessionSpec, TxnOp, Verb};
use signpost_proto::KvDelay;

use super::mirror::{Entry, Inner, Session};
use super::{Expect, RecordKey, Write};

/// Stands for the index the commit will get.
const PENDING: u64 = u64::MAX;

/// One result of a transaction: the entry an operation read or wrote
/// (written entries without their value, as Consul answers).
#[derive(Debug, Clone, Serialize)]
pub struct TxnResult {
    #[serde(rename = "KV")]
    pub kv: KvPair,
}

impl TxnResult {
    /// Fills in the index the commit got.
    pub fn committed(&mut self, index: u64) {
        if self.kv.modify_index == PENDING {
            self.kv.modify_index = index;
        }
        if self.kv.create_index == PENDING {
            self.kv.create_index = index;
        }
    }
}

/// Why an operation of a transaction failed (Consul's `Errors` entries).
#[derive(Debug, Clone, Serialize)]
pub struct OpFailure {
    #[serde(rename = "OpIndex")]
    pub op_index: usize,
    #[serde(rename = "What")]
    pub what: String,
    /// Not a failed condition but a request that cannot apply (an
    /// unknown session): an error, not `false`, for the plain API.
    #[serde(skip)]
    pub invalid: bool,
}

/// A write being planned: the mirror, what the plan changed so far.
pub(super) struct Plan<'a> {
    base: &'a Inner,
    entries: BTreeMap<String, Option<Entry>>,
    sessions: BTreeMap<String, Option<Session>>,
    delays: BTreeMap<String, Option<u64>>,
    events: BTreeMap<String, Option<Vec<u8>>>,
    configs: BTreeMap<String, Option<Vec<u8>>>,
    mesh: BTreeMap<String, Option<Vec<u8>>>,
    expect: BTreeMap<RecordKey, Option<u64>>,
    /// How many changes were planned (a write of a batch that changed
    /// nothing gets no index).
    changes: u64,
}

/// What a plan had planned at one point, to go back to.
struct Savepoint {
    entries: BTreeMap<String, Option<Entry>>,
    sessions: BTreeMap<String, Option<Session>>,
    delays: BTreeMap<String, Option<u64>>,
    events: BTreeMap<String, Option<Vec<u8>>>,
    configs: BTreeMap<String, Option<Vec<u8>>>,
    mesh: BTreeMap<String, Option<Vec<u8>>>,
    changes: u64,
}

impl<'a> Plan<'a> {
    pub(super) fn new(base: &'a Inner) -> Plan<'a> {
        Plan {
            base,
            entries: BTreeMap::new(),
            sessions: BTreeMap::new(),
            delays: BTreeMap::new(),
            events: BTreeMap::new(),
            configs: BTreeMap::new(),
            mesh: BTreeMap::new(),
            expect: BTreeMap::new(),
            changes: 0,
        }
    }

    /// How many changes were planned so far.
    pub(super) fn changes(&self) -> u64 {
        self.changes
    }

    fn savepoint(&self) -> Savepoint {
        Savepoint {
            entries: self.entries.clone(),
            sessions: self.sessions.clone(),
            delays: self.delays.clone(),
            events: self.events.clone(),
            configs: self.configs.clone(),
            mesh: self.mesh.clone(),
            changes: self.changes,
        }
    }

    fn restore(&mut self, to: Savepoint) {
        self.entries = to.entries;
        self.sessions = to.sessions;
        self.delays = to.delays;
        self.events = to.events;
        self.configs = to.configs;
        self.mesh = to.mesh;
        self.changes = to.changes;
    }

    /// The expectations and writes of the plan.
    pub(super) fn finish(self) -> (Vec<Expect>, Vec<Write>) {
        let mut writes: Vec<Write> = Vec::new();
        for (key, entry) in self.entries {
            writes.push((RecordKey::Entry(key), entry.map(|e| e.record())));
        }
        for (id, session) in self.sessions {
            writes.push((RecordKey::Session(id), session.map(|s| s.record())));
        }
        for (key, until) in self.delays {
            let record = until.map(|until_unix_ms| KvDelay { until_unix_ms }.encode_to_vec());
            writes.push((RecordKey::Delay(key), record));
        }
        for (id, record) in self.events {
            writes.push((RecordKey::Event(id), record));
        }
        for (name, record) in self.configs {
            writes.push((RecordKey::Config(name), record));
        }
        for (name, record) in self.mesh {
            writes.push((RecordKey::Mesh(name), record));
        }
        (self.expect.into_iter().collect(), writes)
    }

    fn entry(&mut self, key: &str) -> Option<Entry> {
        if let Some(planned) = self.entries.get(key) {
            return planned.clone();
        }
        let found = self.base.entries.get(key).cloned();
        self.expect
            .entry(RecordKey::Entry(key.to_string()))
            .or_insert(found.as_ref().map(|e| e.modify_index));
        found
    }

    /// Every key under `prefix` as planned so far.
    fn keys_under(&mut self, prefix: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .base
            .entries
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect();
        keys.extend(
            self.entries
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .filter(|(_, e)| e.is_some())
                .map(|(k, _)| k.clone()),
        );
        keys.sort();
        keys.dedup();
        keys.retain(|k| self.entries.get(k).is_none_or(Option::is_some));
        keys
    }

    fn session_of(&mut self, id: &str) -> Option<Session> {
        if let Some(planned) = self.sessions.get(id) {
            return planned.clone();
        }
        let found = self.base.sessions.get(id).cloned();
        self.expect
            .entry(RecordKey::Session(id.to_string()))
            .or_insert(
                found
                    .as_ref()
                    .and_then(|_| self.base.session_versions.get(id).copied()),
            );
        found
    }

    fn delay(&mut self, key: &str) -> Option<u64> {
        if let Some(planned) = self.delays.get(key) {
            return *planned;
        }
        let found = self.base.delays.get(key).copied();
        self.expect
            .entry(RecordKey::Delay(key.to_string()))
            .or_insert(found.map(|(_, modify)| modify));
        found.map(|(until, _)| until)
    }

    fn put(&mut self, key: &str, mut entry: Entry) -> KvPair {
        entry.modify_index = PENDING;
        let pair = entry.pair(key, false);
        self.entries.insert(key.to_string(), Some(entry));
        self.changes += 1;
        pair
    }

    fn delete(&mut self, key: &str) {
        if self.entry(key).is_some() {
            self.entries.insert(key.to_string(), None);
            self.changes += 1;
        }
    }

    fn fresh(op: &TxnOp, existing: Option<&Entry>) -> Entry {
        Entry {
            value: op.value.clone(),
            flags: op.flags,
            lock_index: existing.map(|e| e.lock_index).unwrap_or(0),
            session: existing.map(|e| e.session.clone()).unwrap_or_default(),
            create_index: existing.map(|e| e.create_index).unwrap_or(PENDING),
            modify_index: PENDING,
        }
    }

    /// Runs a transaction's operations in order; the first failure fails
    /// them all (the plan is then dropped by the caller's empty writes).
    pub(super) fn txn(
        &mut self,
        ops: &[TxnOp],
        now_ms: u64,
    ) -> Result<Vec<TxnResult>, Vec<OpFailure>> {
        // Other writes of the batch planned before this one stay.
        let start = self.savepoint();
        let mut results = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            match self.op(op, now_ms) {
                Ok(pairs) => results.extend(pairs.into_iter().map(|kv| TxnResult { kv })),
                Err((what, invalid)) => {
                    // Nothing of a failed transaction is written.
                    self.restore(start);
                    return Err(vec![OpFailure {
                        op_index: i,
                        what,
                        invalid,
                    }]);
                }
            }
        }
        Ok(results)
    }

    fn op(&mut self, op: &TxnOp, now_ms: u64) -> Result<Vec<KvPair>, (String, bool)> {
        let key = op.key.as_str();
        let failed = |what: String| Err((what, false));
        match op.verb {
            Verb::Set => {
                let existing = self.entry(key);
                Ok(vec![self.put(key, Self::fresh(op, existing.as_ref()))])
            }
            Verb::Cas => {
                let existing = self.entry(key);
                let current = existing.as_ref().map(|e| e.modify_index).unwrap_or(0);
                if (op.index == 0 && existing.is_some()) || (op.index != 0 && op.index != current) {
                    return failed(format!("failed to set key {key:?}, index is stale"));
                }
                Ok(vec![self.put(key, Self::fresh(op, existing.as_ref()))])
            }
            Verb::Lock => {
                if self.session_of(&op.session).is_none() {
                    return Err((format!("invalid session {:?}", op.session), true));
                }
                let existing = self.entry(key);
                if let Some(until) = self.delay(key)
                    && until > now_ms
                {
                    return failed(format!(
                        "failed to lock key {key:?}: lock delay for {} ms more",
                        until - now_ms
                    ));
                }
                let mut entry = Self::fresh(op, existing.as_ref());
                match existing.as_ref() {
                    Some(e) if e.session == op.session => {}
                    Some(e) if !e.session.is_empty() => {
                        return failed(format!("failed to lock key {key:?}, lock is already held"));
                    }
                    _ => {
                        entry.lock_index += 1;
                        entry.session = op.session.clone();
                    }
                }
                Ok(vec![self.put(key, entry)])
            }
            Verb::Unlock => {
                let existing = self.entry(key);
                match existing {
                    Some(e) if e.session == op.session => {
                        let mut entry = Self::fresh(op, Some(&e));
                        entry.session.clear();
                        Ok(vec![self.put(key, entry)])
                    }
                    _ => failed(format!(
                        "failed to unlock key {key:?}, lock isn't held, or is held by another session"
                    )),
                }
            }
            Verb::Get => match self.entry(key) {
                Some(e) => Ok(vec![e.pair(key, true)]),
                None => failed(format!("key {key:?} doesn't exist")),
            },
            Verb::GetTree => {
                let keys = self.keys_under(key);
                Ok(keys
                    .iter()
                    .filter_map(|k| self.entry(k).map(|e| e.pair(k, true)))
                    .collect())
            }
            Verb::CheckIndex => match self.entry(key) {
                Some(e) if e.modify_index == op.index => Ok(vec![e.pair(key, false)]),
                Some(e) => failed(format!(
                    "current modify index {} != {}",
                    e.modify_index, op.index
                )),
                None => failed(format!("key {key:?} doesn't exist")),
            },
            Verb::CheckSession => match self.entry(key) {
                Some(e) if e.session == op.session => Ok(vec![e.pair(key, false)]),
                Some(e) => failed(format!(
                    "current session {:?} != {:?}",
                    e.session, op.session
                )),
                None => failed(format!("key {key:?} doesn't exist")),
            },
            Verb::CheckNotExists => match self.entry(key) {
                Some(_) => failed(format!("key {key:?} exists")),
                None => Ok(Vec::new()),
            },
            Verb::Delete => {
                self.delete(key);
                Ok(Vec::new())
            }
            Verb::DeleteTree => {
                for k in self.keys_under(key) {
                    self.delete(&k);
                }
                Ok(Vec::new())
            }
            Verb::DeleteCas => {
                let current = self.entry(key).map(|e| e.modify_index);
                if op.index == 0 || current != Some(op.index) {
                    return failed(format!("failed to delete key {key:?}, index is stale"));
                }
                self.delete(key);
                Ok(Vec::new())
            }
        }
    }

    pub(super) fn create_session(&mut self, id: &str, spec: &SessionSpec, node: &str, now_ms: u64) {
        let _ = self.session_of(id);
        self.sessions.insert(
            id.to_string(),
            Some(Session {
                id: id.to_string(),
                name: spec.name.clone(),
                node: node.to_string(),
                node_health: spec.node_health,
                checks: spec.checks.clone(),
                lock_delay: spec.lock_delay,
                behavior: spec.behavior,
                ttl: spec.ttl,
                renewed_ms: now_ms,
                create_index: PENDING,
            }),
        );
        self.changes += 1;
    }

    /// Whether the session exists (and was renewed).
    pub(super) fn renew_session(&mut self, id: &str, now_ms: u64) -> bool {
        let Some(mut session) = self.session_of(id) else {
            return false;
        };
        session.renewed_ms = now_ms;
        self.sessions.insert(id.to_string(), Some(session));
        self.changes += 1;
        true
    }

    /// Ends a session: its keys released (or deleted) with its lock
    /// delay. Whether it existed.
    pub(super) fn end_session(&mut self, id: &str, now_ms: u64) -> bool {
        let Some(session) = self.session_of(id) else {
            return false;
        };
        let held: Vec<String> = self
            .base
            .held
            .get(id)
            .map(|keys| keys.iter().cloned().collect())
            .unwrap_or_default();
        for key in held {
            let Some(mut entry) = self.entry(&key) else {
                continue;
            };
            if entry.session != id {
                continue;
            }
            match session.behavior {
                Behavior::Release => {
                    entry.session.clear();
                    self.put(&key, entry);
                }
                Behavior::Delete => self.delete(&key),
            }
            if session.lock_delay > Duration::ZERO {
                let until =
                    now_ms + u64::try_from(session.lock_delay.as_millis()).unwrap_or(u64::MAX / 2);
                let _ = self.delay(&key);
                self.delays.insert(key, Some(until));
                self.changes += 1;
            }
        }
        self.sessions.insert(id.to_string(), None);
        self.changes += 1;
        true
    }

    /// Stores a user event, forgetting the oldest beyond the most kept.
    pub(super) fn fire_event(&mut self, event: &UserEvent) {
        let kept = self.base.events.len();
        if kept >= signpost_core::event::MAX_EVENTS {
            let oldest: Vec<(String, u64)> = self
                .base
                .events_by_index()
                .take(kept + 1 - signpost_core::event::MAX_EVENTS)
                .collect();
            for (id, modify) in oldest {
                self.expect
                    .insert(RecordKey::Event(id.clone()), Some(modify));
                self.events.insert(id, None);
                self.changes += 1;
            }
        }
        self.expect.insert(RecordKey::Event(event.id.clone()), None);
        self.events.insert(
            event.id.clone(),
            Some(serde_json::to_vec(event).unwrap_or_default()),
        );
        self.changes += 1;
    }

    /// Writes or deletes a `service-defaults` entry.
    pub(super) fn put_config(&mut self, service: &str, record: Option<Vec<u8>>) {
        let found = self.base.configs.get(service).map(|(_, modify, _)| *modify);
        self.expect
            .insert(RecordKey::Config(service.to_string()), found);
        if record.is_some() || found.is_some() {
            self.configs.insert(service.to_string(), record);
            self.changes += 1;
        }
    }

    /// Writes or deletes a mesh record if its modify index is still
    /// `expected` (see [`super::Kv::put_mesh`]); whether it did.
    pub(super) fn put_mesh(
        &mut self,
        name: &str,
        record: Option<Vec<u8>>,
        expected: Option<Option<u64>>,
    ) -> bool {
        let found = self.base.mesh.get(name).map(|(_, modify, _)| *modify);
        self.expect.insert(RecordKey::Mesh(name.to_string()), found);
        let current = match self.mesh.get(name) {
            Some(planned) => planned.as_ref().map(|_| PENDING),
            None => found,
        };
        if expected.is_some_and(|e| e != current) {
            return false;
        }
        if record.is_some() || current.is_some() {
            self.mesh.insert(name.to_string(), record);
            self.changes += 1;
        }
        true
    }

    /// Deletes the lock delays that have passed.
    pub(super) fn forget_delays(&mut self, now_ms: u64) {
        let passed: Vec<String> = self
            .base
            .delays
            .iter()
            .filter(|(_, (until, _))| *until <= now_ms)
            .map(|(k, _)| k.clone())
            .collect();
        for key in passed {
            let _ = self.delay(&key);
            self.delays.insert(key, None);
            self.changes += 1;
        }
    }
}
