//! The JSON shapes Consul clients parse. Empty lists are `[]` and empty
//! maps `{}`, never `null`.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use signpost_core::model::Health;
use signpost_proto::{CatalogInstance, Check as ProtoCheck, Instance};

use crate::state::{CheckEntry, Inner, ServiceEntry};

pub(crate) fn json(body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"null".to_vec());
    let mut response = bytes.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A service's tagged addresses as Consul shows them: `{"Address","Port"}`
/// objects, plus the `lan_ipv4`/`wan_ipv4` (or `_ipv6`) entries Consul's
/// agent adds when the service address is an IP and they were not given.
fn tagged_addresses(entry: &ServiceEntry) -> Value {
    let def = &entry.def;
    let mut map = Map::new();
    for (tag, addr) in &def.tagged_addresses {
        map.insert(
            tag.clone(),
            json!({"Address": addr.address, "Port": addr.port}),
        );
    }
    let defaults = match def.address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => ["lan_ipv4", "wan_ipv4"],
        Ok(std::net::IpAddr::V6(_)) => ["lan_ipv6", "wan_ipv6"],
        Err(_) => return Value::Object(map),
    };
    for tag in defaults {
        map.entry(tag)
            .or_insert_with(|| json!({"Address": def.address, "Port": def.port}));
    }
    Value::Object(map)
}

fn weights(entry: &ServiceEntry) -> Value {
    json!({"Passing": entry.def.weights.passing, "Warning": entry.def.weights.warning})
}

/// `/v1/agent/services` and `/v1/agent/service/:id` entries.
pub(crate) fn agent_service(inner: &Inner, entry: &ServiceEntry) -> Value {
    let def = &entry.def;
    json!({
        "ID": def.id,
        "Service": def.name,
        "Tags": def.tags,
        "Meta": def.meta,
        "Port": def.port,
        "Address": def.address,
        "TaggedAddresses": tagged_addresses(entry),
        "Weights": weights(entry),
        "EnableTagOverride": def.enable_tag_override,
        "Datacenter": inner.node.datacenter,
    })
}

/// A check as `/v1/agent/checks` and the health endpoints show it.
pub(crate) fn check(inner: &Inner, check: &CheckEntry) -> Value {
    let service = inner.service_of_check(check);
    let (interval, timeout) = match check.definition() {
        Some(def) if !def.interval.is_zero() => (
            signpost_core::duration::format(def.interval),
            signpost_core::duration::format(def.effective_timeout()),
        ),
        _ => (String::new(), String::new()),
    };
    let check_type = match check.type_name() {
        "maintenance" | "serf" => "",
        other => other,
    };
    json!({
        "Node": inner.node.name,
        "CheckID": check.id,
        "Name": check.name,
        "Status": check.status,
        "Notes": check.notes,
        "Output": check.output,
        "ServiceID": check.service_id.as_ref().map(|s| s.as_str()).unwrap_or(""),
        "ServiceName": service.map(|s| s.def.name.as_str()).unwrap_or(""),
        "ServiceTags": service.map(|s| s.def.tags.clone()).unwrap_or_default(),
        "Type": check_type,
        "Interval": interval,
        "Timeout": timeout,
        "ExposedPort": 0,
        "Definition": {},
        "CreateIndex": check.create_index,
        "ModifyIndex": check.modify_index,
    })
}

fn node_tagged_addresses(inner: &Inner) -> Value {
    let a = &inner.node.address;
    json!({"lan": a, "lan_ipv4": a, "wan": a, "wan_ipv4": a})
}

/// The `Node` object of health entries and `/v1/catalog/nodes`.
pub(crate) fn node(inner: &Inner) -> Value {
    json!({
        "ID": inner.node.id,
        "Node": inner.node.name,
        "Address": inner.node.address,
        "Datacenter": inner.node.datacenter,
        "TaggedAddresses": node_tagged_addresses(inner),
        "Meta": node_meta(inner),
        "CreateIndex": inner.node_create_index,
        "ModifyIndex": inner.node_create_index,
    })
}

fn node_meta(inner: &Inner) -> Value {
    let mut meta: Map<String, Value> = inner
        .node
        .meta
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    meta.insert("zone".to_string(), Value::String(inner.node.zone.clone()));
    Value::Object(meta)
}

/// The `Service` object of health entries and `/v1/catalog/node/:node`.
pub(crate) fn node_service(entry: &ServiceEntry) -> Value {
    let def = &entry.def;
    json!({
        "ID": def.id,
        "Service": def.name,
        "Tags": def.tags,
        "Address": def.address,
        "TaggedAddresses": tagged_addresses(entry),
        "Meta": def.meta,
        "Port": def.port,
        "Weights": weights(entry),
        "EnableTagOverride": def.enable_tag_override,
        "CreateIndex": entry.create_index,
        "ModifyIndex": entry.modify_index,
    })
}

