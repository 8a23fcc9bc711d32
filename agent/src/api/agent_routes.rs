//! `/v1/agent/*`: this host's own registrations, checks and maintenance.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use signpost_core::acl::{Access, Resource};
use signpost_core::consul::{self, HealthCheck};
use signpost_core::model::{CheckId, Health, ServiceId};

use super::render::{self, json};
use super::{Api, ApiError, ApiResult, Params, decode};
use crate::agent::Undo;
use crate::state::{CheckRole, Inner, ServiceEntry, Source};

/// Saves the state after an API change: a change that cannot be saved is
/// taken back and answered 500 with the reason, as Consul does, so a 200
/// always means the change survives a restart.
async fn saved(api: &Api, undo: Undo) -> ApiResult<()> {
    match crate::persist::flush(&api.agent).await {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::error!(error = %e, "an API change could not be saved: taken back");
            api.agent.undo(undo);
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                e.to_string(),
            ))
        }
    }
}

/// The name of the service with this ID on this host.
fn service_name(api: &Api, id: &str) -> Option<String> {
    api.agent
        .state
        .read(|inner| inner.services.get(id).map(|s| s.def.name.to_string()))
}

/// What reading (`Read`) or changing (`Write`) service instance `id`
/// needs: that on its service (an unknown ID answers 404 after the same
/// check on its name).
async fn allow_service(
    api: &Api,
    headers: &HeaderMap,
    id: &str,
    needed: Access,
    action: &str,
) -> ApiResult<()> {
    let name = service_name(api, id).unwrap_or_else(|| id.to_string());
    api.allow(headers, Resource::Service(&name), needed, action)
        .await
        .map(drop)
}

/// What changing check `id` needs: write on its service, or on this node
/// for a node check.
async fn allow_check(api: &Api, headers: &HeaderMap, id: &str, action: &str) -> ApiResult<()> {
    let (service, node) = api.agent.state.read(|inner| {
        let service = inner
            .checks
            .get(id)
            .and_then(|c| inner.service_of_check(c))
            .map(|s| s.def.name.to_string());
        (service, inner.node.name.clone())
    });
    let resource = match &service {
        Some(name) => Resource::Service(name),
        None => Resource::Node(&node),
    };
    api.allow(headers, resource, Access::Write, action)
        .await
        .map(drop)
}

pub(crate) async fn register_service(
    State(api): State<Api>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> ApiResult<()> {
    let params = Params::parse(query.as_deref());
    let replace = params.flag("replace-existing-checks")?;
    let def = decode::body(&body).and_then(decode::service);
    match &def {
        Ok(def) => {
            api.allow(
                &headers,
                Resource::Service(def.name.as_str()),
                Access::Write,
                "service.register",
            )
            .await?;
        }
        // A body that names no service needs the node's write to hear why.
        Err(_) => allow_check(&api, &headers, "", "service.register").await?,
    }
    let def = def.map_err(ApiError::bad_request)?;
    // Re-registering an ID must not take over another service's instance.
    if let Some(existing) = service_name(&api, def.id.as_str())
        && existing != def.name.as_str()
    {
        api.allow(
            &headers,
            Resource::Service(&existing),
            Access::Write,
            "service.register",
        )
        .await?;
    }
    let id = def.id.clone();
    let undo = api.agent.undo_service(&id);
    api.agent.register_service(def, Source::Api, replace)?;
    saved(&api, undo).await?;
    tracing::info!(service = %id, "service registered through the API");
    Ok(())
}

pub(crate) async fn deregister_service(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<()> {
    allow_service(&api, &headers, &id, Access::Write, "service.deregister").await?;
    let id = ServiceId::new(id);
    let undo = api.agent.undo_service(&id);
    api.agent.deregister_service(&id, &Source::Api)?;
    saved(&api, undo).await?;
    tracing::info!(service = %id, "service deregistered through the API");
    Ok(())
}

/// `enable` is required; `reason` is optional.
fn maintenance_reason(params: &Params) -> ApiResult<Option<String>> {
    let enable = match params.get("enable") {
        None | Some("") => return Err(ApiError::bad_request("Missing value for enable")),
        // Consul parses it with Go's strconv.ParseBool.
        Some("1" | "t" | "T" | "TRUE" | "true" | "True") => true,
        Some("0" | "f" | "F" | "FALSE" | "false" | "False") => false,
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "Invalid value for enable: {v:?}"
            )));
        }
    };
    Ok(enable.then(|| params.get("reason").unwrap_or("").to_string()))
}

