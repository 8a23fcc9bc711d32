//! Operator actions sent to the agent's local API (`/v1/commands`,
//! `/v1/acl/...`, `/v1/audit`) are forwarded to the control plane's HTTP
//! API (`control_plane.http`), but only with a token: the local API
//! itself needs none for the host's own registrations, so it must never
//! lend the agent's authority to an operator action.

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use super::Api;
use crate::api::ApiError;

/// Largest body forwarded (a command or a token request is small).
const MAX_BODY: usize = 64 * 1024;

pub(crate) async fn forward(State(api): State<Api>, request: Request) -> Response {
    let Some(cp) = api
        .agent
        .config
        .control_plane
        .as_ref()
        .and_then(|c| c.http.clone())
    else {
        return ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "operator actions go to the control plane: set control_plane.http in the agent configuration, or talk to the control plane directly",
        )
        .into_response();
    };
    let headers = request.headers().clone();
    let token = token(&headers);
    if token.is_none() {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "operator actions need a token (X-Consul-Token or Authorization: Bearer); this agent forwards them only with one",
        )
        .into_response();
    }
    let method = request.method().clone();
    let path_and_query = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let body: Bytes = match axum::body::to_bytes(request.into_body(), MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            )
            .into_response();
        }
    };
    let url = format!("http://{cp}{path_and_query}");
    let mut outgoing = api.http.request(
        reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap_or(reqwest::Method::GET),
        url,
    );
    if let Some(token) = token {
        outgoing = outgoing.header("X-Consul-Token", token);
    }
    if let Some(ct) = headers.get("content-type") {
        outgoing = outgoing.header("content-type", ct.as_bytes());
    }
    if method != Method::GET && method != Method::HEAD {
        outgoing = outgoing.body(body);
    }
    match outgoing.send().await {
        Ok(response) => {
            let status =
                StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let content_type = response.headers().get("content-type").cloned();
            let bytes = response.bytes().await.unwrap_or_default();
            let mut answer = (status, bytes).into_response();
            if let Some(ct) = content_type
                && let Ok(value) = axum::http::HeaderValue::from_bytes(ct.as_bytes())
            {
                answer.headers_mut().insert("content-type", value);
            }
            answer
        }
        Err(e) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("cannot reach the control plane at {cp}: {e}"),
        )
        .into_response(),
    }
}

fn token(headers: &HeaderMap) -> Option<String> {
    if let Some(t) = headers.get("x-consul-token").and_then(|v| v.to_str().ok()) {
        return Some(t.trim().to_string());
    }
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string())
}
