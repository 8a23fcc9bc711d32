//! The node's state read and changed under its lock: the queries the
//! API, DNS and the proxy ask of it, and the changes `LocalState` makes.

use super::*;

impl Inner {
    pub(super) fn bump(&mut self) -> u64 {
        self.index = self.clock.next();
        self.index
    }

    /// The index a blocking query on `name` waits on; never 0.
    pub fn service_name_index(&self, name: &str) -> u64 {
        self.name_index.get(name).copied().unwrap_or(1).max(1)
    }

    /// The worst status among a service's checks and the node's checks.
    pub fn service_health(&self, id: &ServiceId) -> Health {
        self.checks_of(id)
            .chain(self.node_checks())
            .map(|c| c.status)
            .max()
            .unwrap_or(Health::Passing)
    }

    pub fn checks_of<'a>(&'a self, id: &'a ServiceId) -> impl Iterator<Item = &'a CheckEntry> {
        self.checks
            .values()
            .filter(move |c| c.service_id.as_ref() == Some(id))
    }

    pub fn node_checks(&self) -> impl Iterator<Item = &CheckEntry> {
        self.checks.values().filter(|c| c.service_id.is_none())
    }

    pub fn service_of_check(&self, check: &CheckEntry) -> Option<&ServiceEntry> {
        check.service_id.as_ref().and_then(|s| self.services.get(s))
    }

    pub(super) fn touch_service_of(&mut self, service: Option<&ServiceId>, index: u64) {
        match service.and_then(|s| self.services.get(s)) {
            Some(entry) => {
                let name = entry.def.name.clone();
                self.name_index.insert(name, index);
            }
            // Node-level checks change the health of every service.
            None => {
                let names: Vec<ServiceName> =
                    self.services.values().map(|s| s.def.name.clone()).collect();
                for name in names {
                    self.name_index.insert(name, index);
                }
            }
        }
    }

    pub(super) fn put_check(
        &mut self,
        def: CheckDefinition,
        source: Source,
        index: u64,
    ) -> RunnerChanges {
        let id = def.effective_id();
        let generation = self.next_generation;
        self.next_generation += 1;
        let previous = self.checks.get(&id);
        let create_index = previous.map(|c| c.create_index).unwrap_or(index);
        // Re-registering the same definition keeps the status it earned.
        let (status, output, critical_since, ttl_deadline) = match previous {
            Some(prev) if prev.definition() == Some(&def) => (
                prev.status,
                prev.output.clone(),
                prev.critical_since,
                prev.ttl_deadline,
            ),
            _ => {
                let status = def.initial_status.unwrap_or(Health::Critical);
                let ttl_deadline = match def.kind {
                    CheckKind::Ttl { ttl } => Instant::now().checked_add(ttl),
                    _ => None,
                };
                let since = (status == Health::Critical).then(Instant::now);
                (status, String::new(), since, ttl_deadline)
            }
        };
        let service_id = def.service_id.clone();
        let entry = CheckEntry {
            id: id.clone(),
            name: if def.name.is_empty() {
                id.to_string()
            } else {
                def.name.clone()
            },
            notes: def.notes.clone(),
            service_id: service_id.clone(),
            role: CheckRole::Probe(Box::new(def.clone())),
            status,
            output,
            source,
            create_index,
            modify_index: index,
            generation,
            critical_since,
            ttl_deadline,
        };
        self.checks.insert(id.clone(), entry);
        self.touch_service_of(service_id.as_ref(), index);
        let mut changes = RunnerChanges::default();
        if matches!(def.kind, CheckKind::Ttl { .. }) {
            // TTL checks have no runner; a replaced probe's runner must stop.
            changes.stop.push(id);
        } else {
            changes.start.push(StartCheck {
                id,
                generation,
                def,
            });
        }
        changes
    }

    pub(super) fn remove_service(&mut self, id: &ServiceId) -> RunnerChanges {
        let index = self.bump();
        let mut changes = RunnerChanges::default();
        if let Some(entry) = self.services.remove(id) {
            self.name_index.insert(entry.def.name, index);
        }
        let bound: Vec<CheckId> = self
            .checks
            .values()
            .filter(|c| c.service_id.as_ref() == Some(id))
            .map(|c| c.id.clone())
            .collect();
        for check in bound {
            self.checks.remove(&check);
            changes.stop.push(check);
        }
        changes
    }

    pub(super) fn set_status(
        &mut self,
        id: &CheckId,
        status: Health,
        output: String,
    ) -> Option<StatusChange> {
        let entry = self.checks.get_mut(id)?;
        entry.output = output;
        if entry.status == status {
            return None;
        }
        let from = entry.status;
        entry.status = status;
        entry.critical_since = (status == Health::Critical).then(Instant::now);
        let service = entry.service_id.clone();
        let index = self.bump();
        if let Some(entry) = self.checks.get_mut(id) {
            entry.modify_index = index;
        }
        self.touch_service_of(service.as_ref(), index);
        Some(StatusChange {
            check: id.clone(),
            service,
            from,
            to: status,
        })
    }

    /// Adds, updates or removes a maintenance check; returns whether
    /// anything changed.
    pub(super) fn set_maintenance(
        &mut self,
        id: CheckId,
        service: Option<ServiceId>,
        reason: Option<String>,
        name: &str,
    ) -> bool {
        match reason {
            None => {
                if self.checks.remove(&id).is_none() {
                    return false;
                }
                let index = self.bump();
                self.touch_service_of(service.as_ref(), index);
                true
            }
            Some(reason) => {
                if self.checks.get(&id).is_some_and(|c| c.notes == reason) {
                    return false;
                }
                let index = self.bump();
                let create_index = self.checks.get(&id).map_or(index, |c| c.create_index);
                self.checks.insert(
                    id.clone(),
                    CheckEntry {
                        id,
                        name: name.to_string(),
                        notes: reason,
                        service_id: service.clone(),
                        role: CheckRole::Maintenance,
                        status: Health::Critical,
                        output: String::new(),
                        source: Source::Api,
                        create_index,
                        modify_index: index,
                        generation: 0,
                        critical_since: None,
                        ttl_deadline: None,
                    },
                );
                self.touch_service_of(service.as_ref(), index);
                true
            }
        }
    }
}
