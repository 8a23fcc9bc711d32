//! Operator actions sent to the agent's local API (`/v1/commands`,
//! `/v1/acl/...`, `/v1/audit`) are forwarded to the control plane's HTTP
//! API (`control_plane.http`), but only with a token: the local API
//! itself needs none for the host's own registrations, so it must never
//! lend the agent's authority to an operator action. Only the control
//! plane's operator paths are forwarded, rebuilt from checked segments:
//! nothing like `/v1/acl/../../metrics` reaches any other path.

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};

use super::Api;
use crate::api::ApiError;

/// Largest body forwarded (a command or a token request is small).
const MAX_BODY: usize = 64 * 1024;

pub(crate) async fn forward(State(api): State<Api>, request: Request) -> Response {
    let headers = request.headers().clone();
    if signpost_daemon::token::presented(&headers).is_none() {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "operator actions need a token (X-Consul-Token or Authorization: Bearer); this agent forwards them only with one",
        )
        .into_response();
    }
    let Some(path) = operator_path(request.uri().path()) else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "not an operator path of the control plane (/v1/commands[/ID], /v1/acl/token[/ID], /v1/acl/tokens, /v1/audit)",
        )
        .into_response();
    };
    let path_and_query = match request.uri().query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let method = request.method().clone();
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
    send(&api, &method, &path_and_query, &headers, body, None).await
}

/// Sends a request to the control plane's HTTP API with the caller's
/// token (if any) and content type, and answers what it answered: the
/// status, the body, its content type and `X-Consul-*` headers.
/// `wait`: a blocking read's longest wait, added to the timeout.
pub(crate) async fn send(
    api: &Api,
    method: &Method,
    path_and_query: &str,
    headers: &axum::http::HeaderMap,
    body: Bytes,
    wait: Option<std::time::Duration>,
) -> Response {
    let Some(cp) = api
        .agent
        .config
        .control_plane
        .as_ref()
        .and_then(|c| c.http.clone())
    else {
        return ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "this goes to the control plane: set control_plane.http in the agent configuration, or talk to the control plane directly",
        )
        .into_response();
    };
    let url = format!("{}{path_and_query}", base_url(&cp));
    let http = match api.http.get() {
        Ok(http) => http,
        Err(e) => {
            return ApiError::new(StatusCode::BAD_GATEWAY, format!("{e:#}")).into_response();
        }
    };
    let mut outgoing = http.request(
        reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap_or(reqwest::Method::GET),
        url,
    );
    if let Some(wait) = wait {
        outgoing = outgoing.timeout(wait + std::time::Duration::from_secs(30));
    }
    if let Some(token) = signpost_daemon::token::presented(headers) {
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
            let kept: Vec<(axum::http::HeaderName, axum::http::HeaderValue)> = response
                .headers()
                .iter()
                .filter(|(name, _)| {
                    *name == "content-type" || name.as_str().starts_with("x-consul-")
                })
                .filter_map(|(name, value)| {
                    Some((
                        axum::http::HeaderName::from_bytes(name.as_str().as_bytes()).ok()?,
                        axum::http::HeaderValue::from_bytes(value.as_bytes()).ok()?,
                    ))
                })
                .collect();
            let bytes = match response.bytes().await {
                Ok(b) => b,
                Err(e) => {
                    return ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        format!("the control plane at {cp} broke off its answer: {e}"),
                    )
                    .into_response();
                }
            };
            let mut answer = (status, bytes).into_response();
            for (name, value) in kept {
                answer.headers_mut().insert(name, value);
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

/// The control plane's HTTP API as configured (`control_plane.http`):
/// `https://` unless it says `http://` (which the configuration allows
/// on loopback only).
pub(crate) fn base_url(configured: &str) -> String {
    if configured.starts_with("https://") || configured.starts_with("http://") {
        configured.trim_end_matches('/').to_string()
    } else {
        format!("https://{configured}")
    }
}

/// The agent's client for the control plane's HTTP API, made again
/// whenever `control_plane.ca_file` changes (copied after the agent
/// started, or a CA being rotated).
pub(crate) struct ControlPlaneHttp {
    ca_file: Option<std::path::PathBuf>,
    /// The CA file's bytes and the client made with them.
    client: std::sync::Mutex<Option<(Vec<u8>, reqwest::Client)>>,
}

impl ControlPlaneHttp {
    pub(crate) fn new(ca_file: Option<std::path::PathBuf>) -> Self {
        ControlPlaneHttp {
            ca_file,
            client: std::sync::Mutex::new(None),
        }
    }

    pub(crate) fn get(&self) -> anyhow::Result<reqwest::Client> {
        use anyhow::Context as _;
        let pem = match &self.ca_file {
            Some(f) => std::fs::read(f)
                .with_context(|| format!("cannot read control_plane.ca_file {}", f.display()))?,
            None => Vec::new(),
        };
        let mut cached = self
            .client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((was, client)) = cached.as_ref()
            && *was == pem
        {
            return Ok(client.clone());
        }
        let client = client(self.ca_file.as_deref())?;
        *cached = Some((pem, client.clone()));
        Ok(client)
    }
}

/// A client for the control plane's HTTP API: it trusts only the
/// control plane's CA (`control_plane.ca_file`).
pub(crate) fn client(ca_file: Option<&std::path::Path>) -> anyhow::Result<reqwest::Client> {
    use anyhow::Context as _;
    crate::tls::install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(30));
    if let Some(ca_file) = ca_file {
        let pem = std::fs::read(ca_file)
            .with_context(|| format!("cannot read control_plane.ca_file {}", ca_file.display()))?;
        // Every CA in it: two while one is rotated.
        let cas = reqwest::Certificate::from_pem_bundle(&pem).with_context(|| {
            format!(
                "control_plane.ca_file {}: not PEM certificates",
                ca_file.display()
            )
        })?;
        if cas.is_empty() {
            anyhow::bail!(
                "control_plane.ca_file {}: no PEM certificate in it",
                ca_file.display()
            );
        }
        builder = builder.tls_certs_only(cas);
    }
    builder
        .build()
        .context("cannot build the HTTP client for the control plane")
}

