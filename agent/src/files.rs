//! The service files in `services_dir`: loaded at start, then watched.
//!
//! Each `*.yaml` file is parsed and validated as a whole. A good file's
//! services are registered (unchanged services are left alone, so their
//! checks keep their status); services that left the file are
//! deregistered; a deleted file's services go away. A file that fails to
//! parse or validate is reported (log, metric, `signpost services`) and its
//! last good version keeps serving. A service id already served by another
//! file or by the API is an error for the file that claims it later.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use notify::{EventKind, RecursiveMode};
use signpost_core::model::{CheckKind, ServiceDefinition};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, AgentError, FileReport};
use crate::state::{Source, StateError};

/// Events closer than this are handled as one. The debouncer's thread
/// wakes once per this period too, idle or not (at the default quarter
/// period an idle agent woke 40 times a second); a change is handled
/// 100 to 200 ms after its last event.
const DEBOUNCE: Duration = Duration::from_millis(100);

#[derive(Default)]
pub(crate) struct ServiceFiles {
    loaded: HashMap<PathBuf, Loaded>,
}

struct Loaded {
    content: Vec<u8>,
    good: Vec<ServiceDefinition>,
    /// The current content was refused because another file or the API
    /// held one of its service ids: retried on every scan, since the
    /// other owner may be gone.
    conflict: bool,
}

/// `*.yaml` and `*.yml`, hidden files (editor swap files) excluded.
pub(crate) fn is_service_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let yaml = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e == "yaml" || e == "yml");
    !hidden && yaml
}

impl ServiceFiles {
    /// Brings the registrations in line with the directory's content.
    pub(crate) fn scan(&mut self, agent: &Agent, dir: &Path) {
        let mut present: Vec<(SystemTime, PathBuf)> = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                // Not only regular files: a symbolic link loop, a link to
                // nothing or a directory by such a name is reported.
                .filter(|p| is_service_file(p))
                .map(|p| {
                    let mtime = std::fs::metadata(&p)
                        .and_then(|m| m.modified())
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    (mtime, p)
                })
                .collect(),
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "cannot read services_dir; keeping the services already loaded");
                return;
            }
        };
        // Older files first, so that the newer of two files claiming the
        // same id is the one in error.
        present.sort();
        let gone: Vec<PathBuf> = self
            .loaded
            .keys()
            .filter(|p| !present.iter().any(|(_, q)| q == *p))
            .cloned()
            .collect();
        for path in gone {
            self.remove(agent, &path);
        }
        for (_, path) in &present {
            self.load(agent, path);
        }
        // A file loaded above may have released an id a refused file
        // claims (deleted, or the service left it): give those another go.
        let conflicting: Vec<PathBuf> = self
            .loaded
            .iter()
            .filter(|(_, l)| l.conflict)
            .map(|(p, _)| p.clone())
            .collect();
        for path in conflicting {
            self.load(agent, &path);
        }
    }

    fn remove(&mut self, agent: &Agent, path: &Path) {
        let Some(loaded) = self.loaded.remove(path) else {
            return;
        };
        let source = Source::File(path.to_path_buf());
        for def in loaded.good {
            match agent.deregister_service(&def.id, &source) {
                // Reaped (critical for too long) meanwhile.
                Ok(()) | Err(AgentError::State(StateError::UnknownService(_))) => {}
                Err(e) => {
                    tracing::warn!(file = %path.display(), service = %def.id, error = %e, "cannot deregister service of a removed file");
                }
            }
        }
        tracing::info!(file = %path.display(), "service file removed");
        agent.set_file_report(path.to_path_buf(), None);
    }

    fn load(&mut self, agent: &Agent, path: &Path) {
        let content = match std::fs::read(path) {
            Ok(c) => c,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && std::fs::symlink_metadata(path).is_err() =>
            {
                self.remove(agent, path);
                return;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.refuse(
                    agent,
                    path,
                    None,
                    format!("{}: a symbolic link to nothing: {e}", path.display()),
                );
                return;
            }
            Err(e) => {
                self.refuse(
                    agent,
                    path,
                    None,
                    format!("{}: cannot read: {e}", path.display()),
                );
                return;
            }
        };
        if self
            .loaded
            .get(path)
            .is_some_and(|l| l.content == content && !l.conflict)
        {
            return;
        }
        let parsed = std::str::from_utf8(&content)
            .map_err(|e| format!("{}: not UTF-8 text: {e}", path.display()))
            .and_then(|text| {
                signpost_core::service_file::parse(&path.display().to_string(), text)
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| (e, false))
            .and_then(|defs| admissible(agent, path, &defs).map(|()| defs));
        match parsed {
            Ok(defs) => self.apply(agent, path, content, defs),
            Err((error, conflict)) => {
                self.refuse(agent, path, Some(content), error);
                if let Some(l) = self.loaded.get_mut(path) {
                    l.conflict = conflict;
                }
            }
        }
    }

    fn apply(
        &mut self,
        agent: &Agent,
        path: &Path,
        content: Vec<u8>,
        defs: Vec<ServiceDefinition>,
    ) {
        let source = Source::File(path.to_path_buf());
        let old = self.loaded.remove(path).map(|l| l.good).unwrap_or_default();
        for def in &old {
            if !defs.iter().any(|d| d.id == def.id)
                && let Err(e) = agent.deregister_service(&def.id, &source)
                && !matches!(e, AgentError::State(StateError::UnknownService(_)))
            {
                tracing::warn!(file = %path.display(), service = %def.id, error = %e, "cannot deregister service that left its file");
            }
        }
        let mut errors = Vec::new();
        // What is really registered now: a refused service keeps its
        // previous version, if it had one, and is otherwise not served.
        let mut served = Vec::with_capacity(defs.len());
        for def in defs {
            if old.contains(&def) {
                served.push(def);
                continue;
            }
            match agent.register_service(def.clone(), source.clone(), true) {
                Ok(()) => served.push(def),
                Err(e) => {
                    errors.push(format!("service {:?}: {e}", def.id.as_str()));
                    served.extend(old.iter().find(|o| o.id == def.id).cloned());
                }
            }
        }
        agent.metrics.file_load(errors.is_empty());
        let error =
            (!errors.is_empty()).then(|| format!("{}: {}", path.display(), errors.join("; ")));
        match &error {
            None => {
                tracing::info!(file = %path.display(), services = served.len(), "service file loaded")
            }
            Some(e) => {
                tracing::error!(file = %path.display(), error = %e, "service file partly refused")
            }
        }
        agent.set_file_report(
            path.to_path_buf(),
            Some(FileReport {
                services: served.iter().map(|d| d.id.clone()).collect(),
                error,
            }),
        );
        self.loaded.insert(
            path.to_path_buf(),
            Loaded {
                content,
                good: served,
                // Refusals here are ids held by another owner: retry.
                conflict: !errors.is_empty(),
            },
        );
    }

    /// Keeps the last good version and reports why the new one is refused.
    fn refuse(&mut self, agent: &Agent, path: &Path, content: Option<Vec<u8>>, error: String) {
        agent.metrics.file_load(false);
        let entry = self
            .loaded
            .entry(path.to_path_buf())
            .or_insert_with(|| Loaded {
                content: Vec::new(),
                good: Vec::new(),
                conflict: false,
            });
        if let Some(content) = content {
            entry.content = content;
        }
        let services = entry.good.iter().map(|d| d.id.clone()).collect::<Vec<_>>();
        tracing::error!(file = %path.display(), error = %error, kept = services.len(), "service file refused; its last good version keeps serving");
        agent.set_file_report(
            path.to_path_buf(),
            Some(FileReport {
                services,
                error: Some(error),
            }),
        );
    }
}

