//! The answers of `/v1/kv` reads in Consul's shapes, the same from the
//! control plane (its store) and from an agent (its cache): the entries
//! a token may read, as `KVPair`s, `?keys` or `?raw`, a `404` with an
//! empty body when there is nothing, and the headers blocking clients
//! need (`X-Consul-Index`, `X-Consul-KnownLeader`, `X-Consul-LastContact`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use signpost_core::kv::{KvPair, KvQuery, list_keys};

use crate::read_filter::ReadFilter;

/// How fresh an answer is.
#[derive(Debug, Clone, Copy)]
pub struct Freshness {
    /// Whether the answer comes from (or was just confirmed by) the
    /// store's leader: `false` when an agent answers from its cache
    /// without its control plane.
    pub known_leader: bool,
    /// How long since the store last confirmed it (ms).
    pub last_contact_ms: u64,
}

impl Freshness {
    pub const LEADER: Freshness = Freshness {
        known_leader: true,
        last_contact_ms: 0,
    };
}

/// The answer to a read of `key` (a prefix when `recurse` or `keys`).
pub fn read(
    query: &KvQuery,
    key: &str,
    index: u64,
    pairs: Vec<KvPair>,
    filter: &ReadFilter,
    fresh: Freshness,
) -> Response {
    let pairs: Vec<KvPair> = pairs.into_iter().filter(|p| filter.key(&p.key)).collect();
    let mut response = if pairs.is_empty() {
        StatusCode::NOT_FOUND.into_response()
    } else if query.keys {
        let keys = list_keys(
            pairs.iter().map(|p| p.key.as_str()),
            key,
            query.separator.as_deref(),
        );
        json(&keys)
    } else if query.raw && !query.recurse {
        let value = pairs
            .into_iter()
            .next()
            .and_then(|p| p.value)
            .unwrap_or_default();
        ([(header::CONTENT_TYPE, "application/octet-stream")], value).into_response()
    } else {
        json(&pairs)
    };
    headers(&mut response, index, fresh);
    filter.answer(response)
}

/// Sets the blocking and consistency headers.
pub fn headers(response: &mut Response, index: u64, fresh: Freshness) {
    let h = response.headers_mut();
    h.insert("X-Consul-Index", HeaderValue::from(index.max(1)));
    h.insert(
        "X-Consul-KnownLeader",
        HeaderValue::from_static(if fresh.known_leader { "true" } else { "false" }),
    );
    h.insert(
        "X-Consul-LastContact",
        HeaderValue::from(fresh.last_contact_ms),
    );
}

fn json<T: serde::Serialize>(value: &T) -> Response {
    match serde_json::to_string(value) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode: {e}"),
        ),
    }
}

/// An error as Consul's KV endpoints answer them: plain text.
pub fn text(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message.into(),
    )
        .into_response()
}

/// `true`/`false`, as KV writes answer.
pub fn boolean(applied: bool) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        if applied { "true" } else { "false" },
    )
        .into_response()
}

/// A `/v1/...` route this server does not serve: a 501 that every
/// Consul client raises (a bare 404 reads as "no such key" to some).
pub async fn not_served(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    if uri.path().starts_with("/v1/") {
        text(
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "Signpost does not serve {method} {}: it is not part of its Consul-compatible API",
                uri.path()
            ),
        )
    } else {
        text(
            StatusCode::NOT_FOUND,
            format!("no such path: {}", uri.path()),
        )
    }
}
