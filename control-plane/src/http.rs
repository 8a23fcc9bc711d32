//! The control plane's HTTP API: the fleet's nodes with their liveness,
//! the catalog and health of services in Consul's shapes, `/metrics`
//! (all readable without a token), ACL tokens and the audit log
//! ([`acl`], which every write goes through), the KV store ([`kv`]) and
//! the service mesh's intentions and CA ([`mesh`]), and the web console
//! ([`ui`]).

mod acl;
mod commands;
mod external;
mod kv;
mod mesh;
mod ui;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use signpost_core::consul::{self, CatalogService, HealthCheck};
use signpost_core::model::Health;
use signpost_daemon::read_filter::ReadFilter;
use signpost_daemon::routes::{Method, Routes};
use signpost_proto::{Check, Instance};

use crate::catalog::{Catalog, NodeEntry};

#[derive(Clone)]
pub struct HttpState {
    pub catalog: Arc<Catalog>,
    pub acl: Arc<crate::acl::Acl>,
    pub commands: Arc<crate::commands::Commands>,
    pub kv: Arc<crate::kv::Kv>,
    /// Where external nodes (`/v1/catalog/register`) are written on a
    /// shared store; `None`: straight into this replica's catalog.
    pub nodes: Option<Arc<dyn crate::store::Shared>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub datacenter: String,
    /// Where `PUT /v1/acl/bootstrap` looks for the reset file.
    pub data_dir: std::path::PathBuf,
    /// Whether the store takes writes now (a shared store can lose its
    /// quorum; files always do).
    pub quorum: Arc<dyn Fn() -> bool + Send + Sync>,
    /// The mesh's default and shadow mode (`/v1/connect/intentions/check`).
    pub mesh: signpost_core::control_plane_config::MeshCaConfig,
    /// Fires at shutdown: long-lived answers (the console's change
    /// stream) end.
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// An error answer: `{"error": message}`.
pub(crate) fn error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

/// A write the store did not take: 503 when it has no quorum (try again),
/// else 500.
pub(crate) fn store_failed(unavailable: bool, message: String) -> Response {
    if unavailable {
        error(StatusCode::SERVICE_UNAVAILABLE, message)
    } else {
        error(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

/// Every route of the API, with the method it answers.
pub fn routes() -> Routes<HttpState> {
    Routes::default()
        .get("/v1/nodes", nodes)
        .get("/v1/catalog/services", services)
        .get("/v1/health/service/{name}", health_service)
        .get("/v1/catalog/service/{name}", catalog_service)
        .get("/v1/catalog/nodes", catalog_nodes)
        .get("/v1/catalog/node/{node}", catalog_node)
        .get("/v1/health/checks/{name}", health_checks)
        .get("/v1/health/state/{state}", health_state)
        .get("/v1/health/node/{node}", health_node)
        .put("/v1/acl/bootstrap", acl::bootstrap)
        .put("/v1/acl/token", acl::create)
        .get("/v1/acl/tokens", acl::list)
        .get("/v1/acl/token/self", acl::whoami)
        .get("/v1/acl/token/{accessor}", acl::show)
        .on(Method::Delete, "/v1/acl/token/{accessor}", acl::delete)
        .put("/v1/acl/policy", acl::create_policy)
        .get("/v1/acl/policies", acl::policies)
        .get("/v1/acl/policy/{id}", acl::show_policy)
        .get("/v1/acl/policy/name/{name}", acl::show_policy)
        .put("/v1/acl/policy/{id}", acl::update_policy)
        .on(Method::Delete, "/v1/acl/policy/{id}", acl::delete_policy)
        .get("/v1/audit", acl::audit)
        .get("/v1/commands", commands::list)
        .on(Method::Post, "/v1/commands", commands::create)
        .get("/v1/commands/{id}", commands::show)
        .on(Method::Delete, "/v1/commands/{id}", commands::revoke)
        .get("/v1/kv/", kv::get)
        .get("/v1/kv/{*key}", kv::get)
        .put("/v1/kv/{*key}", kv::put)
        .on(Method::Delete, "/v1/kv/", kv::delete)
        .on(Method::Delete, "/v1/kv/{*key}", kv::delete)
        .put("/v1/txn", kv::txn)
        .put("/v1/session/create", kv::create_session)
        .put("/v1/session/destroy/{id}", kv::destroy_session)
        .put("/v1/session/renew/{id}", kv::renew_session)
        .get("/v1/session/info/{id}", kv::session_info)
        .get("/v1/session/node/{node}", kv::node_sessions)
        .get("/v1/session/list", kv::list_sessions)
        .put("/v1/event/fire/{name}", kv::fire_event)
        .get("/v1/event/list", kv::list_events)
        .put("/v1/catalog/register", external::register)
        .put("/v1/catalog/deregister", external::deregister)
        .put("/v1/config", kv::put_config)
        .put("/v1/config/service-defaults/{name}", kv::put_config)
        .get("/v1/config/service-defaults", kv::list_configs)
        .get("/v1/config/service-defaults/{name}", kv::get_config)
        .on(
            Method::Delete,
            "/v1/config/service-defaults/{name}",
            kv::delete_config,
        )
        .get("/v1/connect/intentions", mesh::list)
        .on(Method::Post, "/v1/connect/intentions", mesh::create)
        .get("/v1/connect/intentions/exact", mesh::get_exact)
        .put("/v1/connect/intentions/exact", mesh::put_exact)
        .on(
            Method::Delete,
            "/v1/connect/intentions/exact",
            mesh::delete_exact,
        )
        .get("/v1/connect/intentions/check", mesh::check)
        .get("/v1/connect/intentions/match", mesh::matching)
        .get("/v1/connect/intentions/{id}", mesh::get_by_id)
        .put("/v1/connect/intentions/{id}", mesh::put_by_id)
        .on(
            Method::Delete,
            "/v1/connect/intentions/{id}",
            mesh::delete_by_id,
        )
        .get("/v1/connect/ca/roots", mesh::roots)
        .on(Method::Post, "/v1/connect/ca/rotate", mesh::rotate)
        .put("/v1/connect/ca/configuration", mesh::rotate)
        .get("/metrics", metrics)
        .get("/ui", ui::root)
        .get("/ui/", ui::index)
        .get("/ui/console.js", ui::script)
        .get("/ui/console.css", ui::style)
        .get("/v1/ui/services", ui::services)
        .get("/v1/ui/services/{name}", ui::service)
        .get("/v1/ui/events", ui::events)
}

pub fn router(state: HttpState) -> Router {
    routes()
        .into_router()
        .fallback(signpost_daemon::kv_answer::not_served)
        .with_state(state)
}

/// The request's token's view of a read, or the 401 for an unknown token.
impl axum::extract::FromRequestParts<HttpState> for ReadFilter {
    type Rejection = acl::Refused;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &HttpState,
    ) -> Result<Self, Self::Rejection> {
        let resolved = acl::resolve(s, &parts.headers, "catalog.read")?;
        Ok(ReadFilter::new(Arc::new(resolved.authorizer)))
    }
}

fn unix_ms(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn json_response(index: u64, body: &Value) -> Response {
    let mut response = (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    response
        .headers_mut()
        .insert("X-Consul-Index", HeaderValue::from(index.max(1)));
    response
}

async fn nodes(State(s): State<HttpState>, reader: ReadFilter) -> Response {
    let (index, body) = s.catalog.read(|inner| {
        let nodes: Vec<Value> = inner
            .nodes
            .values()
            .filter(|n| reader.node(&n.hello.node))
            .map(|n| {
                json!({
                    "Node": n.hello.node,
                    "ID": n.hello.node_id,
                    "Address": n.hello.address,
                    "Zone": n.hello.zone,
                    "Datacenter": n.hello.datacenter,
                    "Status": n.liveness.status.as_str(),
                    "Version": n.hello.version,
                    "Meta": n.hello.meta,
                    "Services": n.instances.len(),
                    // Unix ms; for a failed node, since when.
                    "FailedAt": n.liveness.failed_at.map(unix_ms),
                    // When this replica last had its agent's stream.
                    "LastContact": n.session.is_none().then_some(n.last_contact).flatten().map(unix_ms),
                    // Not alive: the peers asked whether they reach it.
                    "Probes": (n.liveness.status != crate::catalog::NodeStatus::Alive)
                        .then(|| inner.last_probes.get(&n.hello.node))
                        .flatten()
                        .map(|round| json!({"At": round.at_unix_ms, "Answers": round.answers})),
                    // On etcd: the replica its agent's stream is on.
                    "Replica": inner.holder_of(&n.hello.node),
                })
            })
            .collect();
        (inner.index, Value::Array(nodes))
    });
    let mut response = reader.answer(json_response(index, &body));
    if let Some(left) = s.catalog.warming_up()
        && let Ok(value) = format!("{:.1}s", left.as_secs_f64()).parse()
    {
        // Started without its catalog: nodes may still be missing.
        response.headers_mut().insert("x-signpost-warm-up", value);
    }
    if !(s.quorum)() {
        // Served from memory: writes are refused until it returns.
        let headers = response.headers_mut();
        headers.insert(
            "x-signpost-store",
            HeaderValue::from_static("no store quorum"),
        );
        headers.insert("X-Consul-KnownLeader", HeaderValue::from_static("false"));
    }
    response
}

async fn services(State(s): State<HttpState>, reader: ReadFilter) -> Response {
    let (index, body) = s.catalog.read(|inner| {
        let names: BTreeMap<&String, &std::collections::BTreeSet<String>> = inner
            .names()
            .iter()
            .filter(|(name, _)| reader.service(name))
            .collect();
        (inner.index, json!(names))
    });
    reader.answer(json_response(index, &body))
}

fn check(node: &NodeEntry, instance: Option<&Instance>, c: &Check) -> HealthCheck {
    let service = instance.map(service_json);
    let mut out = HealthCheck::new(&node.hello.node, service.as_ref());
    out.check_id = c.id.clone();
    out.name = c.name.clone();
    out.status = c.health().unwrap_or(Health::Critical);
    out.notes = c.notes.clone();
    out.output = c.output.clone();
    out.kind = HealthCheck::consul_type(&c.r#type);
    out
}

async fn health_service(
    State(s): State<HttpState>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
    reader: ReadFilter,
) -> Response {
    let visible = reader.service(&name);
    let passing = q
        .as_deref()
        .unwrap_or("")
        .split('&')
        .any(|p| p == "passing" || p == "passing=1" || p == "passing=true");
    let datacenter = s.datacenter.clone();
    let (index, body) = s.catalog.read(|inner| {
        let entries: Vec<consul::ServiceEntry> = inner
            .instances_of(&name)
            .filter(|(node, _)| visible && reader.node(&node.hello.node))
            .filter_map(|(node, instance)| {
                let live = crate::catalog::liveness_check(node);
                let checks: Vec<HealthCheck> = std::iter::once(&live)
                    .chain(node.node_checks.iter())
                    .map(|c| check(node, None, c))
                    .chain(
                        instance
                            .checks
                            .iter()
                            .map(|c| check(node, Some(instance), c)),
                    )
                    .collect();
                if passing && checks.iter().any(|c| c.status != Health::Passing) {
                    return None;
                }
                Some(consul::ServiceEntry {
                    node: node_json(node, &datacenter),
                    service: service_json(instance),
                    checks,
                })
            })
            .collect();
        (inner.service_index(&name), json!(entries))
    });
    reader.answer(json_response(index, &body))
}

async fn metrics(State(s): State<HttpState>) -> Response {
    let root = crate::mesh::load(&s.kv)
        .ok()
        .flatten()
        .and_then(|(ca, _)| ca.active_root().ok().map(|r| r.cert_pem.clone()));
    let body = s
        .metrics
        .render(&s.catalog, &s.commands, (s.quorum)(), root.as_deref());
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

fn node_json(node: &NodeEntry, datacenter: &str) -> consul::Node {
    consul::Node {
        id: node.hello.node_id.clone(),
        node: node.hello.node.clone(),
        address: node.hello.address.clone(),
        datacenter: datacenter.to_string(),
        tagged_addresses: consul::node_tagged_addresses(&node.hello.address),
        meta: node.hello.meta.clone().into_iter().collect(),
        create_index: 0,
        modify_index: 0,
    }
}

fn service_json(instance: &Instance) -> consul::Service {
    consul::Service {
        id: instance.id.clone(),
        service: instance.name.clone(),
        tags: instance.tags.clone(),
        address: instance.address.clone(),
        tagged_addresses: BTreeMap::new(),
        meta: instance.meta.clone().into_iter().collect(),
        port: u16::try_from(instance.port).unwrap_or(0),
        weights: consul::Weights {
            passing: instance.weight_passing,
            warning: instance.weight_warning,
        },
        enable_tag_override: instance.enable_tag_override,
        datacenter: None,
        create_index: Some(0),
        modify_index: Some(0),
        content_hash: None,
    }
}

/// Every check of a node (liveness and node checks) and of its instances.
fn node_checks<'a>(node: &'a NodeEntry) -> impl Iterator<Item = HealthCheck> + 'a {
    let live = crate::catalog::liveness_check(node);
    std::iter::once(check(node, None, &live))
        .chain(node.node_checks.iter().map(move |c| check(node, None, c)))
        .chain(
            node.instances
                .values()
                .flat_map(move |i| i.checks.iter().map(move |c| check(node, Some(i), c))),
        )
}

async fn catalog_service(
    State(s): State<HttpState>,
    Path(name): Path<String>,
    reader: ReadFilter,
) -> Response {
    let visible = reader.service(&name);
    let dc = s.datacenter.clone();
    let (index, body) = s.catalog.read(|inner| {
        let entries: Vec<CatalogService> = inner
            .instances_of(&name)
            .filter(|(node, _)| visible && reader.node(&node.hello.node))
            .map(|(node, i)| CatalogService::new(node_json(node, &dc), service_json(i)))
            .collect();
        (inner.service_index(&name), json!(entries))
    });
    reader.answer(json_response(index, &body))
}

async fn catalog_nodes(State(s): State<HttpState>, reader: ReadFilter) -> Response {
    let (index, body) = s.catalog.read(|inner| {
        let nodes: Vec<consul::Node> = inner
            .nodes
            .values()
            .filter(|n| reader.node(&n.hello.node))
            .map(|n| node_json(n, &s.datacenter))
            .collect();
        (inner.index, json!(nodes))
    });
    reader.answer(json_response(index, &body))
}

async fn catalog_node(
    State(s): State<HttpState>,
    Path(name): Path<String>,
    reader: ReadFilter,
) -> Response {
    let (index, body) = s.catalog.read(|inner| {
        let body = match inner.nodes.get(&name).filter(|_| reader.node(&name)) {
            Some(n) => {
                let services: BTreeMap<String, consul::Service> = n
                    .instances
                    .values()
                    .filter(|i| reader.service(&i.name))
                    .map(|i| (i.id.clone(), service_json(i)))
                    .collect();
                json!({"Node": node_json(n, &s.datacenter), "Services": services})
            }
            None => Value::Null,
        };
        (inner.index, body)
    });
    reader.answer(json_response(index, &body))
}

async fn health_checks(
    State(s): State<HttpState>,
    Path(name): Path<String>,
    reader: ReadFilter,
) -> Response {
    let visible = reader.service(&name);
    let (index, body) = s.catalog.read(|inner| {
        let checks: Vec<HealthCheck> = inner
            .instances_of(&name)
            .filter(|(node, _)| visible && reader.node(&node.hello.node))
            .flat_map(|(node, i)| i.checks.iter().map(move |c| check(node, Some(i), c)))
            .collect();
        (inner.service_index(&name), json!(checks))
    });
    reader.answer(json_response(index, &body))
}

async fn health_state(
    State(s): State<HttpState>,
    Path(state): Path<String>,
    reader: ReadFilter,
) -> Response {
    // Consul's exact names: another spelling is a 400.
    let wanted: Option<Health> = match state.as_str() {
        "any" => None,
        "passing" => Some(Health::Passing),
        "warning" => Some(Health::Warning),
        "critical" => Some(Health::Critical),
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                "Invalid state: expected any, passing, warning or critical",
            )
                .into_response();
        }
    };
    let (index, body) = s.catalog.read(|inner| {
        let checks: Vec<HealthCheck> = inner
            .nodes
            .values()
            .filter(|n| reader.node(&n.hello.node))
            .flat_map(node_checks)
            .filter(|c| wanted.is_none_or(|w| c.status == w))
            .filter(|c| c.service_name.is_empty() || reader.service(&c.service_name))
            .collect();
        (inner.index, json!(checks))
    });
    reader.answer(json_response(index, &body))
}

async fn health_node(
    State(s): State<HttpState>,
    Path(name): Path<String>,
    reader: ReadFilter,
) -> Response {
    let (index, body) = s.catalog.read(|inner| {
        let checks: Vec<HealthCheck> = inner
            .nodes
            .get(&name)
            .filter(|_| reader.node(&name))
            .into_iter()
            .flat_map(node_checks)
            .filter(|c| c.service_name.is_empty() || reader.service(&c.service_name))
            .collect();
        (inner.index, json!(checks))
    });
    reader.answer(json_response(index, &body))
}
