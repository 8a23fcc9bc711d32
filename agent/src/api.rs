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

mod agent_routes;
mod blocking;
mod catalog;
pub(crate) mod decode;
mod forward;
mod render;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, put};
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
    pub(crate) http: reqwest::Client,
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

/// The router of the local API.
pub(crate) fn router(api: Api) -> Router {
    Router::new()
        // Agent: this host's registrations.
        .route(
            "/v1/agent/service/register",
            put(agent_routes::register_service),
        )
        .route(
            "/v1/agent/service/deregister/{id}",
            put(agent_routes::deregister_service),
        )
        .route(
            "/v1/agent/service/maintenance/{id}",
            put(agent_routes::service_maintenance),
        )
        .route("/v1/agent/maintenance", put(agent_routes::node_maintenance))
        .route(
            "/v1/agent/check/register",
            put(agent_routes::register_check),
        )
        .route(
            "/v1/agent/check/deregister/{id}",
            put(agent_routes::deregister_check),
        )
        .route("/v1/agent/check/pass/{id}", put(agent_routes::check_pass))
        .route("/v1/agent/check/warn/{id}", put(agent_routes::check_warn))
        .route("/v1/agent/check/fail/{id}", put(agent_routes::check_fail))
        .route(
            "/v1/agent/check/update/{id}",
            put(agent_routes::check_update),
        )
        .route("/v1/agent/services", get(agent_routes::services))
        .route("/v1/agent/service/{id}", get(agent_routes::service))
        .route("/v1/agent/checks", get(agent_routes::checks))
        .route("/v1/agent/self", get(agent_routes::agent_self))
        .route("/v1/agent/members", get(agent_routes::members))
        .route(
            "/v1/agent/health/service/name/{name}",
            get(agent_routes::health_by_name),
        )
        .route(
            "/v1/agent/health/service/id/{id}",
            get(agent_routes::health_by_id),
        )
        // Catalog, health and status: with a control plane, the service
        // lists and entries answer for the fleet; the rest for this node.
        .route("/v1/status/leader", get(catalog::leader))
        .route("/v1/status/peers", get(catalog::peers))
        .route("/v1/catalog/datacenters", get(catalog::datacenters))
        .route("/v1/catalog/services", get(catalog::services))
        .route("/v1/catalog/service/{name}", get(catalog::service))
        .route("/v1/catalog/nodes", get(catalog::nodes))
        .route("/v1/catalog/node/{node}", get(catalog::node))
        .route("/v1/health/service/{name}", get(catalog::health_service))
        .route("/v1/health/checks/{name}", get(catalog::health_checks))
        .route("/v1/health/state/{state}", get(catalog::health_state))
        .route("/v1/health/node/{node}", get(catalog::health_node))
        // Signpost's own.
        .route(
            "/v1/signpost/services",
            get(agent_routes::signpost_services),
        )
        .route("/v1/signpost/status", get(agent_routes::signpost_status))
        .route("/v1/signpost/drain/{id}", put(agent_routes::signpost_drain))
        // Operator actions: forwarded to the control plane with the
        // caller's token only.
        .route("/v1/commands", any(forward::forward))
        .route("/v1/commands/{id}", any(forward::forward))
        .route("/v1/acl/{*rest}", any(forward::forward))
        .route("/v1/audit", any(forward::forward))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(api.clone(), count_requests))
        .with_state(api)
}

async fn metrics(State(api): State<Api>) -> Response {
    let body = api.agent.metrics.render(&api.agent.state);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "404 page not found")
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
