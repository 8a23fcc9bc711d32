//! Operator commands as the control plane keeps them: validated, stored
//! durably (`data_dir/commands.json`, replaced atomically), and published
//! on a `watch` channel so every agent's stream sends the active set on
//! each change. Expired and revoked commands are kept for `show` and
//! `list`, and only the active ones go to the agents (which also expire
//! them by themselves).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use signpost_core::command::{Action, Command, NewCommand, now_millis};
use tokio::sync::watch;

use crate::store::write_atomic;

#[derive(Debug, thiserror::Error)]
pub enum CommandStoreError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: corrupt command store: {source}")]
    Corrupt {
        path: String,
        source: serde_json::Error,
    },
}

pub struct Commands {
    path: PathBuf,
    all: Mutex<BTreeMap<String, Command>>,
    /// The nodes that applied each command (since this process started).
    applied: Mutex<BTreeMap<String, BTreeSet<String>>>,
    /// Bumped on every change.
    changes: watch::Sender<u64>,
}

impl Commands {
    pub fn open(data_dir: &Path) -> Result<Commands, CommandStoreError> {
        let path = data_dir.join("commands.json");
        let all = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| CommandStoreError::Corrupt {
                    path: path.display().to_string(),
                    source,
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(CommandStoreError::Io {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        Ok(Commands {
            path,
            all: Mutex::new(all),
            applied: Mutex::new(BTreeMap::new()),
            changes: watch::Sender::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Command>> {
        self.all.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn save(&self, all: &BTreeMap<String, Command>) -> Result<(), CommandStoreError> {
        let io = |source| CommandStoreError::Io {
            path: self.path.display().to_string(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(all).map_err(|e| io(std::io::Error::other(e)))?;
        write_atomic(&self.path, &bytes).map_err(io)
    }

    /// Stores a validated command; it is on disk before this returns.
    pub fn create(&self, new: NewCommand, creator: &str) -> Result<Command, CommandStoreError> {
        let now = now_millis();
        let ttl = u64::try_from(new.ttl.as_millis()).unwrap_or(u64::MAX);
        let command = Command {
            id: format!("{:016x}", rand::random::<u64>()),
            action: new.action,
            target: new.target,
            reason: new.reason,
            creator: creator.to_string(),
            created_at: now,
            expires_at: now.saturating_add(ttl),
            revoked_at: None,
        };
        let mut all = self.lock();
        all.insert(command.id.clone(), command.clone());
        if let Err(e) = self.save(&all) {
            all.remove(&command.id);
            return Err(e);
        }
        drop(all);
        self.changes.send_modify(|n| *n += 1);
        Ok(command)
    }

    /// Revokes a command; `None` if there is none with that id.
    pub fn revoke(&self, id: &str) -> Result<Option<Command>, CommandStoreError> {
        let mut all = self.lock();
        let Some(command) = all.get_mut(id) else {
            return Ok(None);
        };
        let before = command.revoked_at;
        if before.is_none() {
            command.revoked_at = Some(now_millis());
        }
        let revoked = command.clone();
        if let Err(e) = self.save(&all) {
            // Not saved: still in force.
            if let Some(command) = all.get_mut(id) {
                command.revoked_at = before;
            }
            return Err(e);
        }
        drop(all);
        self.changes.send_modify(|n| *n += 1);
        Ok(Some(revoked))
    }

    pub fn get(&self, id: &str) -> Option<Command> {
        self.lock().get(id).cloned()
    }

    /// Every command, newest first.
    pub fn list(&self) -> Vec<Command> {
        let mut all: Vec<Command> = self.lock().values().cloned().collect();
        all.sort_by_key(|c| std::cmp::Reverse(c.created_at));
        all
    }

    /// The commands in force now, as JSON for the agents. A `split`
    /// rate limit carries each agent's share: the fleet-wide rate and
    /// burst divided among the `subscribers` of its service.
    pub fn active_json(&self, subscribers: impl Fn(&str) -> usize) -> Vec<String> {
        let now = now_millis();
        self.lock()
            .values()
            .filter(|c| c.active(now))
            .map(|c| {
                let mut c = c.clone();
                if let Action::RateLimit {
                    per_second,
                    burst,
                    split: true,
                } = &mut c.action
                {
                    let share = subscribers(&c.target.service).max(1);
                    *per_second /= share as f64;
                    *burst = burst.div_ceil(share as u32).max(1);
                }
                c
            })
            .filter_map(|c| serde_json::to_string(&c).ok())
            .collect()
    }

    /// `node` applied the commands `ids`.
    pub fn applied(&self, node: &str, ids: &[String]) {
        let mut applied = self.applied.lock().unwrap_or_else(PoisonError::into_inner);
        for id in ids {
            applied
                .entry(id.clone())
                .or_default()
                .insert(node.to_string());
        }
    }

    /// The nodes that applied command `id`.
    pub fn applied_by(&self, id: &str) -> Vec<String> {
        let applied = self.applied.lock().unwrap_or_else(PoisonError::into_inner);
        applied
            .get(id)
            .map(|nodes| nodes.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use signpost_core::command::Target;

    use super::*;

    #[test]
    fn a_split_rate_is_shared_among_the_services_users_and_commands_persist() {
        let dir = tempfile::tempdir().unwrap();
        let commands = Commands::open(dir.path()).unwrap();
        let new = NewCommand {
            action: Action::RateLimit {
                per_second: 100.0,
                burst: 10,
                split: true,
            },
            target: Target {
                service: "web".to_string(),
                instance: None,
                route: None,
                callers: Vec::new(),
            },
            reason: "fair share".to_string(),
            ttl: Duration::from_secs(60),
        };
        let created = commands.create(new, "op").unwrap();
        let sent: Command = serde_json::from_str(&commands.active_json(|_| 4)[0]).unwrap();
        assert_eq!(
            sent.action,
            Action::RateLimit {
                per_second: 25.0,
                burst: 3,
                split: true
            }
        );
        let reopened = Commands::open(dir.path()).unwrap();
        assert_eq!(reopened.get(&created.id), Some(created.clone()));
        reopened.revoke(&created.id).unwrap();
        assert!(reopened.active_json(|_| 1).is_empty());
    }
}