pub(crate) async fn service_maintenance(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<()> {
    allow_service(&api, &headers, &id, Access::Write, "service.maintenance").await?;
    let params = Params::parse(query.as_deref());
    let reason = maintenance_reason(&params)?;
    let id = ServiceId::new(id);
    let undo = api.agent.undo_maintenance(Some(&id));
    api.agent.set_service_maintenance(&id, reason)?;
    saved(&api, undo).await
}

pub(crate) async fn node_maintenance(
    State(api): State<Api>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> ApiResult<()> {
    let node = api.agent.state.read(|inner| inner.node.name.clone());
    api.allow(
        &headers,
        Resource::Node(&node),
        Access::Write,
        "node.maintenance",
    )
    .await?;
    let params = Params::parse(query.as_deref());
    let reason = maintenance_reason(&params)?;
    let undo = api.agent.undo_maintenance(None);
    api.agent.set_node_maintenance(reason);
    saved(&api, undo).await
}

/// Re-reads the configuration file and applies what can change while
/// serving ([`crate::reload`]): 200 with what was applied and what takes a
/// restart, 400 with why a bad file was refused (the configuration in
/// force keeps serving). Needs `agent` write, as in Consul.
pub(crate) async fn reload(State(api): State<Api>, headers: HeaderMap) -> ApiResult<Response> {
    allow_agent_write(&api, &headers, "agent.reload").await?;
    let reloaded = crate::reload::reload(&api.agent, api.fleet.as_deref())
        .await
        .map_err(|e| match e {
            crate::reload::ReloadError::Dns { .. } => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
            _ => ApiError::bad_request(e.to_string()),
        })?;
    Ok(json(&json!({
        "applied": reloaded.applied,
        "restart_required": reloaded.restart_required,
        "unchanged": reloaded.unchanged(),
    })))
}

pub(crate) async fn register_check(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<()> {
    let def = decode::body(&body).and_then(|v| decode::check(v, true));
    // A body that says nothing usable needs the node's write to hear why.
    match def.as_ref().map(|d| (&d.service_id, d.effective_id())) {
        Ok((Some(service), _)) => {
            allow_service(
                &api,
                &headers,
                service.as_str(),
                Access::Write,
                "check.register",
            )
            .await?;
        }
        Ok((None, id)) => allow_check(&api, &headers, id.as_str(), "check.register").await?,
        Err(_) => allow_check(&api, &headers, "", "check.register").await?,
    }
    let def = def.map_err(ApiError::bad_request)?;
    let undo = api.agent.undo_check(&def.effective_id());
    api.agent.register_check(def, Source::Api)?;
    saved(&api, undo).await
}

pub(crate) async fn deregister_check(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<()> {
    allow_check(&api, &headers, &id, "check.deregister").await?;
    let id = CheckId::new(id);
    let undo = api.agent.undo_check(&id);
    api.agent.deregister_check(&id, &Source::Api)?;
    saved(&api, undo).await
}

async fn ttl(
    api: &Api,
    headers: &HeaderMap,
    id: String,
    status: Health,
    query: Option<String>,
) -> ApiResult<()> {
    allow_check(api, headers, &id, "check.update").await?;
    let params = Params::parse(query.as_deref());
    let note = params.get("note").unwrap_or("").to_string();
    api.agent.update_ttl(&CheckId::new(id), status, note)?;
    Ok(())
}

pub(crate) async fn check_pass(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<()> {
    ttl(&api, &headers, id, Health::Passing, q).await
}

pub(crate) async fn check_warn(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<()> {
    ttl(&api, &headers, id, Health::Warning, q).await
}

pub(crate) async fn check_fail(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<()> {
    ttl(&api, &headers, id, Health::Critical, q).await
}

/// `{"Status": "passing|warning|critical", "Output": "..."}`.
pub(crate) async fn check_update(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<()> {
    allow_check(&api, &headers, &id, "check.update").await?;
    let value = decode::body(&body).map_err(ApiError::bad_request)?;
    let status = value
        .get("status")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("Missing Status"))?
        .parse::<Health>()
        .map_err(|_| ApiError::bad_request("Invalid check status"))?;
    let output = value
        .get("output")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    api.agent.update_ttl(&CheckId::new(id), status, output)?;
    Ok(())
}

pub(crate) async fn services(State(api): State<Api>, headers: HeaderMap) -> ApiResult<Response> {
    let visible = api.visible(&headers).await?;
    let body = api.agent.state.read(|inner| {
        let map: BTreeMap<String, consul::Service> = inner
            .services
            .values()
            .filter(|s| visible.service(s.def.name.as_str()))
            .map(|s| (s.def.id.to_string(), render::agent_service(inner, s)))
            .collect();
        map
    });
    Ok(visible.answer(json(&body)))
}

/// One service's definition; `?hash=<X-Consul-ContentHash>&wait=` blocks
/// until the definition changes (Consul's hash-based blocking).
pub(crate) async fn service(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    allow_service(&api, &headers, &id, Access::Read, "service.read").await?;
    let params = Params::parse(q.as_deref());
    let lookup = |inner: &Inner| {
        inner.services.get(id.as_str()).map(|s| {
            let hash = format!("{:016x}", s.modify_index);
            let mut v = render::agent_service(inner, s);
            v.content_hash = Some(hash.clone());
            (hash, v)
        })
    };
    let mut found = api.agent.state.read(lookup);
    if let (Some(wanted), Some((hash, _))) = (params.get("hash"), &found)
        && wanted == hash
    {
        let wait = super::blocking::Blocking::from_params(&api, &params)?.wait();
        let mut changes = api.agent.state.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                _ = api.shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(deadline) => break,
                changed = changes.changed() => if changed.is_err() { break },
            }
            found = api.agent.state.read(lookup);
            if found.as_ref().is_none_or(|(h, _)| h != wanted) {
                break;
            }
        }
    }
    match found {
        Some((hash, body)) => {
            let mut response = json(&body);
            if let Ok(v) = axum::http::HeaderValue::from_str(&hash) {
                response.headers_mut().insert("X-Consul-ContentHash", v);
            }
            Ok(response)
        }
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown service ID: {id}"),
        )),
    }
}

/// The checks this agent registered. `serfHealth` is not one of them: in
/// Consul it is the cluster's view of the node, shown by the catalog and
/// health endpoints only, and clients expect `{}` from a fresh agent.
pub(crate) async fn checks(State(api): State<Api>, headers: HeaderMap) -> ApiResult<Response> {
    let visible = api.visible(&headers).await?;
    let body = api.agent.state.read(|inner| {
        let map: BTreeMap<String, HealthCheck> = inner
            .checks
            .values()
            .filter(|c| !matches!(c.role, CheckRole::NodeHealth))
            .filter(|c| match inner.service_of_check(c) {
                Some(s) => visible.service(s.def.name.as_str()),
                None => visible.node(&inner.node.name),
            })
            .map(|c| (c.id.to_string(), render::check(inner, c)))
            .collect();
        map
    });
    Ok(visible.answer(json(&body)))
}

/// What reading this agent's own view needs: `agent` read on its node.
pub(crate) async fn allow_agent_read(
    api: &Api,
    headers: &HeaderMap,
    action: &str,
) -> ApiResult<()> {
    allow_agent(api, headers, Access::Read, action).await
}

/// What acting on the agent itself (reload, restart) needs: `agent`
/// write on its node.
async fn allow_agent_write(api: &Api, headers: &HeaderMap, action: &str) -> ApiResult<()> {
    allow_agent(api, headers, Access::Write, action).await
}

async fn allow_agent(
    api: &Api,
    headers: &HeaderMap,
    access: Access,
    action: &str,
) -> ApiResult<()> {
    let node = api.agent.state.read(|inner| inner.node.name.clone());
    api.allow(headers, Resource::Agent(&node), access, action)
        .await
        .map(drop)
}

pub(crate) async fn agent_self(State(api): State<Api>, headers: HeaderMap) -> ApiResult<Response> {
    allow_agent_read(&api, &headers, "agent.read").await?;
    let config = &api.agent.config;
    let body = api.agent.state.read(|inner| {
        json!({
            "Config": {
                "Datacenter": inner.node.datacenter,
                "NodeName": inner.node.name,
                "NodeID": inner.node.id,
                "Server": false,
                "Revision": "",
                "Version": env!("CARGO_PKG_VERSION"),
            },
            "DebugConfig": {
                "Zone": inner.node.zone,
                "DataDir": config.data_dir,
                "ServicesDir": config.services_dir,
                "APIListen": config.api.listen.to_string(),
            },
            "Coord": null,
            "Member": member(inner, config.api.listen.port()),
            "Meta": inner.node.meta,
            "Stats": {},
            "xDS": null,
        })
    });
    Ok(json(&body))
}

fn member(inner: &Inner, port: u16) -> Value {
    json!({
        "Name": inner.node.name,
        "Addr": inner.node.address,
        "Port": port,
        "Tags": {"dc": inner.node.datacenter, "role": "node", "zone": inner.node.zone},
        "Status": 1,
    })
}

pub(crate) async fn members(State(api): State<Api>, headers: HeaderMap) -> ApiResult<Response> {
    let visible = api.visible(&headers).await?;
    let port = api.agent.config.api.listen.port();
    let body = api.agent.state.read(|inner| {
        let members: Vec<Value> = std::iter::once(member(inner, port))
            .filter(|_| visible.node(&inner.node.name))
            .collect();
        json!(members)
    });
    Ok(visible.answer(json(&body)))
}

fn aggregate(inner: &Inner, entry: &ServiceEntry) -> (&'static str, Value) {
    let status = render::aggregated_status(inner, entry);
    let checks: Vec<HealthCheck> = inner
        .node_checks()
        .chain(inner.checks_of(&entry.def.id))
        .map(|c| render::check(inner, c))
        .collect();
    let body = json!({
        "AggregatedStatus": status,
        "Service": render::agent_service(inner, entry),
        "Checks": checks,
    });
    (status, body)
}

fn status_code(status: &str) -> StatusCode {
    match status {
        "passing" => StatusCode::OK,
        "warning" => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn health_response(status: &'static str, body: Value, text: bool) -> Response {
    let code = status_code(status);
    if text {
        (code, status).into_response()
    } else {
        let mut response = json(&body);
        *response.status_mut() = code;
        response
    }
}

/// Aggregated health of every instance of a service on this host: the
/// status code is the worst of them (200/429/503), 404 if none.
pub(crate) async fn health_by_name(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    api.allow(
        &headers,
        Resource::Service(&name),
        Access::Read,
        "service.health",
    )
    .await?;
    let text = Params::parse(q.as_deref()).get("format") == Some("text");
    let found = api.agent.state.read(|inner| {
        let entries: Vec<(&'static str, Value)> = inner
            .services
            .values()
            .filter(|s| s.def.name.as_str() == name)
            .map(|s| aggregate(inner, s))
            .collect();
        if entries.is_empty() {
            return None;
        }
        let rank = |s: &str| match s {
            "passing" => 0,
            "warning" => 1,
            "critical" => 2,
            _ => 3,
        };
        let worst = entries
            .iter()
            .map(|(s, _)| *s)
            .max_by_key(|s| rank(s))
            .unwrap_or("passing");
        Some((
            worst,
            Value::Array(entries.into_iter().map(|(_, v)| v).collect()),
        ))
    });
    match found {
        Some((status, body)) => Ok(health_response(status, body, text)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("ServiceName {name} Not Found"),
        )),
    }
}

pub(crate) async fn health_by_id(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    allow_service(&api, &headers, &id, Access::Read, "service.health").await?;
    let text = Params::parse(q.as_deref()).get("format") == Some("text");
    let found = api
        .agent
        .state
        .read(|inner| inner.services.get(id.as_str()).map(|s| aggregate(inner, s)));
    match found {
        Some((status, body)) => Ok(health_response(status, body, text)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("ServiceId {id} Not Found"),
        )),
    }
}

/// Signpost's view for `signpost services`: each service with its status
/// and where it came from, and the service files with their errors.
pub(crate) async fn signpost_services(
    State(api): State<Api>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    allow_agent_read(&api, &headers, "agent.read").await?;
    let services = api.agent.state.read(|inner| {
        inner
            .services
            .values()
            .map(|s| {
                let (source, file) = match &s.source {
                    Source::File(p) => ("file", Some(p.display().to_string())),
                    Source::Api => ("api", None),
                };
                json!({
                    "id": s.def.id,
                    "name": s.def.name,
                    "address": if s.def.address.is_empty() { &inner.node.address } else { &s.def.address },
                    "port": s.def.port,
                    "tags": s.def.tags,
                    "protocol": s.def.protocol.as_str(),
                    "status": render::aggregated_status(inner, s),
                    "checks": inner.checks_of(&s.def.id).count(),
                    "source": source,
                    "file": file,
                })
            })
            .collect::<Vec<_>>()
    });
    let files: Vec<Value> = api
        .agent
        .file_reports()
        .into_iter()
        .map(|(path, report)| {
            json!({
                "path": path.display().to_string(),
                "services": report.services,
                "error": report.error,
            })
        })
        .collect();
    Ok(json(&json!({"services": services, "files": files})))
}

/// Signpost's view for `signpost status`: this node, its checks, and how
/// fresh its view of the fleet is.
pub(crate) async fn signpost_status(
    State(api): State<Api>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    allow_agent_read(&api, &headers, "agent.read").await?;
    let (node, services, mut counts) = api.agent.state.read(|inner| {
        let mut counts = serde_json::Map::new();
        for check in inner.checks.values() {
            let n = counts
                .entry(check.status.as_str())
                .or_insert(Value::from(0u64));
            *n = Value::from(n.as_u64().unwrap_or(0) + 1);
        }
        (inner.node.name.clone(), inner.services.len(), counts)
    });
    for status in ["passing", "warning", "critical"] {
        counts.entry(status).or_insert(Value::from(0u64));
    }
    let control_plane = match (&api.fleet, &api.agent.config.control_plane) {
        (Some(fleet), Some(cp)) => fleet.read(|f| {
            let mut subscriptions: Vec<&String> = f.subscriptions.keys().collect();
            subscriptions.sort();
            json!({
                "addresses": cp.addresses,
                "connected": f.connected,
                "last_contact_ms": f.last_contact.map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)),
                "subscriptions": subscriptions,
            })
        }),
        _ => Value::Null,
    };
    Ok(json(&json!({
        "node": node,
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "services": services,
        "checks": counts,
        "control_plane": control_plane,
    })))
}

/// The instances whose service file names `unit` (`drain: {unit: …}`),
/// with how long each may take to drain: what `signpost drain --self`
/// and `signpost maint --self` act on. Instances the token may not read
/// are left out.
pub(crate) async fn signpost_unit(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(unit): Path<String>,
) -> ApiResult<Response> {
    let instances: Vec<(String, String, std::time::Duration)> = api.agent.state.read(|inner| {
        inner
            .services
            .values()
            .filter_map(|s| {
                let drain = s.def.drain.as_ref().filter(|d| d.unit == unit)?;
                Some((s.def.id.to_string(), s.def.name.to_string(), drain.timeout))
            })
            .collect()
    });
    let mut visible = Vec::new();
    for (id, name, timeout) in instances {
        let allowed = api
            .allow(
                &headers,
                Resource::Service(&name),
                Access::Read,
                "service.read",
            )
            .await
            .is_ok();
        if allowed {
            visible.push(json!({
                "id": id,
                "timeout": signpost_core::duration::format(timeout),
            }));
        }
    }
    Ok(json(&json!({ "unit": unit, "instances": visible })))
}

/// `signpost restart`: a new agent process (the program now at this one's
/// path) takes over the sockets and state; answered once it serves,
/// with its pid. This process then drains and exits.
pub(crate) async fn signpost_restart(
    State(api): State<Api>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    allow_agent_write(&api, &headers, "agent.restart").await?;
    match crate::handover::restart(&api.taken_over).await {
        Ok(pid) => Ok(json(&json!({ "pid": pid }))),
        Err(error @ crate::handover::RestartError::Busy) => {
            Err(ApiError::new(StatusCode::CONFLICT, error.to_string()))
        }
        Err(error) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            error.to_string(),
        )),
    }
}