/// `path` if it is one of the control plane's operator paths, with any
/// ID made only of characters IDs have (no dots, slashes or escapes).
fn operator_path(path: &str) -> Option<String> {
    let id = |s: &str| {
        (1..=128).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let segments: Vec<&str> = path.strip_prefix("/v1/")?.split('/').collect();
    let known = match segments.as_slice() {
        ["commands"]
        | ["audit"]
        | ["acl", "token"]
        | ["acl", "tokens"]
        | ["acl", "policy"]
        | ["acl", "policies"] => true,
        ["commands", x]
        | ["acl", "token", x]
        | ["acl", "policy", x]
        | ["acl", "policy", "name", x] => id(x),
        _ => false,
    };
    known.then(|| format!("/v1/{}", segments.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_operator_paths_are_forwarded() {
        for ok in [
            "/v1/commands",
            "/v1/commands/4f1c-9a_b",
            "/v1/acl/token",
            "/v1/acl/token/self",
            "/v1/acl/tokens",
            "/v1/acl/policies",
            "/v1/acl/policy/name/web-writer",
            "/v1/audit",
        ] {
            assert_eq!(operator_path(ok).as_deref(), Some(ok));
        }
        for bad in [
            "/v1/acl/../../metrics",
            "/v1/acl/token/..",
            "/v1/acl/token/%2e%2e",
            "/v1/acl/token/a%0Ab",
            "/v1/commands/",
            "/v1/commands//x",
            "/v1/acl/token/a/b",
            "/v1/acl/bootstrap",
            "/metrics",
            "/v1/audit/../nodes",
        ] {
            assert_eq!(operator_path(bad), None, "{bad}");
        }
    }
}
