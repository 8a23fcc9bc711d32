//! Consul's JSON shapes, written once for everything that speaks them:
//! the agent's local API and the control plane's catalog and health
//! endpoints answer with these types, and the `signpost` CLI reads and
//! sends them. Field names are Consul's (`PascalCase`, with its `ID`
//! spellings); empty lists are `[]` and empty maps `{}`, never `null`.
//!
//! Reading a request body the tolerant way Consul does (any case,
//! snake_case, numbers or Go strings for durations) is the agent's
//! `api::decode`; these types are what is written.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::duration;
use crate::model::{self, CheckKind, Health, ServiceDefinition};

/// A service's `Weights`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Weights {
    pub passing: u32,
    pub warning: u32,
}

impl From<model::Weights> for Weights {
    fn from(w: model::Weights) -> Self {
        Weights {
            passing: w.passing,
            warning: w.warning,
        }
    }
}

/// One of a service's `TaggedAddresses`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TaggedAddress {
    pub address: String,
    pub port: u16,
}

impl From<&model::TaggedAddress> for TaggedAddress {
    fn from(a: &model::TaggedAddress) -> Self {
        TaggedAddress {
            address: a.address.clone(),
            port: a.port,
        }
    }
}

/// A node's `TaggedAddresses`: its one address under each name Consul
/// gives it.
pub fn node_tagged_addresses(address: &str) -> BTreeMap<String, String> {
    ["lan", "lan_ipv4", "wan", "wan_ipv4"]
        .into_iter()
        .map(|tag| (tag.to_string(), address.to_string()))
        .collect()
}

/// A node: `/v1/catalog/nodes` entries and the `Node` of health entries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Node {
    #[serde(rename = "ID")]
    pub id: String,
    pub node: String,
    pub address: String,
    pub datacenter: String,
    pub tagged_addresses: BTreeMap<String, String>,
    pub meta: BTreeMap<String, String>,
    pub create_index: u64,
    pub modify_index: u64,
}

/// A service instance: `/v1/agent/services` entries (with `Datacenter`),
/// the `Service` of health entries and the services of
/// `/v1/catalog/node/:node` (with indexes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Service {
    #[serde(rename = "ID")]
    pub id: String,
    pub service: String,
    pub tags: Vec<String>,
    pub address: String,
    pub tagged_addresses: BTreeMap<String, TaggedAddress>,
    pub meta: BTreeMap<String, String>,
    pub port: u16,
    pub weights: Weights,
    pub enable_tag_override: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacenter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_index: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modify_index: Option<u64>,
    /// `/v1/agent/service/:id` only: what `?hash=` blocks on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_hash: Option<String>,
}

/// A check, as `/v1/agent/checks` and the health endpoints show it. Read
/// tolerantly (the CLI may ask a real Consul agent): every field but the
/// status may be missing, and `Definition` may hold anything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthCheck {
    #[serde(default)]
    pub node: String,
    #[serde(rename = "CheckID", default)]
    pub check_id: String,
    #[serde(default)]
    pub name: String,
    pub status: Health,
    #[serde(default)]
    pub notes: String,
    #[serde(default)]
    pub output: String,
    #[serde(rename = "ServiceID", default)]
    pub service_id: String,
    #[serde(default)]
    pub service_name: String,
    #[serde(default)]
    pub service_tags: Vec<String>,
    /// See [`HealthCheck::consul_type`].
    #[serde(rename = "Type", default)]
    pub kind: String,
    #[serde(default)]
    pub interval: String,
    #[serde(default)]
    pub timeout: String,
    #[serde(default)]
    pub exposed_port: u16,
    #[serde(default)]
    pub definition: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub create_index: u64,
    #[serde(default)]
    pub modify_index: u64,
}

impl HealthCheck {
    /// The `Type` Consul shows for a check of type `kind`: the node-level
    /// checks it makes itself (a node's liveness, `serf`, and maintenance)
    /// have none.
    pub fn consul_type(kind: &str) -> String {
        match kind {
            "maintenance" | "serf" => String::new(),
            other => other.to_string(),
        }
    }

    /// A check of `node` (of `service` when it has one) with the fields
    /// Consul fills for checks it did not define itself left empty.
    pub fn new(node: &str, service: Option<&Service>) -> HealthCheck {
        HealthCheck {
            node: node.to_string(),
            check_id: String::new(),
            name: String::new(),
            status: Health::Critical,
            notes: String::new(),
            output: String::new(),
            service_id: service.map(|s| s.id.clone()).unwrap_or_default(),
            service_name: service.map(|s| s.service.clone()).unwrap_or_default(),
            service_tags: service.map(|s| s.tags.clone()).unwrap_or_default(),
            kind: String::new(),
            interval: String::new(),
            timeout: String::new(),
            exposed_port: 0,
            definition: serde_json::Map::new(),
            create_index: 0,
            modify_index: 0,
        }
    }
}

/// One `/v1/health/service/:name` entry: the node, the service, and the
/// checks of both (the node's first, as clients expect).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceEntry {
    pub node: Node,
    pub service: Service,
    pub checks: Vec<HealthCheck>,
}

