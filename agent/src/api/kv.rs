//! `/v1/kv`, `/v1/txn` and `/v1/session` on the agent: reads answered
//! from the agent's cache ([`crate::kv`]) unless `?consistent`; writes,
//! transactions and sessions forwarded to the control plane with the
//! caller's token (the control plane enforces it), sessions created on
//! this agent's node unless the body names one.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use signpost_core::acl::{Access, Resource};
use signpost_core::kv::{KvQuery, MAX_TXN_BODY, MAX_VALUE, check_key, parse_txn};
use signpost_daemon::kv_answer::{self, text};
use signpost_daemon::token::presented;

use super::Api;
use super::forward::send;
use crate::kv::Fetch;

/// The answer of an agent without a control plane's HTTP API.
fn no_kv() -> Response {
    text(
        StatusCode::NOT_IMPLEMENTED,
        "the KV store is the control plane's: set control_plane.http in the agent configuration",
    )
}

fn path_and_query(path: &str, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    }
}

/// `GET /v1/kv/<key>`.
pub(crate) async fn get(
    State(api): State<Api>,
    key: Option<Path<String>>,
    RawQuery(q): RawQuery,
    request: Request,
) -> Response {
    let key = key.map(|Path(k)| k).unwrap_or_default();
    let headers = request.headers().clone();
    let Some(cache) = api.kv.as_ref() else {
        return no_kv();
    };
    let query = match KvQuery::parse(q.as_deref()) {
        Ok(q) => q,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    let tree = query.recurse || query.keys;
    if let Err(e) = check_key(&key, tree) {
        return text(StatusCode::BAD_REQUEST, e.to_string());
    }
    if query.consistent {
        let wait = query.index.map(|_| query.wait_for());
        let pq = path_and_query(request.uri().path(), request.uri().query());
        return send(&api, &Method::GET, &pq, &headers, Bytes::new(), wait).await;
    }
    if !tree
        && let Err(refused) = api
            .allow(&headers, Resource::Key(&key), Access::Read, "kv.read")
            .await
    {
        return refused.into_response();
    }
    let reader = match api.visible(&headers).await {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    let token = presented(&headers);
    let cached = cache.lookup(&key, tree, token);
    let (mut snapshot, hit) = match cached {
        Some(s) if s.healthy || query.stale => (s, true),
        stale => match cache.fill(&key, tree, token).await {
            Ok(s) => (s, false),
            Err(Fetch::Answered(status, body)) => {
                return text(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                    body,
                );
            }
            // The control plane is out of reach: what the cache has,
            // marked as such, else the error.
            Err(Fetch::Unreachable(why)) => match stale {
                Some(s) => (s, true),
                None => return text(StatusCode::INTERNAL_SERVER_ERROR, why),
            },
        },
    };
    if let Some(after) = query.index
        && snapshot.index <= after
    {
        cache.wait(&key, tree, token, after, query.wait_for()).await;
        if let Some(now) = cache.lookup(&key, tree, token) {
            snapshot = now;
        }
    }
    let mut response = kv_answer::read(
        &query,
        &key,
        snapshot.index,
        snapshot.entries,
        &reader,
        snapshot.fresh,
    );
    if snapshot.filtered {
        response.headers_mut().insert(
            "X-Consul-Results-Filtered-By-ACLs",
            header::HeaderValue::from_static("true"),
        );
    }
    response.headers_mut().insert(
        "X-Cache",
        header::HeaderValue::from_static(if hit { "HIT" } else { "MISS" }),
    );
    response
}

/// Forwards a write, then waits for the cache to show it (the index the
/// control plane answered with) for every key in `keys`.
async fn write(
    api: &Api,
    request: Request,
    limit: usize,
    keys: impl FnOnce(&Bytes) -> Vec<String>,
) -> Response {
    let headers = request.headers().clone();
    let method = request.method().clone();
    let pq = path_and_query(request.uri().path(), request.uri().query());
    let body = match axum::body::to_bytes(request.into_body(), limit).await {
        Ok(b) => b,
        Err(_) => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("Request body too large: the most is {limit} bytes"),
            );
        }
    };
    let touched = keys(&body);
    let response = send(api, &method, &pq, &headers, body, None).await;
    if response.status().is_success()
        && let Some(cache) = api.kv.as_ref()
        && let Some(index) = response
            .headers()
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    {
        for key in touched {
            cache.caught_up(&key, index).await;
        }
    }
    response
}

