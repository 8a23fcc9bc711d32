//! The agent's view of the fleet: the services it subscribed to, as the
//! control plane sent them (snapshot, then deltas), and the list of service
//! names. It keeps serving its last view when the control plane is gone.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Instant;

use signpost_core::proto::{CatalogInstance, ServiceNames, ServiceUpdate};
use tokio::sync::{Notify, watch};

#[derive(Default)]
pub struct CachedService {
    pub index: u64,
    /// Keyed by (node, instance id).
    pub instances: BTreeMap<(String, String), CatalogInstance>,
}

#[derive(Default)]
pub struct FleetInner {
    pub services: HashMap<String, CachedService>,
    pub names: Option<ServiceNames>,
    pub connected: bool,
    pub last_contact: Option<Instant>,
    /// Services something on this host uses.
    pub subscriptions: HashMap<String, Instant>,
    /// Total changes applied, for blocking queries.
    pub version: u64,
}

pub struct FleetCache {
    inner: Mutex<FleetInner>,
    changes: watch::Sender<u64>,
    /// Poked when a new subscription needs sending.
    pub subscribe: Notify,
}

impl FleetCache {
    pub fn new(upstreams: &[String]) -> Self {
        let now = Instant::now();
        let inner = FleetInner {
            subscriptions: upstreams.iter().map(|u| (u.clone(), now)).collect(),
            ..FleetInner::default()
        };
        FleetCache {
            inner: Mutex::new(inner),
            changes: watch::channel(0).0,
            subscribe: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FleetInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn read<R>(&self, f: impl FnOnce(&FleetInner) -> R) -> R {
        f(&self.lock())
    }

    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self, inner: &mut FleetInner) {
        inner.version += 1;
        self.changes.send_replace(inner.version);
    }

    /// Marks `service` as used; a new one is subscribed to at once.
    pub fn touch(&self, service: &str) {
        let mut inner = self.lock();
        let new = inner
            .subscriptions
            .insert(service.to_string(), Instant::now())
            .is_none();
        drop(inner);
        if new {
            self.subscribe.notify_one();
        }
    }

    /// The subscriptions with the index held for each (0: none).
    pub fn subscriptions(&self) -> HashMap<String, u64> {
        let inner = self.lock();
        inner
            .subscriptions
            .keys()
            .map(|s| (s.clone(), inner.services.get(s).map_or(0, |c| c.index)))
            .collect()
    }

    pub fn set_connected(&self, connected: bool) {
        let mut inner = self.lock();
        if inner.connected != connected {
            inner.connected = connected;
            if connected {
                inner.last_contact = Some(Instant::now());
            }
            self.changed(&mut inner);
        }
    }

    pub fn apply_update(&self, update: ServiceUpdate) {
        let mut inner = self.lock();
        inner.last_contact = Some(Instant::now());
        let service = inner.services.entry(update.service.clone()).or_default();
        if update.snapshot {
            service.instances.clear();
        }
        for removed in update.removed {
            service.instances.remove(&(removed.node, removed.id));
        }
        for upsert in update.upserts {
            if let Some(instance) = &upsert.instance {
                let key = (upsert.node.clone(), instance.id.clone());
                service.instances.insert(key, upsert);
            }
        }
        service.index = update.index;
        self.changed(&mut inner);
    }

    pub fn apply_names(&self, names: ServiceNames) {
        let mut inner = self.lock();
        inner.last_contact = Some(Instant::now());
        inner.names = Some(names);
        self.changed(&mut inner);
    }

    pub fn contact(&self) {
        self.lock().last_contact = Some(Instant::now());
    }
}