/// `signpost drain`: puts an instance in maintenance, then waits until every
/// agent subscribed to its service applied the change (or the timeout).
pub(crate) async fn signpost_drain(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    allow_service(&api, &headers, &id, Access::Write, "service.drain").await?;
    let params = Params::parse(q.as_deref());
    let timeout = match params.get("timeout") {
        None | Some("") => std::time::Duration::from_secs(30),
        Some(t) => signpost_core::duration::parse(t)
            .map_err(|e| ApiError::bad_request(format!("Invalid timeout: {e}")))?,
    };
    let service_id = ServiceId::new(id);
    // The instance as consumers' proxies know it.
    let (name, address) = api
        .agent
        .state
        .read(|inner| {
            inner.services.get(&service_id).map(|s| {
                let address =
                    crate::drain::instance_address(&s.def.address, &inner.node.address, s.def.port);
                (s.def.name.to_string(), address)
            })
        })
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("Unknown service ID \"{service_id}\""),
            )
        })?;
    api.agent
        .set_service_maintenance(&service_id, Some("Draining (signpost drain)".to_string()))?;
    tracing::info!(service = %service_id, %address, ?timeout, "draining");
    let Some(fleet) = &api.fleet else {
        return Ok(json(&json!({
            "service": name, "id": service_id, "subscribers": 0, "acknowledged": 0,
            "complete": true, "control_plane": false,
        })));
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let last = crate::drain::wait(fleet, &name, &address, deadline, &api.shutdown).await;
    let complete = crate::drain::drained(last.as_ref());
    let (subscribers, acknowledged, pending, in_flight) = match last {
        Some(s) => {
            let in_flight: Vec<Value> = s
                .in_flight
                .iter()
                .map(|f| json!({"node": f.node, "count": f.count}))
                .collect();
            (s.subscribers, s.acked, s.pending, in_flight)
        }
        None => (0, 0, Vec::new(), Vec::new()),
    };
    tracing::info!(service = %service_id, complete, acknowledged, subscribers, "drain finished");
    Ok(json(&json!({
        "service": name, "id": service_id, "address": address,
        "subscribers": subscribers, "acknowledged": acknowledged, "pending": pending,
        "in_flight": in_flight, "complete": complete, "control_plane": true,
    })))
}