/// One `/v1/catalog/service/:name` entry: a node and a service, flat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CatalogService {
    #[serde(rename = "ID")]
    pub id: String,
    pub node: String,
    pub address: String,
    pub datacenter: String,
    pub tagged_addresses: BTreeMap<String, String>,
    pub node_meta: BTreeMap<String, String>,
    pub service_kind: String,
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    pub service_name: String,
    pub service_tags: Vec<String>,
    pub service_address: String,
    pub service_tagged_addresses: BTreeMap<String, TaggedAddress>,
    pub service_weights: Weights,
    pub service_meta: BTreeMap<String, String>,
    pub service_port: u16,
    pub service_enable_tag_override: bool,
    pub service_connect: BTreeMap<String, String>,
    pub create_index: u64,
    pub modify_index: u64,
}

impl CatalogService {
    pub fn new(node: Node, service: Service) -> CatalogService {
        CatalogService {
            id: node.id,
            node: node.node,
            address: node.address,
            datacenter: node.datacenter,
            tagged_addresses: node.tagged_addresses,
            node_meta: node.meta,
            service_kind: String::new(),
            service_id: service.id,
            service_name: service.service,
            service_tags: service.tags,
            service_address: service.address,
            service_tagged_addresses: service.tagged_addresses,
            service_weights: service.weights,
            service_meta: service.meta,
            service_port: service.port,
            service_enable_tag_override: service.enable_tag_override,
            service_connect: BTreeMap::new(),
            create_index: service.create_index.unwrap_or(0),
            modify_index: service.modify_index.unwrap_or(0),
        }
    }
}

/// The body of `PUT /v1/agent/service/register`, as `signpost register`
/// sends a service file's definitions.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceRegistration {
    #[serde(rename = "ID")]
    pub id: String,
    pub name: String,
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub tagged_addresses: BTreeMap<String, TaggedAddress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    pub protocol: &'static str,
    pub weights: Weights,
    pub enable_tag_override: bool,
    pub checks: Vec<CheckRegistration>,
}

/// A check of a [`ServiceRegistration`]: the fields of its kind, and its
/// thresholds.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CheckRegistration {
    #[serde(rename = "CheckID", skip_serializing_if = "Option::is_none")]
    pub check_id: Option<String>,
    pub name: String,
    pub notes: String,
    #[serde(rename = "HTTP", skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<BTreeMap<String, Vec<String>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(rename = "TLSSkipVerify", skip_serializing_if = "Option::is_none")]
    pub tls_skip_verify: Option<bool>,
    #[serde(rename = "TLSServerName", skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disable_redirects: Option<bool>,
    #[serde(rename = "TCP", skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    #[serde(rename = "GRPC", skip_serializing_if = "Option::is_none")]
    pub grpc: Option<String>,
    #[serde(rename = "GRPCUseTLS", skip_serializing_if = "Option::is_none")]
    pub grpc_use_tls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    #[serde(rename = "TTL", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Health>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deregister_critical_service_after: Option<String>,
    pub success_before_passing: u32,
    pub failures_before_warning: u32,
    pub failures_before_critical: u32,
    pub output_max_size: usize,
}

impl From<&ServiceDefinition> for ServiceRegistration {
    fn from(def: &ServiceDefinition) -> Self {
        ServiceRegistration {
            id: def.id.to_string(),
            name: def.name.to_string(),
            address: def.address.clone(),
            port: def.port,
            tags: def.tags.clone(),
            meta: def.meta.clone(),
            tagged_addresses: def
                .tagged_addresses
                .iter()
                .map(|(tag, a)| (tag.clone(), a.into()))
                .collect(),
            zone: def.zone.clone(),
            protocol: def.protocol.as_str(),
            weights: def.weights.into(),
            enable_tag_override: def.enable_tag_override,
            checks: def.checks.iter().map(CheckRegistration::from).collect(),
        }
    }
}

impl From<&model::CheckDefinition> for CheckRegistration {
    fn from(c: &model::CheckDefinition) -> Self {
        let mut check = CheckRegistration {
            check_id: c.id.as_ref().map(ToString::to_string),
            name: c.name.clone(),
            notes: c.notes.clone(),
            interval: (!c.interval.is_zero()).then(|| duration::format(c.interval)),
            timeout: c.timeout.map(duration::format),
            status: c.initial_status,
            deregister_critical_service_after: c.deregister_critical_after.map(duration::format),
            success_before_passing: c.success_before_passing,
            failures_before_warning: c.failures_before_warning,
            failures_before_critical: c.failures_before_critical,
            output_max_size: c.output_max_size,
            ..CheckRegistration::default()
        };
        match &c.kind {
            CheckKind::Http {
                url,
                method,
                headers,
                body,
                tls_skip_verify,
                tls_server_name,
                disable_redirects,
            } => {
                check.http = Some(url.clone());
                check.method = Some(method.clone());
                check.header = Some(headers.clone());
                check.body = Some(body.clone());
                check.tls_skip_verify = Some(*tls_skip_verify);
                check.tls_server_name = tls_server_name.clone();
                check.disable_redirects = Some(*disable_redirects);
            }
            CheckKind::Tcp { address } => check.tcp = Some(address.clone()),
            CheckKind::Grpc {
                target,
                use_tls,
                tls_skip_verify,
            } => {
                check.grpc = Some(target.clone());
                check.grpc_use_tls = Some(*use_tls);
                check.tls_skip_verify = Some(*tls_skip_verify);
            }
            CheckKind::Exec { args } => check.args = Some(args.clone()),
            CheckKind::Ttl { ttl } => check.ttl = Some(duration::format(*ttl)),
        }
        check
    }
}

