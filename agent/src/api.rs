//! The local HTTP API: the part of Consul's agent, catalog, health and
//! status API that real clients use, plus `/metrics` and Signpost's own
//! `/v1/signpost/*` views for the CLI.
//!
//! - `decode`: Consul request bodies (any key casing, snake_case, Go
//!   durations or nanoseconds) into the model.
//! - `render`: the exact JSON shapes clients parse.
//! - `blocking`: `?index=&wait=` blocking queries and the `X-Consul-*`
//!   headers.
//! - `agent_routes`, `catalog`: the handlers.
//! - `connect`: the mesh's agent-local endpoints (roots, a service's
//!   certificate, authorize), from [`crate::mesh`].
//! - `kv`: KV, transactions and sessions (reads from [`crate::kv`]'s
//!   cache, the rest forwarded to the control plane, as are config
//!   entries and intentions).

mod agent_routes;
mod blocking;
mod catalog;
mod connect;
pub(crate) mod decode;
mod forward;
mod kv;
mod render;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use signpost_core::acl::{Access, Resource};
use signpost_daemon::read_filter::ReadFilter;
use signpost_daemon::routes::{Method, Routes};
use signpost_daemon::token::presented;
use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, AgentError};
use crate::state::StateError;

/// What every handler can reach.
#[derive(Clone)]
pub(crate) struct Api {
    pub(crate) agent: Arc<Agent>,
    /// The fleet view, when the agent syncs with a control plane.
    pub(crate) fleet: Option<Arc<crate::fleet::FleetCache>>,
    /// Fired at shutdown, so blocking queries answer at once.
    pub(crate) shutdown: CancellationToken,
    /// For operator actions forwarded to the control plane.
    pub(crate) http: Arc<forward::ControlPlaneHttp>,
    /// Who may do what ([`crate::acl`]).
    pub(crate) acl: Arc<crate::acl::AgentAcl>,
    /// The KV reads this agent caches, when it has a control plane.
    pub(crate) kv: Option<Arc<crate::kv::KvCache>>,
    /// The mesh on this host, when it takes part.
    pub(crate) mesh: Option<Arc<crate::mesh::Mesh>>,
    /// Fired when a new agent process took over (`signpost restart`).
    pub(crate) taken_over: CancellationToken,
}

impl Api {
    /// The request's token, if it may do `needed` on `resource`; else
    /// 403 (the refusal is logged and audited as `action`).
    pub(crate) async fn allow(
        &self,
        headers: &HeaderMap,
        resource: Resource<'_>,
        needed: Access,
        action: &str,
    ) -> ApiResult<Arc<crate::acl::Token>> {
        self.acl
            .check(presented(headers), resource, needed, action)
            .await
            .map_err(refused)
    }

    /// What the request's token may read.
    pub(crate) async fn visible(&self, headers: &HeaderMap) -> ApiResult<ReadFilter> {
        let token = self
            .acl
            .resolve(presented(headers))
            .await
            .map_err(refused)?;
        Ok(ReadFilter::new(token.authorizer.clone()))
    }
}

pub(crate) use forward::{
    ControlPlaneHttp, base_url as control_plane_url, client as control_plane_client,
};

/// A refusal as Consul answers it: 403 with why.
fn refused(refused: crate::acl::Refused) -> ApiError {
    let message = match refused {
        crate::acl::Refused::UnknownToken => {
            "ACL not found: the control plane knows no such token (or cannot be reached to say)"
                .to_string()
        }
        crate::acl::Refused::Forbidden { needs } => {
            format!("Permission denied: this needs {needs}")
        }
    };
    ApiError::new(StatusCode::FORBIDDEN, message)
}

