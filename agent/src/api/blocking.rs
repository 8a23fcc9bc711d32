//! Blocking queries: `?index=N&wait=D` holds the request until the
//! resource's index differs from `N` or the wait runs out, then answers
//! with `X-Consul-Index` and the staleness headers.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde_json::Value;

use super::{Api, ApiError, ApiResult, Params};
use crate::fleet::FleetInner;
use crate::state::Inner;

/// The parsed `index`/`wait` pair of a request.
pub(crate) struct Blocking {
    index: Option<u64>,
    wait: Duration,
}

impl Blocking {
    pub(crate) fn from_params(api: &Api, params: &Params) -> ApiResult<Self> {
        let index = match params.get("index") {
            None | Some("") => None,
            Some(v) => Some(
                v.parse::<u64>()
                    .map_err(|_| ApiError::bad_request("Invalid index"))?,
            ),
        };
        let config = api.agent.live.config();
        let wait = match params.get("wait") {
            None | Some("") => config.api.default_query_time,
            Some(v) => signpost_core::duration::parse(v)
                .map_err(|_| ApiError::bad_request("Invalid wait time"))?,
        }
        .min(config.api.max_query_time);
        Ok(Blocking { index, wait })
    }

    pub(crate) fn wait(&self) -> Duration {
        self.wait
    }

    /// When a blocked request answers anyway: after its wait, plus up to
    /// wait/16 of jitter, as Consul adds so that many watchers of one
    /// resource do not all come back at the same moment.
    fn deadline(&self) -> tokio::time::Instant {
        let jitter = self.wait / 16;
        let extra = if jitter.is_zero() {
            Duration::ZERO
        } else {
            rand::rng().random_range(Duration::ZERO..jitter)
        };
        tokio::time::Instant::now() + self.wait + extra
    }
}

/// Answers `compute` (which returns the resource's index and its body),
/// blocking first if the client asked to.
pub(crate) async fn answer(
    api: &Api,
    params: &Params,
    compute: impl Fn(&Inner, Option<&FleetInner>) -> (u64, Value),
) -> ApiResult<Response> {
    check_datacenter(api, params)?;
    let blocking = Blocking::from_params(api, params)?;
    let mut changes = api.agent.state.subscribe();
    let mut fleet_changes = api.fleet.as_ref().map(|f| f.subscribe_changes());
    // Local state first, then the fleet view: the one lock order.
    let read = || {
        api.agent.state.read(|inner| match &api.fleet {
            Some(fleet) => fleet.read(|f| compute(inner, Some(f))),
            None => compute(inner, None),
        })
    };
    let (index, body) = read();
    let (index, body) = match blocking.index {
        Some(min) if min > 0 && index == min => {
            let deadline = blocking.deadline();
            loop {
                tokio::select! {
                    _ = api.shutdown.cancelled() => break,
                    _ = tokio::time::sleep_until(deadline) => break,
                    changed = changes.changed() => if changed.is_err() { break },
                    changed = async {
                        match &mut fleet_changes {
                            Some(rx) => rx.changed().await,
                            None => std::future::pending().await,
                        }
                    } => if changed.is_err() { break },
                }
                let (index, _) = read();
                if index != min {
                    break;
                }
            }
            read()
        }
        _ => (index, body),
    };
    let mut response = json_with_index(index.max(1), &body);
    if let Some(fleet) = &api.fleet {
        // How fresh the fleet view is: Consul's staleness headers.
        let (connected, last_contact) = fleet.read(|f| (f.connected, f.last_contact));
        let headers = response.headers_mut();
        headers.insert(
            "X-Consul-KnownLeader",
            HeaderValue::from_static(if connected { "true" } else { "false" }),
        );
        let ms = if connected {
            0
        } else {
            last_contact.map_or(0, |t| {
                u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
            })
        };
        headers.insert("X-Consul-LastContact", HeaderValue::from(ms));
    }
    Ok(response)
}

/// Answers `compute` (the resource's index and body, or why it cannot)
/// for a resource outside the agent's state, blocking first if the
/// client asked to: `changes` ticks whenever the resource may have
/// changed (subscribed before the first read, so nothing is missed).
pub(crate) async fn answer_watching(
    api: &Api,
    params: &Params,
    mut changes: tokio::sync::watch::Receiver<u64>,
    compute: impl Fn() -> ApiResult<(u64, Value)>,
) -> ApiResult<Response> {
    check_datacenter(api, params)?;
    let blocking = Blocking::from_params(api, params)?;
    let (mut index, mut body) = compute()?;
    if let Some(min) = blocking.index.filter(|&min| min > 0 && min == index) {
        let deadline = blocking.deadline();
        loop {
            tokio::select! {
                _ = api.shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(deadline) => break,
                changed = changes.changed() => if changed.is_err() { break },
            }
            (index, body) = compute()?;
            if index != min {
                break;
            }
        }
    }
    Ok(json_with_index(index.max(1), &body))
}

/// Consul answers 500 "No path to datacenter" for a datacenter it does not
/// know; we know only our own.
pub(crate) fn check_datacenter(api: &Api, params: &Params) -> ApiResult<()> {
    match params.get("dc") {
        Some(dc) if !dc.is_empty() && dc != api.agent.config.datacenter => Err(ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "No path to datacenter",
        )),
        _ => Ok(()),
    }
}

pub(crate) fn json_with_index(index: u64, body: &Value) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert("X-Consul-Index", HeaderValue::from(index));
    headers.insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
    headers.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
    headers.insert(
        "X-Consul-Effective-Consistency",
        HeaderValue::from_static("leader"),
    );
    (headers, super::render::json(body)).into_response()
}
