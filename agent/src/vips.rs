//! This host's service VIPs (`data_dir/vips.json`): allocated on first
//! use from `proxy.vip_range` and written to disk before they are handed
//! out, so a VIP a client may have cached never changes, not even across
//! restarts.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use signpost_core::vip::{VipError, VipRange, VipTable, vip_key};

#[derive(Serialize, Deserialize)]
struct VipFile {
    range: VipRange,
    vips: BTreeMap<String, Ipv4Addr>,
}

pub struct Vips {
    table: Mutex<VipTable>,
    path: PathBuf,
    /// Bumped on every allocation, so the proxy opens its listeners.
    allocated: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum VipStoreError {
    #[error(transparent)]
    Full(#[from] VipError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Vips {
    /// Loads the table kept in `data_dir`. Entries outside `range` (the
    /// range was changed) are dropped with a warning; a corrupt file is
    /// moved aside.
    pub fn load(data_dir: &Path, range: VipRange) -> std::io::Result<Self> {
        let path = data_dir.join("vips.json");
        let entries = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<VipFile>(&bytes) {
                Ok(file) => file.vips,
                Err(e) => {
                    let aside = signpost_daemon::fs::move_aside(&path)?;
                    tracing::error!(
                        path = %path.display(),
                        moved_to = %aside.display(),
                        error = %e,
                        "VIP table is corrupt: moved it aside; VIPs are allocated anew"
                    );
                    BTreeMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        let (table, dropped) = VipTable::with_entries(range, entries);
        if !dropped.is_empty() {
            tracing::warn!(
                range = %range,
                names = ?dropped,
                "VIPs outside proxy.vip_range (or doubled) were dropped; these names get new VIPs"
            );
        }
        Ok(Vips {
            table: Mutex::new(table),
            path,
            allocated: tokio::sync::watch::Sender::new(0),
        })
    }

    /// The VIP of `service` (filtered by `tag`), allocating and saving a
    /// new one on first use.
    pub fn get_or_allocate(
        &self,
        service: &str,
        tag: Option<&str>,
    ) -> Result<Ipv4Addr, VipStoreError> {
        let key = vip_key(service, tag);
        let mut table = self.lock();
        if let Some(ip) = table.get(&key) {
            return Ok(ip);
        }
        let (ip, _) = table.allocate(&key)?;
        let file = VipFile {
            range: table.range(),
            vips: table.entries().clone(),
        };
        let saved = serde_json::to_vec_pretty(&file)
            .map_err(std::io::Error::other)
            .and_then(|bytes| signpost_daemon::fs::write_atomic(&self.path, &bytes));
        if let Err(source) = saved {
            // Not handed out unless on disk: a restart would move it.
            *table = VipTable::with_entries(
                file.range,
                file.vips.into_iter().filter(|(k, _)| *k != key),
            )
            .0;
            return Err(VipStoreError::Write {
                path: self.path.clone(),
                source,
            });
        }
        drop(table);
        tracing::info!(service, tag, vip = %ip, "allocated a VIP");
        self.allocated.send_modify(|n| *n += 1);
        Ok(ip)
    }

    /// Every VIP by its name (`service` or `tag.service`).
    pub fn entries(&self) -> Vec<(String, Ipv4Addr)> {
        self.lock()
            .entries()
            .iter()
            .map(|(k, ip)| (k.clone(), *ip))
            .collect()
    }

    /// Wakes up on every new VIP.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.allocated.subscribe()
    }

    /// The name (`service` or `tag.service`) a VIP belongs to.
    pub fn owner(&self, ip: Ipv4Addr) -> Option<String> {
        self.lock().owner(ip).map(str::to_string)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VipTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vips_survive_a_restart_and_a_corrupt_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let range = VipRange::default();
        let vips = Vips::load(dir.path(), range).unwrap();
        let web = vips.get_or_allocate("web", None).unwrap();
        let tagged = vips.get_or_allocate("web", Some("v2")).unwrap();
        assert_ne!(web, tagged);
        assert_eq!(vips.owner(tagged).as_deref(), Some("v2.web"));

        let again = Vips::load(dir.path(), range).unwrap();
        assert_eq!(again.get_or_allocate("web", None).unwrap(), web);
        assert_eq!(again.get_or_allocate("web", Some("v2")).unwrap(), tagged);

        std::fs::write(dir.path().join("vips.json"), "{not json").unwrap();
        let fresh = Vips::load(dir.path(), range).unwrap();
        // A second corrupt table does not replace the first one set aside.
        std::fs::write(dir.path().join("vips.json"), "{still not json").unwrap();
        Vips::load(dir.path(), range).unwrap();
        let mut aside: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("vips.json.corrupt-"))
            .collect();
        aside.sort();
        assert_eq!(aside.len(), 2, "{aside:?}");
        let kept: Vec<String> = aside
            .iter()
            .map(|n| std::fs::read_to_string(dir.path().join(n)).unwrap())
            .collect();
        assert!(kept.contains(&"{not json".to_string()), "{kept:?}");
        // The first choice is a hash of the name, so it comes back.
        assert_eq!(fresh.get_or_allocate("web", None).unwrap(), web);
    }
}
