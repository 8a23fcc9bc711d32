//! `/v1/catalog/*`, `/v1/health/*` and `/v1/status/*`. A service's
//! instances (`/v1/catalog/service`, `/v1/health/service`) are this node's
//! and the fleet view's; the service names are the fleet's; nodes and
//! checks are this node's (the control plane's API answers for the whole
//! fleet). Every catalog and health read is blocking-capable with
//! per-resource indexes.

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use serde_json::{Value, json};
use signpost_core::consul::{self, CatalogService, HealthCheck};
use signpost_core::model::{Health, has_tags};

use super::blocking::answer;
use super::render::{self, json};
use super::{Api, ApiError, ApiResult, Params};
use axum::http::HeaderMap;
use signpost_daemon::read_filter::ReadFilter;

use crate::fleet::{FleetInner, RemoteInstance};
use crate::state::{Inner, ServiceEntry};

/// This agent, as Consul names its leader: the advertised address with
/// the API's port.
fn self_address(api: &Api) -> String {
    let ip = api.agent.state.read(|inner| inner.node.address.clone());
    match ip.parse::<std::net::IpAddr>() {
        Ok(ip) => std::net::SocketAddr::new(ip, api.agent.config.api.listen.port()).to_string(),
        Err(_) => format!("{ip}:{}", api.agent.config.api.listen.port()),
    }
}

pub(crate) async fn leader(State(api): State<Api>) -> Response {
    json(&Value::String(self_address(&api)))
}

pub(crate) async fn peers(State(api): State<Api>) -> Response {
    json(&json!([self_address(&api)]))
}

pub(crate) async fn datacenters(State(api): State<Api>) -> Response {
    json(&json!([api.agent.config.datacenter]))
}

pub(crate) async fn services(
    State(api): State<Api>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let params = Params::parse(q.as_deref());
    let visible = api.visible(&headers).await?;
    let answered = answer(&api, &params, |inner, fleet| {
        let mut names: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for s in inner.services.values() {
            let tags = names.entry(s.def.name.as_str()).or_default();
            tags.extend(s.def.tags.iter().map(String::as_str));
        }
        if let Some(names_msg) = fleet.and_then(|f| f.names.as_ref()) {
            for (name, tags) in &names_msg.services {
                names
                    .entry(name.as_str())
                    .or_default()
                    .extend(tags.tags.iter().map(String::as_str));
            }
        }
        names.retain(|name, _| visible.service(name));
        let index = inner.index.max(fleet.map_or(0, |f| f.names_index));
        (index, json!(names))
    })
    .await?;
    Ok(visible.answer(answered))
}

/// Instances of `name` carrying every tag in `tags` (compared ignoring
/// case, as Consul's `serviceTagFilter` does), sorted by id.
fn instances<'a>(
    inner: &'a Inner,
    name: &'a str,
    tags: &'a [String],
) -> impl Iterator<Item = &'a ServiceEntry> {
    inner.services.values().filter(move |s| {
        s.def.name.as_str() == name && has_tags(&s.def.tags, tags.iter().map(String::as_str))
    })
}

/// Instances of `name` on other nodes, from the fleet view.
fn remote_instances<'a>(
    inner: &'a Inner,
    fleet: Option<&'a FleetInner>,
    name: &'a str,
    tags: &'a [String],
) -> impl Iterator<Item = &'a RemoteInstance> {
    fleet
        .and_then(|f| f.services.get(name))
        .into_iter()
        .flat_map(|s| s.instances.values())
        .filter(move |r| r.node != inner.node.name && r.has_tags(tags.iter().map(String::as_str)))
}

/// The index of a service across the local state and the fleet view: both
/// draw from the agent's one clock, so the larger grows whenever either
/// part of the answer changes.
fn fleet_index(inner: &Inner, fleet: Option<&FleetInner>, name: &str) -> u64 {
    inner.service_name_index(name).max(
        fleet
            .and_then(|f| f.services.get(name))
            .map_or(0, |s| s.view_index),
    )
}

/// Subscribes to a service on its first use and waits a little for the
/// control plane's snapshot (see [`crate::fleet::FleetCache::first_use`]).
async fn first_use(api: &Api, name: &str) {
    if let (Some(fleet), Some(cp)) = (&api.fleet, &api.agent.config.control_plane) {
        fleet.first_use(name, cp.first_lookup_wait).await;
    }
}

pub(crate) async fn service(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let params = Params::parse(q.as_deref());
    let tags: Vec<String> = params.all("tag").map(str::to_string).collect();
    let visible = api.visible(&headers).await?;
    if !visible.service(&name) {
        return Ok(visible.answer(json(&json!([]))));
    }
    first_use(&api, &name).await;
    let answered = answer(&api, &params, |inner, fleet| {
        let body: Vec<CatalogService> = instances(inner, &name, &tags)
            .filter(|_| visible.node(&inner.node.name))
            .map(|s| render::catalog_service(inner, s))
            .chain(
                remote_instances(inner, fleet, &name, &tags)
                    .filter(|r| visible.node(&r.node))
                    .map(|r| render::remote_catalog_service(inner, r)),
            )
            .collect();
        (fleet_index(inner, fleet, &name), json!(body))
    })
    .await?;
    Ok(visible.answer(answered))
}