/// `PUT`/`DELETE /v1/kv/<key>`.
pub(crate) async fn change(
    State(api): State<Api>,
    key: Option<Path<String>>,
    request: Request,
) -> Response {
    let key = key.map(|Path(k)| k).unwrap_or_default();
    if api.kv.is_none() {
        return no_kv();
    }
    write(&api, request, MAX_VALUE, |_| vec![key]).await
}

/// `PUT /v1/txn`.
pub(crate) async fn txn(State(api): State<Api>, request: Request) -> Response {
    if api.kv.is_none() {
        return no_kv();
    }
    write(&api, request, MAX_TXN_BODY, |body| {
        parse_txn(body)
            .map(|ops| {
                ops.into_iter()
                    .filter(|o| o.verb.writes())
                    .map(|o| o.key)
                    .collect()
            })
            .unwrap_or_default()
    })
    .await
}

/// `PUT /v1/session/destroy/<id>`: forwarded; then the cached keys the
/// session held are waited for until they show it gone, so the caller
/// reads them free here.
pub(crate) async fn destroy_session(
    State(api): State<Api>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let held = api.kv.as_ref().map(|c| c.held_by(&id)).unwrap_or_default();
    write(&api, request, 64 * 1024, |_| held).await
}

/// `PUT /v1/session/create`: on this agent's node unless the body says.
pub(crate) async fn create_session(State(api): State<Api>, request: Request) -> Response {
    let headers = request.headers().clone();
    let body = match axum::body::to_bytes(request.into_body(), 64 * 1024).await {
        Ok(b) => b,
        Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large"),
    };
    let mut value = match signpost_core::request::body(&body) {
        Ok(v) => v,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    let Some(fields) = value.as_object_mut() else {
        return text(
            StatusCode::BAD_REQUEST,
            "Request decode failed: the session must be a JSON object",
        );
    };
    if fields
        .get("node")
        .and_then(|n| n.as_str())
        .is_none_or(str::is_empty)
    {
        let node = api.agent.state.read(|inner| inner.node.name.clone());
        fields.insert("node".to_string(), serde_json::Value::String(node));
    }
    let mut headers = headers;
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    send(
        &api,
        &Method::PUT,
        "/v1/session/create",
        &headers,
        Bytes::from(value.to_string()),
        None,
    )
    .await
}

/// The rest of `/v1/session/*`, `/v1/event/fire`, config entries and
/// the mesh's intentions and CA, forwarded as they are (blocking reads
/// with their wait).
pub(crate) async fn pass(
    State(api): State<Api>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    request: Request,
) -> Response {
    let wait = KvQuery::parse(q.as_deref())
        .ok()
        .filter(|q| q.index.is_some())
        .map(|q| q.wait_for())
        .or(Some(Duration::ZERO));
    let method = request.method().clone();
    let pq = path_and_query(request.uri().path(), request.uri().query());
    let body = match axum::body::to_bytes(request.into_body(), 64 * 1024).await {
        Ok(b) => b,
        Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large"),
    };
    send(&api, &method, &pq, &headers, body, wait).await
}

/// `GET /v1/event/list`: the control plane's events that this agent
/// would act on (their node, service and tag filters match this node and
/// its services), blocking as the control plane blocks.
pub(crate) async fn list_events(
    State(api): State<Api>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    request: Request,
) -> Response {
    let answer = pass(State(api.clone()), RawQuery(q), headers, request).await;
    if answer.status() != StatusCode::OK {
        return answer;
    }
    let (mut parts, body) = answer.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 4 * 1024 * 1024).await else {
        return text(
            StatusCode::BAD_GATEWAY,
            "the control plane's event list did not arrive whole",
        );
    };
    let events: Vec<signpost_core::event::UserEvent> = match serde_json::from_slice(&bytes) {
        Ok(e) => e,
        Err(e) => {
            return text(
                StatusCode::BAD_GATEWAY,
                format!("the control plane's event list does not decode: {e}"),
            );
        }
    };
    let (node, services) = api.agent.state.read(|inner| {
        let services: Vec<(String, Vec<String>)> = inner
            .services
            .values()
            .map(|s| (s.def.name.to_string(), s.def.tags.clone()))
            .collect();
        (inner.node.name.clone(), services)
    });
    let mine: Vec<_> = events
        .into_iter()
        .filter(|e| e.matches(&node, &services))
        .collect();
    let body = serde_json::to_vec(&mine).unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}
