//! Operator commands as the control plane keeps them: validated, stored
//! durably (`data_dir/commands.json`, replaced atomically), and published
//! on a `watch` channel so every agent's stream sends the active set on
//! each change. Expired and revoked commands are kept for `show` and
//! `list` (the newest [`ENDED_KEPT`], for at most [`ENDED_FOR`] after they
//! ended), and only the active ones go to the agents (which also expire
//! them by themselves).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use signpost_core::command::{Action, Command, NewCommand, now_millis};
use tokio::sync::watch;

use signpost_daemon::fs::write_atomic;

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
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Ended (expired or revoked) commands kept, newest first.
pub const ENDED_KEPT: usize = 1000;

/// How long an ended command is kept, in milliseconds (7 days).
pub const ENDED_FOR: u64 = 7 * 24 * 3600 * 1000;

pub struct Commands {
    path: PathBuf,
    all: Mutex<BTreeMap<String, Command>>,
    /// The nodes that applied each command (since this process started).
    applied: Mutex<BTreeMap<String, BTreeSet<String>>>,
    /// Bumped on every change.
    changes: watch::Sender<u64>,
    /// Set when replicas share a store: commands and acks are records
    /// there (`commands/<id>`, `acks/<id>/<node>`), not a file, and come
    /// back through [`Commands::store_command`] and [`Commands::store_ack`].
    shared: Option<Arc<dyn crate::store::Shared>>,
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
        Ok(Commands::new(path, all, None))
    }

    fn new(
        path: PathBuf,
        all: BTreeMap<String, Command>,
        shared: Option<Arc<dyn crate::store::Shared>>,
    ) -> Commands {
        Commands {
            path,
            all: Mutex::new(all),
            applied: Mutex::new(BTreeMap::new()),
            changes: watch::Sender::new(0),
            shared,
        }
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

    /// The commands of a replica on a shared store: none until they are
    /// loaded from it, and written there.
    pub fn for_store(shared: Arc<dyn crate::store::Shared>) -> Commands {
        Commands::new(PathBuf::new(), BTreeMap::new(), Some(shared))
    }

    /// A command as the shared store has it (`None`: deleted).
    pub fn store_command(&self, id: &str, command: Option<Command>) {
        let mut all = self.lock();
        let changed = match command {
            Some(c) => all.insert(id.to_string(), c.clone()).as_ref() != Some(&c),
            None => all.remove(id).is_some(),
        };
        drop(all);
        if changed {
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// `node` applied command `id`, as the shared store has it.
    pub fn store_ack(&self, id: &str, node: &str) {
        let mut applied = self.applied.lock().unwrap_or_else(PoisonError::into_inner);
        applied
            .entry(id.to_string())
            .or_default()
            .insert(node.to_string());
    }

    /// Writes `command` to the shared store, and deletes `dropped`.
    async fn put_shared(
        shared: &Arc<dyn crate::store::Shared>,
        command: &Command,
        dropped: &[Command],
    ) -> Result<(), CommandStoreError> {
        let bytes = serde_json::to_vec(command).map_err(|e| CommandStoreError::Io {
            path: format!("commands/{}", command.id),
            source: std::io::Error::other(e),
        })?;
        shared
            .put(format!("commands/{}", command.id), bytes)
            .await?;
        for old in dropped {
            if let Err(e) = shared.delete(format!("commands/{}", old.id)).await {
                tracing::warn!(id = %old.id, error = %e, "cannot drop an ended command from the store: dropped next time");
            }
        }
        Ok(())
    }

    /// Stores a validated command; it is on disk (or in the shared
    /// store) before this returns.
    pub async fn create(
        &self,
        new: NewCommand,
        creator: &str,
    ) -> Result<Command, CommandStoreError> {
        if let Some(shared) = self.shared.as_ref() {
            let now = now_millis();
            let command = new_command(new, creator, now);
            let dropped = prune(&mut self.lock().clone(), now);
            Self::put_shared(shared, &command, &dropped).await?;
            for old in &dropped {
                self.store_command(&old.id, None);
            }
            self.store_command(&command.id, Some(command.clone()));
            return Ok(command);
        }
        self.create_in_file(new, creator)
    }

    fn create_in_file(&self, new: NewCommand, creator: &str) -> Result<Command, CommandStoreError> {
        let now = now_millis();
        let command = new_command(new, creator, now);
        let mut all = self.lock();
        let dropped = prune(&mut all, now);
        all.insert(command.id.clone(), command.clone());
        if let Err(e) = self.save(&all) {
            all.remove(&command.id);
            all.extend(dropped.into_iter().map(|c| (c.id.clone(), c)));
            return Err(e);
        }
        drop(all);
        if !dropped.is_empty() {
            let mut applied = self.applied.lock().unwrap_or_else(PoisonError::into_inner);
            for command in &dropped {
                applied.remove(&command.id);
            }
        }
        self.changes.send_modify(|n| *n += 1);
        Ok(command)
    }

    /// Revokes a command; `None` if there is none with that id.
    pub async fn revoke(&self, id: &str) -> Result<Option<Command>, CommandStoreError> {
        if let Some(shared) = self.shared.as_ref() {
            let Some(mut command) = self.get(id) else {
                return Ok(None);
            };
            command.revoked_at.get_or_insert_with(now_millis);
            Self::put_shared(shared, &command, &[]).await?;
            self.store_command(id, Some(command.clone()));
            return Ok(Some(command));
        }
        self.revoke_in_file(id)
    }

    fn revoke_in_file(&self, id: &str) -> Result<Option<Command>, CommandStoreError> {
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

    /// `node` applied the commands `ids`; on a shared store, each ack
    /// not recorded yet is written there.
    pub fn applied(&self, node: &str, ids: &[String]) {
        let mut applied = self.applied.lock().unwrap_or_else(PoisonError::into_inner);
        for id in ids {
            let new = applied
                .entry(id.clone())
                .or_default()
                .insert(node.to_string());
            if let (true, Some(shared)) = (new, self.shared.as_ref()) {
                let (shared, key) = (shared.clone(), format!("acks/{id}/{node}"));
                tokio::spawn(async move {
                    if let Err(e) = shared.put(key, Vec::new()).await {
                        tracing::warn!(error = %e, "cannot record a command's ack in the store");
                    }
                });
            }
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

    /// The ended commands past what is kept, for the shared store's
    /// leader to drop.
    pub fn ended_to_drop(&self) -> Vec<String> {
        let mut all = self.lock().clone();
        prune(&mut all, now_millis())
            .into_iter()
            .map(|c| c.id)
            .collect()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

impl CommandStoreError {
    /// The shared store has no quorum: try again later (503).
    pub fn unavailable(&self) -> bool {
        matches!(
            self,
            CommandStoreError::Store(crate::store::StoreError::Unavailable { .. })
        )
    }
}

fn new_command(new: NewCommand, creator: &str, now: u64) -> Command {
    let ttl = u64::try_from(new.ttl.as_millis()).unwrap_or(u64::MAX);
    Command {
        id: format!("{:016x}", rand::random::<u64>()),
        action: new.action,
        target: new.target,
        reason: new.reason,
        creator: creator.to_string(),
        created_at: now,
        expires_at: now.saturating_add(ttl),
        revoked_at: None,
    }
}

/// Takes out of `all` the ended commands beyond what is kept: those that
/// ended more than [`ENDED_FOR`] before `now`, then the oldest beyond
/// [`ENDED_KEPT`]. Commands in force are never dropped.
fn prune(all: &mut BTreeMap<String, Command>, now: u64) -> Vec<Command> {
    let ended_at = |c: &Command| c.revoked_at.unwrap_or(c.expires_at);
    let mut ended: Vec<(u64, String)> = all
        .values()
        .filter(|c| !c.active(now))
        .map(|c| (ended_at(c), c.id.clone()))
        .collect();
    // Newest first.
    ended.sort_by(|a, b| b.cmp(a));
    ended
        .iter()
        .enumerate()
        .filter(|(n, (at, _))| *n >= ENDED_KEPT || now.saturating_sub(*at) > ENDED_FOR)
        .filter_map(|(_, (_, id))| all.remove(id))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use signpost_core::command::Target;

    use super::*;

    #[tokio::test]
    async fn a_split_rate_is_shared_among_the_services_users_and_commands_persist() {
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
        let created = commands.create(new, "op").await.unwrap();
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
        reopened.revoke(&created.id).await.unwrap();
        assert!(reopened.active_json(|_| 1).is_empty());
    }

    #[test]
    fn ended_commands_are_kept_for_a_while_and_in_a_bounded_number() {
        let command = |id: &str, expires_at: u64, revoked_at: Option<u64>| Command {
            id: id.to_string(),
            action: Action::Block,
            target: Target {
                service: "web".to_string(),
                instance: None,
                route: None,
                callers: Vec::new(),
            },
            reason: "r".to_string(),
            creator: "op".to_string(),
            created_at: 0,
            expires_at,
            revoked_at,
        };
        let now = 100 * ENDED_FOR;
        let mut all = BTreeMap::new();
        for n in 0..ENDED_KEPT + 10 {
            let id = format!("ended-{n:05}");
            all.insert(id.clone(), command(&id, now - 2000 + n as u64, None));
        }
        let old = command("old", now - ENDED_FOR - 1, None);
        let revoked = command("revoked-long-ago", now + 1000, Some(now - 2 * ENDED_FOR));
        let active = command("active", now + 1000, None);
        for c in [old, revoked, active] {
            all.insert(c.id.clone(), c);
        }
        let dropped: BTreeSet<String> = prune(&mut all, now).into_iter().map(|c| c.id).collect();
        assert!(all.contains_key("active"), "a command in force stays");
        assert!(dropped.contains("old") && dropped.contains("revoked-long-ago"));
        // The ten oldest of the recent ones go, the newest stay.
        assert!(dropped.contains("ended-00000") && dropped.contains("ended-00009"));
        assert!(all.contains_key("ended-00010"));
        assert_eq!(all.len(), ENDED_KEPT + 1);
    }
}
