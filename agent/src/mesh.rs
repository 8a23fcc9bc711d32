//! The service mesh on this host: the identities of its services, the
//! mesh's roots and intentions, and the inbound listener's address.
//!
//! - Identities: every service registered here gets a certificate
//!   (`spiffe://<trust domain>/dc/<dc>/svc/<name>`) for a key made here,
//!   which never leaves the host: asked for on the control-plane
//!   connection, kept in `data_dir/mesh/<service>.pem` (0600), renewed
//!   two thirds into its life and as soon as the CA rotates (the new
//!   root's certificates are trusted alongside the old ones, so nothing
//!   breaks meanwhile).
//! - Roots and intentions arrive on the sync stream ([`Mesh::apply`]) and
//!   are kept in `data_dir/mesh/state.pb`, so that a restart with the
//!   control plane down still serves and enforces them.
//! - The proxy is given a [`MeshView`] built from both
//!   ([`Mesh::view`]): which local service a connection calls as
//!   (a source address of one service's own, else `mesh.default_source`,
//!   else the only service name here), and the inbound listener's
//!   certificates.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use prost::Message as _;
use signpost_core::intention::{Action, Intention, Intentions};
use signpost_proto::MeshState;
use signpost_proxy::mesh::{Caller, MeshView};
use tokio::sync::watch;

use crate::identity::Held;
use crate::state::Inner;

/// How soon a certificate that could not be had is asked for again.
const RETRY: Duration = Duration::from_secs(2);

pub(crate) struct Mesh {
    /// The inbound listener's address, as other hosts dial it.
    pub(crate) inbound: SocketAddr,
    /// `mesh.default_source`.
    default_source: Option<String>,
    dir: PathBuf,
    inner: Mutex<MeshInner>,
    /// Bumped when the view changes (roots, intentions, certificates).
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct MeshInner {
    state: Option<MeshState>,
    /// Certificates by service name.
    leaves: BTreeMap<String, Held>,
    /// When a service's certificate may be asked for again after a
    /// failure.
    backoff: HashMap<String, SystemTime>,
}

/// What a service's certificate needs.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Due {
    /// Now: none, expiring, or signed by a root no longer active.
    Now(Vec<String>),
    /// At this time (the earliest renewal).
    At(SystemTime),
    /// Nothing to do (no services, or no CA heard of yet).
    Never,
}