/// Rules that depend on the agent: exec allowed, ids not owned elsewhere.
/// An error is `(message, conflict)`: `conflict` when another owner holds
/// one of the ids, which can change without this file changing.
fn admissible(
    agent: &Agent,
    path: &Path,
    defs: &[ServiceDefinition],
) -> Result<(), (String, bool)> {
    let source = Source::File(path.to_path_buf());
    for def in defs {
        if def
            .checks
            .iter()
            .any(|c| matches!(c.kind, CheckKind::Exec { .. }))
            && !agent.config.checks.enable_exec
        {
            return Err((
                format!(
                    "{}: service {:?}: {}",
                    path.display(),
                    def.id.as_str(),
                    crate::agent::AgentError::ExecDisabled
                ),
                false,
            ));
        }
        let owner = agent.state.read(|i| {
            i.services
                .get(&def.id)
                .filter(|s| s.source != source)
                .map(|s| s.source.describe())
        });
        if let Some(owner) = owner {
            return Err((
                format!(
                    "{}: service id {:?} is already defined by {owner}",
                    path.display(),
                    def.id.as_str()
                ),
                true,
            ));
        }
    }
    Ok(())
}

/// Loads the directory once, synchronously (before the API answers).
pub(crate) fn initial_scan(agent: &Agent) -> Arc<Mutex<ServiceFiles>> {
    let mut files = ServiceFiles::default();
    files.scan(agent, &agent.config.services_dir);
    Arc::new(Mutex::new(files))
}

/// Watches the directory and rescans it on every (debounced) change, and
/// once as it starts (what changed before the watch began, or while a
/// previous watch was down, is not missed). Ends with an error when the
/// directory cannot be watched or is removed: the supervisor starts it
/// again (with a back-off) until the directory is back, and meanwhile the
/// services it had keep serving.
pub(crate) async fn watch(
    agent: Arc<Agent>,
    files: Arc<Mutex<ServiceFiles>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let dir = agent.config.services_dir.clone();
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut debouncer = notify_debouncer_full::new_debouncer(
        DEBOUNCE,
        Some(DEBOUNCE),
        move |result: notify_debouncer_full::DebounceEventResult| match result {
            // Reads change nothing (and our own scan opens the directory:
            // two agents watching one directory would wake each other).
            Ok(events)
                if events
                    .iter()
                    .all(|e| matches!(e.kind, EventKind::Access(_))) => {}
            Ok(_) => {
                // The receiver is gone only at shutdown.
                if tx.send(()).is_err() {
                    tracing::trace!("service file watcher stopped");
                }
            }
            Err(errors) => {
                for e in errors {
                    tracing::warn!(error = %e, "service file watcher error");
                }
            }
        },
    )?;
    debouncer
        .watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch services_dir {}", dir.display()))?;
    tracing::info!(dir = %dir.display(), "watching service files");
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                event = rx.recv() => if event.is_none() { break },
            }
        }
        first = false;
        if !dir.is_dir() {
            anyhow::bail!(
                "services_dir {} is gone: its services keep serving until it is back",
                dir.display()
            );
        }
        let (agent, files, dir) = (agent.clone(), files.clone(), dir.clone());
        tokio::task::spawn_blocking(move || {
            files
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .scan(&agent, &dir);
        })
        .await?;
    }
    drop(debouncer);
    Ok(())
}
