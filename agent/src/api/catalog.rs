//! `/v1/catalog/*`, `/v1/health/*` and `/v1/status/*`. Until the control
//! plane exists these answer for this node; all catalog and health reads
//! are blocking-capable with per-resource indexes.

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use serde_json::{Value, json};
use signpost_core::model::Health;

use super::blocking::answer;
use super::render::{self, json};
use super::{Api, ApiError, ApiResult, Params};
use crate::state::{Inner, ServiceEntry};

pub(crate) async fn leader(State(api): State<Api>) -> Response {
    let leader = format!(
        "{}:{}",
        api.agent.config.advertise_addr,
        api.agent.config.api.listen.port()
    );
    json(&Value::String(leader))
}

pub(crate) async fn peers(State(api): State<Api>) -> Response {
    let peer = format!(
        "{}:{}",
        api.agent.config.advertise_addr,
        api.agent.config.api.listen.port()
    );
    json(&json!([peer]))
}

pub(crate) async fn datacenters(State(api): State<Api>) -> Response {
    json(&json!([api.agent.config.datacenter]))
}

pub(crate) async fn services(State(api): State<Api>, RawQuery(q): RawQuery) -> ApiResult<Response> {
    let params = Params::parse(q.as_deref());
    answer(&api, &params, |inner| {
        let mut names: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for s in inner.services.values() {
            let tags = names.entry(s.def.name.as_str()).or_default();
            tags.extend(s.def.tags.iter().map(String::as_str));
        }
        (inner.index, json!(names))
    })
    .await
}

/// Instances of `name` carrying every tag in `tags` (compared ignoring
/// case, as Consul's `serviceTagFilter` does), sorted by id.
fn instances<'a>(
    inner: &'a Inner,
    name: &'a str,
    tags: &'a [String],
) -> impl Iterator<Item = &'a ServiceEntry> {
    inner.services.values().filter(move |s| {
        s.def.name.as_str() == name
            && tags.iter().all(|t| {
                let t = t.to_lowercase();
                s.def.tags.iter().any(|have| have.to_lowercase() == t)
            })
    })
}

pub(crate) async fn service(
    State(api): State<Api>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let params = Params::parse(q.as_deref());
    let tags: Vec<String> = params.all("tag").map(str::to_string).collect();
    answer(&api, &params, |inner| {
        let body: Vec<Value> = instances(inner, &name, &tags)
            .map(|s| render::catalog_service(inner, s))
            .collect();
        (inner.service_name_index(&name), Value::Array(body))
    })
    .await
}

pub(crate) async fn nodes(State(api): State<Api>, RawQuery(q): RawQuery) -> ApiResult<Response> {
    let params = Params::parse(q.as_deref());
    answer(&api, &params, |inner| {
        (inner.node_create_index, json!([render::node(inner)]))
    })
    .await
}

pub(crate) async fn node(
    State(api): State<Api>,
    Path(node): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let params = Params::parse(q.as_deref());
    answer(&api, &params, |inner| {
        if inner.node.name != node {
            return (inner.index, Value::Null);
        }
        let services: serde_json::Map<String, Value> = inner
            .services
            .values()
            .map(|s| (s.def.id.to_string(), render::node_service(s)))
            .collect();
        (
            inner.index,
            json!({"Node": render::node(inner), "Services": services}),
        )
    })
    .await
}

pub(crate) async fn health_service(
    State(api): State<Api>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let params = Params::parse(q.as_deref());
    let passing = params.flag("passing")?;
    let tags: Vec<String> = params.all("tag").map(str::to_string).collect();
    answer(&api, &params, |inner| {
        let body: Vec<Value> = instances(inner, &name, &tags)
            .filter(|s| {
                !passing
                    || inner
                        .node_checks()
                        .chain(inner.checks_of(&s.def.id))
                        .all(|c| c.status == Health::Passing)
            })
            .map(|s| render::health_entry(inner, s))
            .collect();
        (inner.service_name_index(&name), Value::Array(body))
    })
    .await
}

pub(crate) async fn health_checks(
    State(api): State<Api>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let params = Params::parse(q.as_deref());
    answer(&api, &params, |inner| {
        let body: Vec<Value> = inner
            .checks
            .values()
            .filter(|c| {
                inner
                    .service_of_check(c)
                    .is_some_and(|s| s.def.name.as_str() == name)
            })
            .map(|c| render::check(inner, c))
            .collect();
        (inner.service_name_index(&name), Value::Array(body))
    })
    .await
}

pub(crate) async fn health_state(
    State(api): State<Api>,
    Path(state): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let params = Params::parse(q.as_deref());
    let wanted: Option<Health> = match state.as_str() {
        "any" => None,
        other => Some(other.parse().map_err(|_| {
            ApiError::bad_request("Invalid state: expected any, passing, warning or critical")
        })?),
    };
    answer(&api, &params, |inner| {
        let body: Vec<Value> = inner
            .checks
            .values()
            .filter(|c| wanted.is_none_or(|w| c.status == w))
            .map(|c| render::check(inner, c))
            .collect();
        (inner.index, Value::Array(body))
    })
    .await
}

pub(crate) async fn health_node(
    State(api): State<Api>,
    Path(node): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let params = Params::parse(q.as_deref());
    answer(&api, &params, |inner| {
        let body: Vec<Value> = if inner.node.name == node {
            inner
                .checks
                .values()
                .map(|c| render::check(inner, c))
                .collect()
        } else {
            Vec::new()
        };
        (inner.index, Value::Array(body))
    })
    .await
}