/// An error answered as Consul does: a status and a plain-text message.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.message).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        let status = match &e {
            AgentError::State(StateError::UnknownCheck(_))
            | AgentError::State(StateError::UnknownService(_))
            | AgentError::State(StateError::UnknownServiceForCheck(_)) => StatusCode::NOT_FOUND,
            AgentError::State(StateError::NotTtl(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            AgentError::State(StateError::ServiceOwned { .. })
            | AgentError::State(StateError::CheckOwned { .. }) => StatusCode::CONFLICT,
            AgentError::Invalid(_) | AgentError::ExecDisabled => StatusCode::BAD_REQUEST,
        };
        let message = match &e {
            AgentError::Invalid(signpost_core::model::ModelError::MissingName) => {
                "Missing service name".to_string()
            }
            AgentError::Invalid(signpost_core::model::ModelError::InvalidAddress(..)) => {
                format!("Invalid service address: {e}")
            }
            AgentError::Invalid(signpost_core::model::ModelError::InvalidCheck { .. }) => {
                format!("Invalid check: {e}")
            }
            _ => e.to_string(),
        };
        ApiError::new(status, message)
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// Every route of the local API as (method, path): what a test asks
/// whether each write endpoint refuses a request without a token.
pub fn route_table() -> Vec<(Method, &'static str)> {
    routes().table().to_vec()
}

/// Every route of the local API, with the method it answers.
fn routes() -> Routes<Api> {
    Routes::default()
        // Agent: this host's registrations.
        .put("/v1/agent/service/register", agent_routes::register_service)
        .put(
            "/v1/agent/service/deregister/{id}",
            agent_routes::deregister_service,
        )
        .put(
            "/v1/agent/service/maintenance/{id}",
            agent_routes::service_maintenance,
        )
        .put("/v1/agent/maintenance", agent_routes::node_maintenance)
        .put("/v1/agent/reload", agent_routes::reload)
        .put("/v1/agent/check/register", agent_routes::register_check)
        .put(
            "/v1/agent/check/deregister/{id}",
            agent_routes::deregister_check,
        )
        .put("/v1/agent/check/pass/{id}", agent_routes::check_pass)
        .put("/v1/agent/check/warn/{id}", agent_routes::check_warn)
        .put("/v1/agent/check/fail/{id}", agent_routes::check_fail)
        .put("/v1/agent/check/update/{id}", agent_routes::check_update)
        .get("/v1/agent/services", agent_routes::services)
        .get("/v1/agent/service/{id}", agent_routes::service)
        .get("/v1/agent/checks", agent_routes::checks)
        .get("/v1/agent/self", agent_routes::agent_self)
        .get("/v1/agent/members", agent_routes::members)
        .get(
            "/v1/agent/health/service/name/{name}",
            agent_routes::health_by_name,
        )
        .get(
            "/v1/agent/health/service/id/{id}",
            agent_routes::health_by_id,
        )
        // Catalog, health and status: with a control plane, the service
        // lists and entries answer for the fleet; the rest for this node.
        .get("/v1/status/leader", catalog::leader)
        .get("/v1/status/peers", catalog::peers)
        .get("/v1/catalog/datacenters", catalog::datacenters)
        .get("/v1/catalog/services", catalog::services)
        .get("/v1/catalog/service/{name}", catalog::service)
        .get("/v1/catalog/nodes", catalog::nodes)
        .get("/v1/catalog/node/{node}", catalog::node)
        .get("/v1/health/service/{name}", catalog::health_service)
        .get("/v1/health/checks/{name}", catalog::health_checks)
        .get("/v1/health/state/{state}", catalog::health_state)
        .get("/v1/health/node/{node}", catalog::health_node)
        // Signpost's own.
        .get("/v1/signpost/services", agent_routes::signpost_services)
        .get("/v1/signpost/status", agent_routes::signpost_status)
        .put("/v1/signpost/drain/{id}", agent_routes::signpost_drain)
        .put("/v1/signpost/restart", agent_routes::signpost_restart)
        .get("/v1/signpost/unit/{unit}", agent_routes::signpost_unit)
        // Operator actions: forwarded to the control plane with the
        // caller's token only.
        .on(Method::Any, "/v1/commands", forward::forward)
        .on(Method::Any, "/v1/commands/{id}", forward::forward)
        .on(Method::Any, "/v1/acl/{*rest}", forward::forward)
        .on(Method::Any, "/v1/audit", forward::forward)
        // KV, transactions and sessions: the control plane's store,
        // read through this agent's cache.
        .get("/v1/kv/", kv::get)
        .get("/v1/kv/{*key}", kv::get)
        .put("/v1/kv/{*key}", kv::change)
        .on(Method::Delete, "/v1/kv/", kv::change)
        .on(Method::Delete, "/v1/kv/{*key}", kv::change)
        .put("/v1/txn", kv::txn)
        .put("/v1/session/create", kv::create_session)
        .put("/v1/session/destroy/{id}", kv::destroy_session)
        .put("/v1/session/renew/{id}", kv::pass)
        .get("/v1/session/info/{id}", kv::pass)
        .get("/v1/session/node/{node}", kv::pass)
        .get("/v1/session/list", kv::pass)
        .put("/v1/event/fire/{name}", kv::pass)
        .get("/v1/event/list", kv::list_events)
        // External services (no agent on their host): the control plane's.
        .put("/v1/catalog/register", kv::pass)
        .put("/v1/catalog/deregister", kv::pass)
        // Config entries (service-defaults): the control plane's.
        .put("/v1/config", kv::pass)
        .put("/v1/config/service-defaults/{name}", kv::pass)
        .get("/v1/config/service-defaults", kv::pass)
        .get("/v1/config/service-defaults/{name}", kv::pass)
        .on(
            Method::Delete,
            "/v1/config/service-defaults/{name}",
            kv::pass,
        )
        // The mesh: this host's roots, certificates and verdicts answered
        // here; intentions and the CA are the control plane's.
        .get("/v1/agent/connect/ca/roots", connect::roots)
        .get("/v1/agent/connect/ca/leaf/{service}", connect::leaf)
        .on(
            Method::Post,
            "/v1/agent/connect/authorize",
            connect::authorize,
        )
        .get("/v1/connect/intentions", kv::pass)
        .on(Method::Post, "/v1/connect/intentions", kv::pass)
        .get("/v1/connect/intentions/exact", kv::pass)
        .put("/v1/connect/intentions/exact", kv::pass)
        .on(Method::Delete, "/v1/connect/intentions/exact", kv::pass)
        .get("/v1/connect/intentions/check", kv::pass)
        .get("/v1/connect/intentions/match", kv::pass)
        .get("/v1/connect/intentions/{id}", kv::pass)
        .put("/v1/connect/intentions/{id}", kv::pass)
        .on(Method::Delete, "/v1/connect/intentions/{id}", kv::pass)
        .get("/v1/connect/ca/roots", kv::pass)
        .on(Method::Post, "/v1/connect/ca/rotate", kv::pass)
        .put("/v1/connect/ca/configuration", kv::pass)
        .get("/metrics", metrics)
}

/// The router of the local API.
pub(crate) fn router(api: Api) -> Router {
    routes()
        .into_router()
        .fallback(signpost_daemon::kv_answer::not_served)
        .layer(middleware::from_fn_with_state(api.clone(), count_requests))
        .with_state(api)
}

async fn metrics(State(api): State<Api>, headers: HeaderMap) -> ApiResult<Response> {
    agent_routes::allow_agent_read(&api, &headers, "metrics.read").await?;
    let body = api.agent.metrics.render(&api.agent.state);
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response())
}