pub(crate) async fn nodes(
    State(api): State<Api>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let params = Params::parse(q.as_deref());
    let visible = api.visible(&headers).await?;
    let answered = answer(&api, &params, |inner, _fleet| {
        let nodes: Vec<_> = std::iter::once(render::node(inner))
            .filter(|_| visible.node(&inner.node.name))
            .collect();
        (inner.node_create_index, json!(nodes))
    })
    .await?;
    Ok(visible.answer(answered))
}

pub(crate) async fn node(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(node): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let params = Params::parse(q.as_deref());
    let visible = api.visible(&headers).await?;
    let answered = answer(&api, &params, |inner, _fleet| {
        if inner.node.name != node || !visible.node(&node) {
            return (inner.index, Value::Null);
        }
        let services: BTreeMap<String, consul::Service> = inner
            .services
            .values()
            .filter(|s| visible.service(s.def.name.as_str()))
            .map(|s| (s.def.id.to_string(), render::node_service(inner, s)))
            .collect();
        (
            inner.index,
            json!({"Node": render::node(inner), "Services": services}),
        )
    })
    .await?;
    Ok(visible.answer(answered))
}

pub(crate) async fn health_service(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let params = Params::parse(q.as_deref());
    let passing = params.flag("passing")?;
    let tags: Vec<String> = params.all("tag").map(str::to_string).collect();
    let visible = api.visible(&headers).await?;
    if !visible.service(&name) {
        return Ok(visible.answer(json(&json!([]))));
    }
    first_use(&api, &name).await;
    let answered = answer(&api, &params, |inner, fleet| {
        let remote = remote_instances(inner, fleet, &name, &tags)
            .filter(|r| visible.node(&r.node))
            .filter(|r| !passing || r.all_checks().all(|c| c.status == Health::Passing))
            .map(|r| render::remote_health_entry(inner, r));
        let body: Vec<consul::ServiceEntry> = instances(inner, &name, &tags)
            .filter(|_| visible.node(&inner.node.name))
            .filter(|s| {
                !passing
                    || inner
                        .node_checks()
                        .chain(inner.checks_of(&s.def.id))
                        .all(|c| c.status == Health::Passing)
            })
            .map(|s| render::health_entry(inner, s))
            .chain(remote)
            .collect();
        (fleet_index(inner, fleet, &name), json!(body))
    })
    .await?;
    Ok(visible.answer(answered))
}

pub(crate) async fn health_checks(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let params = Params::parse(q.as_deref());
    let visible = api.visible(&headers).await?;
    if !visible.service(&name) {
        return Ok(visible.answer(json(&json!([]))));
    }
    let answered = answer(&api, &params, |inner, _fleet| {
        let body: Vec<HealthCheck> = inner
            .checks
            .values()
            .filter(|c| {
                inner
                    .service_of_check(c)
                    .is_some_and(|s| s.def.name.as_str() == name)
            })
            .map(|c| render::check(inner, c))
            .collect();
        (inner.service_name_index(&name), json!(body))
    })
    .await?;
    Ok(visible.answer(answered))
}

pub(crate) async fn health_state(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(state): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let visible = api.visible(&headers).await?;
    let params = Params::parse(q.as_deref());
    let wanted: Option<Health> = match state.as_str() {
        "any" => None,
        other => Some(other.parse().map_err(|_| {
            ApiError::bad_request("Invalid state: expected any, passing, warning or critical")
        })?),
    };
    let answered = answer(&api, &params, |inner, _fleet| {
        let body: Vec<HealthCheck> = inner
            .checks
            .values()
            .filter(|c| wanted.is_none_or(|w| c.status == w))
            .filter(|c| visible_check(&visible, inner, c))
            .map(|c| render::check(inner, c))
            .collect();
        (inner.index, json!(body))
    })
    .await?;
    Ok(visible.answer(answered))
}

/// Whether a check of this node may be read: its node, and its service.
fn visible_check(visible: &ReadFilter, inner: &Inner, check: &crate::state::CheckEntry) -> bool {
    visible.node(&inner.node.name)
        && inner
            .service_of_check(check)
            .is_none_or(|s| visible.service(s.def.name.as_str()))
}

pub(crate) async fn health_node(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(node): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let params = Params::parse(q.as_deref());
    let visible = api.visible(&headers).await?;
    let answered = answer(&api, &params, |inner, _fleet| {
        let body: Vec<HealthCheck> = if inner.node.name == node {
            inner
                .checks
                .values()
                .filter(|c| visible_check(&visible, inner, c))
                .map(|c| render::check(inner, c))
                .collect()
        } else {
            Vec::new()
        };
        (inner.index, json!(body))
    })
    .await?;
    Ok(visible.answer(answered))
}
