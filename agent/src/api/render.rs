//! This node's services and checks, and the fleet's instances, in
//! Consul's shapes (`signpost_core::consul`), and JSON answers.

use std::collections::BTreeMap;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use serde::Serialize;
use signpost_core::consul::{self, CatalogService, HealthCheck, TaggedAddress};
use signpost_core::model::Health;

use crate::fleet::{RemoteCheck, RemoteInstance};
use crate::state::{CheckEntry, Inner, ServiceEntry};

pub(crate) fn json<T: Serialize + ?Sized>(body: &T) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"null".to_vec());
    let mut response = bytes.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A service's tagged addresses as Consul shows them, plus the
/// `lan_ipv4`/`wan_ipv4` (or `_ipv6`) entries Consul's agent adds when the
/// service address is an IP and they were not given.
fn tagged_addresses(entry: &ServiceEntry) -> BTreeMap<String, TaggedAddress> {
    let def = &entry.def;
    let mut map: BTreeMap<String, TaggedAddress> = def
        .tagged_addresses
        .iter()
        .map(|(tag, a)| (tag.clone(), a.into()))
        .collect();
    let defaults = match def.address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => ["lan_ipv4", "wan_ipv4"],
        Ok(std::net::IpAddr::V6(_)) => ["lan_ipv6", "wan_ipv6"],
        Err(_) => return map,
    };
    for tag in defaults {
        map.entry(tag.to_string()).or_insert_with(|| TaggedAddress {
            address: def.address.clone(),
            port: def.port,
        });
    }
    map
}

/// A service of this node: `/v1/agent/services` entries name the
/// datacenter, the others carry indexes.
fn service(inner: &Inner, entry: &ServiceEntry, agent_view: bool) -> consul::Service {
    let def = &entry.def;
    consul::Service {
        id: def.id.to_string(),
        service: def.name.to_string(),
        tags: def.tags.clone(),
        address: def.address.clone(),
        tagged_addresses: tagged_addresses(entry),
        meta: def.meta.clone(),
        port: def.port,
        weights: def.weights.into(),
        enable_tag_override: def.enable_tag_override,
        datacenter: agent_view.then(|| inner.node.datacenter.clone()),
        create_index: (!agent_view).then_some(entry.create_index),
        modify_index: (!agent_view).then_some(entry.modify_index),
        content_hash: None,
    }
}

/// `/v1/agent/services` and `/v1/agent/service/:id` entries.
pub(crate) fn agent_service(inner: &Inner, entry: &ServiceEntry) -> consul::Service {
    service(inner, entry, true)
}

/// A check as `/v1/agent/checks` and the health endpoints show it.
pub(crate) fn check(inner: &Inner, check: &CheckEntry) -> HealthCheck {
    let service = inner
        .service_of_check(check)
        .map(|s| node_service(inner, s));
    let mut out = HealthCheck::new(&inner.node.name, service.as_ref());
    if let Some(def) = check.definition()
        && !def.interval.is_zero()
    {
        out.interval = signpost_core::duration::format(def.interval);
        out.timeout = signpost_core::duration::format(def.effective_timeout());
    }
    out.check_id = check.id.to_string();
    out.service_id = check
        .service_id
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    out.name = check.name.clone();
    out.status = check.status;
    out.notes = check.notes.clone();
    out.output = check.output.clone();
    out.kind = HealthCheck::consul_type(check.type_name());
    out.create_index = check.create_index;
    out.modify_index = check.modify_index;
    out
}

/// The `Node` object of health entries and `/v1/catalog/nodes`.
pub(crate) fn node(inner: &Inner) -> consul::Node {
    let mut meta = inner.node.meta.clone();
    meta.insert("zone".to_string(), inner.node.zone.clone());
    consul::Node {
        id: inner.node.id.clone(),
        node: inner.node.name.clone(),
        address: inner.node.address.clone(),
        datacenter: inner.node.datacenter.clone(),
        tagged_addresses: consul::node_tagged_addresses(&inner.node.address),
        meta,
        create_index: inner.node_create_index,
        modify_index: inner.node_create_index,
    }
}