async fn count_requests(State(api): State<Api>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let response = next.run(request).await;
    api.agent
        .metrics
        .api_request(method.as_str(), response.status().as_u16());
    response
}

/// Query parameters in order, repeated keys kept, flags with empty values.
pub(crate) struct Params(Vec<(String, String)>);

impl Params {
    pub(crate) fn parse(query: Option<&str>) -> Self {
        let pairs = query
            .map(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        Params(pairs)
    }

    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> {
        self.0
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Consul's presence-based boolean flags (`?passing`, `?passing=1`).
    pub(crate) fn flag(&self, key: &str) -> ApiResult<bool> {
        match self.get(key) {
            None => Ok(false),
            Some("") => Ok(true),
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "1" | "t" | "true" => Ok(true),
                "0" | "f" | "false" => Ok(false),
                _ => Err(ApiError::bad_request(format!("Invalid value for ?{key}"))),
            },
        }
    }
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_keep_flags_and_repeats() {
        let p = Params::parse(Some("passing&tag=a&tag=b%20c&reason=disk+full&x=%zz"));
        assert!(p.flag("passing").unwrap());
        assert!(!p.flag("stale").unwrap());
        assert_eq!(p.all("tag").collect::<Vec<_>>(), ["a", "b c"]);
        assert_eq!(p.get("reason"), Some("disk full"));
        assert_eq!(p.get("x"), Some("%zz"));
        assert!(
            Params::parse(Some("passing=maybe"))
                .flag("passing")
                .is_err()
        );
    }
}