/// `GET /v1/connect/ca/roots` (and the agent's `/v1/agent/connect/ca/roots`):
/// the mesh's trusted roots, never a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CaRootList {
    #[serde(rename = "ActiveRootID")]
    pub active_root_id: String,
    pub trust_domain: String,
    pub roots: Vec<CaRoot>,
}

/// One of a [`CaRootList`]'s roots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CaRoot {
    #[serde(rename = "ID")]
    pub id: String,
    pub name: String,
    pub root_cert: String,
    /// During a rotation, the new root signed by the old one.
    #[serde(default)]
    pub intermediate_certs: Vec<String>,
    pub active: bool,
    pub create_index: u64,
    pub modify_index: u64,
}

/// `GET /v1/agent/connect/ca/leaf/<service>`: a service's certificate
/// and its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct LeafCert {
    /// Colon-separated lowercase hex, as Consul writes it.
    pub serial_number: String,
    /// The certificate, then the chain to a root.
    #[serde(rename = "CertPEM")]
    pub cert_pem: String,
    #[serde(rename = "PrivateKeyPEM")]
    pub private_key_pem: String,
    pub service: String,
    #[serde(rename = "ServiceURI")]
    pub service_uri: String,
    /// RFC 3339.
    pub valid_after: String,
    pub valid_before: String,
    pub create_index: u64,
    pub modify_index: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> Service {
        Service {
            id: "web-1".to_string(),
            service: "web".to_string(),
            tags: vec!["v1".to_string()],
            address: String::new(),
            tagged_addresses: BTreeMap::new(),
            meta: BTreeMap::new(),
            port: 8080,
            weights: Weights {
                passing: 1,
                warning: 1,
            },
            enable_tag_override: false,
            datacenter: None,
            create_index: Some(3),
            modify_index: Some(4),
            content_hash: None,
        }
    }

    #[test]
    fn names_are_consuls_and_empty_collections_are_not_null() {
        let mut check = HealthCheck::new("a", Some(&service()));
        check.check_id = "service:web-1".to_string();
        check.status = Health::Passing;
        let json = serde_json::to_value(&check).unwrap();
        assert_eq!(json["CheckID"], "service:web-1");
        assert_eq!(json["ServiceID"], "web-1");
        assert_eq!(json["ServiceTags"], serde_json::json!(["v1"]));
        assert_eq!(json["Status"], "passing");
        assert_eq!(json["Type"], "");
        assert_eq!(json["Definition"], serde_json::json!({}));
        let back: HealthCheck = serde_json::from_value(json).unwrap();
        assert_eq!(back, check);
        // As a real Consul agent may answer: fields missing, a definition
        // with other types.
        let consul = serde_json::json!({"CheckID": "c", "Status": "warning", "Definition": {"Interval": null, "TLSSkipVerify": true}});
        let read: HealthCheck = serde_json::from_value(consul).unwrap();
        assert_eq!(
            (read.check_id.as_str(), read.status),
            ("c", Health::Warning)
        );
        let json = serde_json::to_value(service()).unwrap();
        assert_eq!(json["ID"], "web-1");
        assert_eq!(json["TaggedAddresses"], serde_json::json!({}));
        assert!(json.get("Datacenter").is_none(), "{json}");
        assert_eq!(json["CreateIndex"], 3);
    }

    #[test]
    fn node_checks_consul_makes_have_no_type() {
        assert_eq!(HealthCheck::consul_type("serf"), "");
        assert_eq!(HealthCheck::consul_type("maintenance"), "");
        assert_eq!(HealthCheck::consul_type("http"), "http");
    }

    #[test]
    fn a_catalog_entry_is_the_node_and_the_service_flat() {
        let node = Node {
            id: "id-a".to_string(),
            node: "a".to_string(),
            address: "10.0.0.1".to_string(),
            datacenter: "dc1".to_string(),
            tagged_addresses: node_tagged_addresses("10.0.0.1"),
            meta: BTreeMap::new(),
            create_index: 1,
            modify_index: 1,
        };
        let entry = serde_json::to_value(CatalogService::new(node, service())).unwrap();
        assert_eq!(entry["Node"], "a");
        assert_eq!(entry["TaggedAddresses"]["wan_ipv4"], "10.0.0.1");
        assert_eq!(entry["ServiceID"], "web-1");
        assert_eq!(entry["ServicePort"], 8080);
        assert_eq!(entry["ServiceWeights"]["Passing"], 1);
        assert_eq!(entry["ServiceConnect"], serde_json::json!({}));
        assert_eq!(entry["ModifyIndex"], 4);
    }
}