/// The `Service` object of health entries and `/v1/catalog/node/:node`.
pub(crate) fn node_service(inner: &Inner, entry: &ServiceEntry) -> consul::Service {
    service(inner, entry, false)
}

/// One `/v1/catalog/service/:name` entry.
pub(crate) fn catalog_service(inner: &Inner, entry: &ServiceEntry) -> CatalogService {
    CatalogService::new(node(inner), node_service(inner, entry))
}

/// One `/v1/health/service/:name` entry: node, service, and the checks of
/// both (node checks included, as clients expect).
pub(crate) fn health_entry(inner: &Inner, entry: &ServiceEntry) -> consul::ServiceEntry {
    let checks = inner
        .node_checks()
        .chain(inner.checks_of(&entry.def.id))
        .map(|c| check(inner, c))
        .collect();
    consul::ServiceEntry {
        node: node(inner),
        service: node_service(inner, entry),
        checks,
    }
}

/// The aggregate Consul's client computes: maintenance beats critical.
pub(crate) fn aggregated_status(inner: &Inner, entry: &ServiceEntry) -> &'static str {
    let checks = || inner.node_checks().chain(inner.checks_of(&entry.def.id));
    if checks().any(|c| c.id.is_maintenance()) {
        return "maintenance";
    }
    checks()
        .map(|c| c.status)
        .max()
        .unwrap_or(Health::Passing)
        .as_str()
}

// === instances of other nodes, from the fleet view ===

fn remote_check(
    r: &RemoteInstance,
    service: Option<&consul::Service>,
    c: &RemoteCheck,
) -> HealthCheck {
    let mut out = HealthCheck::new(&r.node, service);
    out.check_id = c.id.clone();
    out.name = c.name.clone();
    out.status = c.status;
    out.notes = c.notes.clone();
    out.output = c.output.clone();
    out.kind = HealthCheck::consul_type(&c.kind);
    out
}

fn remote_node(inner: &Inner, r: &RemoteInstance) -> consul::Node {
    consul::Node {
        id: r.node_id.clone(),
        node: r.node.clone(),
        address: r.node_address.clone(),
        datacenter: inner.node.datacenter.clone(),
        tagged_addresses: consul::node_tagged_addresses(&r.node_address),
        meta: BTreeMap::from([("zone".to_string(), r.node_zone.clone())]),
        create_index: 0,
        modify_index: 0,
    }
}

fn remote_service(r: &RemoteInstance) -> consul::Service {
    consul::Service {
        id: r.id.clone(),
        service: r.name.clone(),
        tags: r.tags.clone(),
        address: r.address.clone(),
        tagged_addresses: BTreeMap::new(),
        meta: r.meta.clone(),
        port: r.port,
        weights: r.weights.into(),
        enable_tag_override: r.enable_tag_override,
        datacenter: None,
        create_index: Some(0),
        modify_index: Some(0),
        content_hash: None,
    }
}

/// A remote instance's health entry: every check, its node's first (the
/// control plane puts the node's liveness there as `serfHealth`).
pub(crate) fn remote_health_entry(inner: &Inner, r: &RemoteInstance) -> consul::ServiceEntry {
    let service = remote_service(r);
    let checks = r
        .node_checks
        .iter()
        .map(|c| remote_check(r, None, c))
        .chain(r.checks.iter().map(|c| remote_check(r, Some(&service), c)))
        .collect();
    consul::ServiceEntry {
        node: remote_node(inner, r),
        service,
        checks,
    }
}

pub(crate) fn remote_catalog_service(inner: &Inner, r: &RemoteInstance) -> CatalogService {
    CatalogService::new(remote_node(inner, r), remote_service(r))
}