impl Mesh {
    /// The mesh of an agent whose listener is at `inbound`, with what
    /// `data_dir` kept.
    pub(crate) fn open(
        data_dir: &Path,
        inbound: SocketAddr,
        default_source: Option<String>,
    ) -> Mesh {
        let dir = data_dir.join("mesh");
        let mut inner = MeshInner::default();
        match std::fs::read(dir.join("state.pb")) {
            Ok(bytes) => match MeshState::decode(bytes.as_slice()) {
                Ok(state) => inner.state = Some(state),
                Err(error) => {
                    tracing::warn!(%error, "unreadable mesh state: waiting for the control plane's")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(%error, "cannot read the mesh state: waiting for the control plane's")
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                let Some(service) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".pem"))
                else {
                    continue;
                };
                if let Some(held) = crate::identity::load(&path).filter(Held::valid_now) {
                    inner.leaves.insert(service.to_string(), held);
                }
            }
        }
        Mesh {
            inbound,
            default_source,
            dir,
            inner: Mutex::new(inner),
            changed: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, MeshInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes of the view.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The roots and intentions the control plane sent; kept on disk.
    pub(crate) fn apply(&self, state: MeshState) {
        {
            let mut inner = self.lock();
            if inner.state.as_ref() == Some(&state) {
                return;
            }
            tracing::info!(
                roots = state.roots.len(),
                active_root = %state.active_root,
                intentions = state.intentions.len(),
                default = %state.default_action,
                shadow = state.shadow,
                "mesh roots and intentions received"
            );
            if let Err(error) = signpost_daemon::fs::write_atomic(
                &self.dir.join("state.pb"),
                &state.encode_to_vec(),
            ) {
                tracing::warn!(%error, "cannot keep the mesh state on disk");
            }
            inner.state = Some(state);
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// Which of `services` (the names registered here) need a
    /// certificate now, or when the next one does.
    pub(crate) fn due(&self, services: &[String], now: SystemTime) -> Due {
        let inner = self.lock();
        let Some(state) = &inner.state else {
            return Due::Never;
        };
        let active = format!("Signpost mesh CA {}", state.active_root);
        let mut now_due = Vec::new();
        let mut next: Option<SystemTime> = None;
        for service in services {
            let at = match inner.leaves.get(service) {
                Some(held) if held.issuer == active => held.renew_at(),
                _ => now,
            };
            let at = at.max(inner.backoff.get(service).copied().unwrap_or(now));
            if at <= now {
                now_due.push(service.clone());
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        if !now_due.is_empty() {
            Due::Now(now_due)
        } else {
            next.map_or(Due::Never, Due::At)
        }
    }

    /// Asks for `service`'s certificate on `client`.
    pub(crate) async fn renew(&self, client: &mut crate::sync::Client, node: &str, service: &str) {
        let file = self.dir.join(format!("{service}.pem"));
        match crate::identity::renew(client, node, Some(service), &file).await {
            Ok(held) => {
                tracing::info!(%service, valid_until = ?held.not_after, root = %held.issuer, "mesh certificate renewed");
                let mut inner = self.lock();
                inner.backoff.remove(service);
                inner.leaves.insert(service.to_string(), held);
                drop(inner);
                self.changed.send_modify(|v| *v += 1);
            }
            Err(status) => {
                // Right after a registration the control plane may not
                // know the service yet: soon again, quietly.
                if status.code() == tonic::Code::FailedPrecondition {
                    tracing::debug!(%service, reason = %status.message(), "mesh certificate not issued yet");
                } else {
                    tracing::warn!(%service, error = %status.message(), retry_in = ?RETRY, "cannot get the service's mesh certificate");
                }
                self.lock()
                    .backoff
                    .insert(service.to_string(), SystemTime::now() + RETRY);
            }
        }
    }

    /// The mesh roots (PEM) and trust domain, if the control plane sent
    /// them.
    pub(crate) fn roots(&self) -> Option<MeshState> {
        self.lock().state.clone()
    }

    /// `service`'s certificate chain and key (PEM), if it has one.
    pub(crate) fn leaf(&self, service: &str) -> Option<(String, String, SystemTime, SystemTime)> {
        self.lock().leaves.get(service).map(|h| {
            (
                h.cert_pem.clone(),
                h.key_pem.clone(),
                h.not_before,
                h.not_after,
            )
        })
    }

    /// The intentions as the inbound listener enforces them.
    pub(crate) fn intentions(&self) -> Intentions {
        let inner = self.lock();
        intentions_of(inner.state.as_ref())
    }

    /// What the proxy needs, for the services registered in `local`.
    pub(crate) fn view(&self, local: &Inner) -> MeshView {
        let inner = self.lock();
        let Some(state) = &inner.state else {
            return MeshView::default();
        };
        let roots =
            match signpost_proxy::mesh::roots(state.roots.iter().map(|r| r.cert_pem.as_str())) {
                Ok(roots) => roots,
                Err(error) => {
                    tracing::error!(%error, "unusable mesh roots: the mesh is off on this host");
                    return MeshView::default();
                }
            };
        let mut callers = HashMap::new();
        let mut keys = HashMap::new();
        let meshed: std::collections::HashSet<&str> = local
            .services
            .values()
            .filter(|s| local.node.meshed(&s.def))
            .map(|s| s.def.name.as_str())
            .collect();
        for (service, held) in inner.leaves.iter().filter(|(_, h)| h.valid_now()) {
            let key = match signpost_proxy::mesh::certified_key(&held.cert_pem, &held.key_pem) {
                Ok(key) => key,
                Err(error) => {
                    tracing::error!(%service, %error, "unusable mesh certificate");
                    continue;
                }
            };
            if meshed.contains(service.as_str()) {
                keys.insert(service.to_ascii_lowercase(), key.clone());
            }
            match Caller::new(service, key, roots.clone(), &state.trust_domain) {
                Ok(caller) => {
                    callers.insert(Arc::from(service.as_str()), Arc::new(caller));
                }
                Err(error) => tracing::error!(%service, %error, "cannot call as the service"),
            }
        }
        let server = if keys.is_empty() {
            None
        } else {
            match signpost_proxy::mesh::server_config(keys, roots) {
                Ok(config) => Some(config),
                Err(error) => {
                    tracing::error!(%error, "cannot serve the inbound listener");
                    None
                }
            }
        };
        let (sources, default_source) = sources(local, self.default_source.as_deref());
        MeshView {
            trust_domain: state.trust_domain.clone(),
            callers,
            sources,
            default_source,
            server,
            intentions: Arc::new(intentions_of(Some(state))),
        }
    }
}

/// The intentions in `state` (deny everything without one: no CA yet).
fn intentions_of(state: Option<&MeshState>) -> Intentions {
    let Some(state) = state else {
        return Intentions::new(Vec::new(), Action::Deny, false);
    };
    let list = state
        .intentions
        .iter()
        .filter_map(|json| match serde_json::from_str::<Intention>(json) {
            Ok(i) => Some(i),
            Err(error) => {
                tracing::error!(%error, "undecodable intention skipped");
                None
            }
        })
        .collect();
    let default = if state.default_action == "deny" {
        Action::Deny
    } else {
        Action::Allow
    };
    Intentions::new(list, default, state.shadow)
}

/// Which local service a connection calls as: by a source address one
/// service name registered as its own, else `configured`, else the only
/// service name registered here.
fn sources(
    local: &Inner,
    configured: Option<&str>,
) -> (HashMap<IpAddr, Arc<str>>, Option<Arc<str>>) {
    let mut by_ip: HashMap<IpAddr, Option<String>> = HashMap::new();
    let mut names = std::collections::BTreeSet::new();
    for s in local.services.values() {
        let name = s.def.name.to_string();
        names.insert(name.clone());
        let Ok(ip) = s.def.address.parse::<IpAddr>() else {
            continue;
        };
        by_ip
            .entry(ip)
            .and_modify(|owner| {
                if owner.as_deref() != Some(name.as_str()) {
                    *owner = None;
                }
            })
            .or_insert(Some(name));
    }
    // The host's own address is every service's that gives none.
    let node_ip: Option<IpAddr> = local.node.address.parse().ok();
    let sources = by_ip
        .into_iter()
        .filter(|(ip, _)| Some(*ip) != node_ip)
        .filter_map(|(ip, owner)| Some((ip, Arc::from(owner?.as_str()))))
        .collect();
    let default = match configured {
        Some(name) => Some(Arc::from(name)),
        None if names.len() == 1 => names.into_iter().next().map(|n| Arc::from(n.as_str())),
        None => None,
    };
    (sources, default)
}
