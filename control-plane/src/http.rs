//! The control plane's HTTP API: the fleet's nodes with their liveness,
//! the catalog and health of services in Consul's shapes, and `/metrics`.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use signpost_core::proto::{Check, Instance};

use crate::catalog::{Catalog, NodeEntry};

#[derive(Clone)]
pub struct HttpState {
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub datacenter: String,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/v1/nodes", get(nodes))
        .route("/v1/catalog/services", get(services))
        .route("/v1/health/service/{name}", get(health_service))
        .route("/metrics", get(metrics))
        .with_state(state)
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

async fn nodes(State(s): State<HttpState>) -> Response {
    let (index, body) = s.catalog.read(|inner| {
        let nodes: Vec<Value> = inner
            .nodes
            .values()
            .map(|n| {
                json!({
                    "Node": n.hello.node,
                    "ID": n.hello.node_id,
                    "Address": n.hello.address,
                    "Zone": n.hello.zone,
                    "Datacenter": n.hello.datacenter,
                    "Status": n.status.as_str(),
                    "Version": n.hello.version,
                    "Meta": n.hello.meta,
                    "Services": n.instances.len(),
                })
            })
            .collect();
        (inner.index, Value::Array(nodes))
    });
    json_response(index, &body)
}

async fn services(State(s): State<HttpState>) -> Response {
    let (index, body) = s.catalog.read(|inner| (inner.index, json!(inner.names())));
    json_response(index, &body)
}

fn check(node: &NodeEntry, instance: Option<&Instance>, c: &Check) -> Value {
    json!({
        "Node": node.hello.node,
        "CheckID": c.id,
        "Name": c.name,
        "Status": c.status,
        "Notes": c.notes,
        "Output": c.output,
        "ServiceID": instance.map(|i| i.id.as_str()).unwrap_or(""),
        "ServiceName": instance.map(|i| i.name.as_str()).unwrap_or(""),
        "ServiceTags": instance.map(|i| i.tags.clone()).unwrap_or_default(),
        "Type": c.r#type,
    })
}

async fn health_service(
    State(s): State<HttpState>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let passing = q
        .as_deref()
        .unwrap_or("")
        .split('&')
        .any(|p| p == "passing" || p == "passing=1" || p == "passing=true");
    let datacenter = s.datacenter.clone();
    let (index, body) = s.catalog.read(|inner| {
        let entries: Vec<Value> = inner
            .instances_of(&name)
            .filter_map(|(node, instance)| {
                let live = crate::catalog::liveness(node);
                let checks: Vec<Value> = std::iter::once(&live)
                    .chain(node.node_checks.iter())
                    .map(|c| check(node, None, c))
                    .chain(instance.checks.iter().map(|c| check(node, Some(instance), c)))
                    .collect();
                if passing && checks.iter().any(|c| c["Status"] != "passing") {
                    return None;
                }
                Some(json!({
                    "Node": {
                        "ID": node.hello.node_id,
                        "Node": node.hello.node,
                        "Address": node.hello.address,
                        "Datacenter": datacenter,
                        "Meta": node.hello.meta,
                    },
                    "Service": {
                        "ID": instance.id,
                        "Service": instance.name,
                        "Tags": instance.tags,
                        "Address": instance.address,
                        "Port": instance.port,
                        "Meta": instance.meta,
                        "Weights": {"Passing": instance.weight_passing, "Warning": instance.weight_warning},
                    },
                    "Checks": checks,
                }))
            })
            .collect();
        (inner.service_index(&name), Value::Array(entries))
    });
    json_response(index, &body)
}

async fn metrics(State(s): State<HttpState>) -> Response {
    let body = s.metrics.render(&s.catalog);
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