/// One `/v1/catalog/service/:name` entry.
pub(crate) fn catalog_service(inner: &Inner, entry: &ServiceEntry) -> Value {
    let def = &entry.def;
    json!({
        "ID": inner.node.id,
        "Node": inner.node.name,
        "Address": inner.node.address,
        "Datacenter": inner.node.datacenter,
        "TaggedAddresses": node_tagged_addresses(inner),
        "NodeMeta": node_meta(inner),
        "ServiceKind": "",
        "ServiceID": def.id,
        "ServiceName": def.name,
        "ServiceTags": def.tags,
        "ServiceAddress": def.address,
        "ServiceTaggedAddresses": tagged_addresses(entry),
        "ServiceWeights": weights(entry),
        "ServiceMeta": def.meta,
        "ServicePort": def.port,
        "ServiceEnableTagOverride": def.enable_tag_override,
        "ServiceConnect": {},
        "CreateIndex": entry.create_index,
        "ModifyIndex": entry.modify_index,
    })
}

/// One `/v1/health/service/:name` entry: node, service, and the checks of
/// both (node checks included, as clients expect).
pub(crate) fn health_entry(inner: &Inner, entry: &ServiceEntry) -> Value {
    let checks: Vec<Value> = inner
        .node_checks()
        .chain(inner.checks_of(&entry.def.id))
        .map(|c| check(inner, c))
        .collect();
    json!({
        "Node": node(inner),
        "Service": node_service(entry),
        "Checks": checks,
    })
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

fn remote_check(ci: &CatalogInstance, instance: Option<&Instance>, c: &ProtoCheck) -> Value {
    json!({
        "Node": ci.node,
        "CheckID": c.id,
        "Name": c.name,
        "Status": c.status,
        "Notes": c.notes,
        "Output": c.output,
        "ServiceID": instance.map(|i| i.id.as_str()).unwrap_or(""),
        "ServiceName": instance.map(|i| i.name.as_str()).unwrap_or(""),
        "ServiceTags": instance.map(|i| i.tags.clone()).unwrap_or_default(),
        "Type": match c.r#type.as_str() { "maintenance" | "serf" => "", t => t },
        "Interval": "",
        "Timeout": "",
        "ExposedPort": 0,
        "Definition": {},
        "CreateIndex": 0,
        "ModifyIndex": 0,
    })
}

/// Every check of a remote instance, its node's included (the control
/// plane puts the node's liveness there as `serfHealth`).
pub(crate) fn remote_checks(ci: &CatalogInstance, instance: &Instance) -> Vec<Value> {
    ci.node_checks
        .iter()
        .map(|c| remote_check(ci, None, c))
        .chain(
            instance
                .checks
                .iter()
                .map(|c| remote_check(ci, Some(instance), c)),
        )
        .collect()
}

fn remote_node(inner: &Inner, ci: &CatalogInstance) -> Value {
    let a = &ci.node_address;
    json!({
        "ID": ci.node_id,
        "Node": ci.node,
        "Address": a,
        "Datacenter": inner.node.datacenter,
        "TaggedAddresses": {"lan": a, "lan_ipv4": a, "wan": a, "wan_ipv4": a},
        "Meta": {"zone": ci.node_zone},
        "CreateIndex": 0,
        "ModifyIndex": 0,
    })
}

fn remote_service(instance: &Instance) -> Value {
    json!({
        "ID": instance.id,
        "Service": instance.name,
        "Tags": instance.tags,
        "Address": instance.address,
        "TaggedAddresses": {},
        "Meta": instance.meta,
        "Port": instance.port,
        "Weights": {"Passing": instance.weight_passing, "Warning": instance.weight_warning},
        "EnableTagOverride": instance.enable_tag_override,
        "CreateIndex": 0,
        "ModifyIndex": 0,
    })
}

pub(crate) fn remote_health_entry(
    inner: &Inner,
    ci: &CatalogInstance,
    instance: &Instance,
) -> Value {
    json!({
        "Node": remote_node(inner, ci),
        "Service": remote_service(instance),
        "Checks": remote_checks(ci, instance),
    })
}

pub(crate) fn remote_catalog_service(
    inner: &Inner,
    ci: &CatalogInstance,
    instance: &Instance,
) -> Value {
    let a = &ci.node_address;
    json!({
        "ID": ci.node_id,
        "Node": ci.node,
        "Address": a,
        "Datacenter": inner.node.datacenter,
        "TaggedAddresses": {"lan": a, "lan_ipv4": a, "wan": a, "wan_ipv4": a},
        "NodeMeta": {"zone": ci.node_zone},
        "ServiceKind": "",
        "ServiceID": instance.id,
        "ServiceName": instance.name,
        "ServiceTags": instance.tags,
        "ServiceAddress": instance.address,
        "ServiceTaggedAddresses": {},
        "ServiceWeights": {"Passing": instance.weight_passing, "Warning": instance.weight_warning},
        "ServiceMeta": instance.meta,
        "ServicePort": instance.port,
        "ServiceEnableTagOverride": instance.enable_tag_override,
        "ServiceConnect": {},
        "CreateIndex": 0,
        "ModifyIndex": 0,
    })
}
