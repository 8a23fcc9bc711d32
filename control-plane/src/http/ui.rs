//! The web console at `/ui/`: three files compiled into the binary (no
//! CDN, no font or script from elsewhere), rendered in the browser from
//! this API, so every rule of the token's ACL holds as it does for the
//! CLI. Two endpoints exist for it: a summary of every service (one
//! request for the services page, however large the fleet) and a stream
//! of change notices that keeps the page in view current.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use serde_json::{Value, json};
use signpost_core::command::now_millis;
use signpost_core::model::Health;
use signpost_daemon::read_filter::ReadFilter;

use super::{HttpState, error, json_response};

const INDEX: &str = include_str!("../../ui/index.html");
const SCRIPT: &str = include_str!("../../ui/console.js");
const STYLE: &str = include_str!("../../ui/console.css");

/// How often a change stream looks for changes.
const LOOK_EVERY: Duration = Duration::from_millis(250);
/// A change stream ends after this long (the console opens another), so
/// that none outlives a token's revocation for long.
const STREAM_LIFETIME: Duration = Duration::from_secs(300);
/// How often a change stream checks that its token is still valid.
const TOKEN_RECHECK: Duration = Duration::from_secs(5);
/// Change streams open at once, across all consoles.
const MAX_STREAMS: usize = 256;

static STREAMS: AtomicUsize = AtomicUsize::new(0);

/// The console's pages only load the console's own files, and the
/// console only talks to this server.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

pub(super) async fn root() -> Redirect {
    Redirect::permanent("/ui/")
}

pub(super) async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

pub(super) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

pub(super) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// `GET /v1/ui/services`: every service the token may read, with its
/// instances counted by health, its zones, nodes, tags, protocol and the
/// commands in force on it.
pub(super) async fn services(State(s): State<HttpState>, reader: ReadFilter) -> Response {
    let now = now_millis();
    let mut commands: HashMap<String, usize> = HashMap::new();
    for c in s.commands.list() {
        if c.state(now) == "active" {
            *commands.entry(c.target.service.clone()).or_default() += 1;
        }
    }
    let (index, body) = s.catalog.read(|inner| {
        // One pass over the fleet, however many services it has.
        let mut by_service: HashMap<&str, Summary<'_>> = HashMap::new();
        let mut visible: HashMap<&str, bool> = HashMap::new();
        for node in inner.nodes.values() {
            if !reader.node(&node.hello.node) {
                continue;
            }
            let live = crate::catalog::liveness_check(node);
            let node_health = health(std::iter::once(&live).chain(node.node_checks.iter()));
            for instance in node.instances.values() {
                let name = instance.name.as_str();
                if !*visible.entry(name).or_insert_with(|| reader.service(name)) {
                    continue;
                }
                let summary = by_service.entry(name).or_default();
                summary.instances += 1;
                summary.nodes.insert(node.hello.node.as_str());
                let zone = if instance.zone.is_empty() {
                    &node.hello.zone
                } else {
                    &instance.zone
                };
                if !zone.is_empty() {
                    summary.zones.insert(zone);
                }
                if !instance.protocol_text.is_empty() {
                    summary.protocols.insert(&instance.protocol_text);
                }
                let (worst, maintenance) = health(instance.checks.iter());
                match (worst.max(node_health.0), maintenance || node_health.1) {
                    (_, true) => summary.maintenance += 1,
                    (Health::Passing, _) => summary.passing += 1,
                    (Health::Warning, _) => summary.warning += 1,
                    (Health::Critical, _) => summary.critical += 1,
                }
            }
        }
        let mut out = Vec::new();
        for (name, tags) in inner.names() {
            if !visible
                .get(name.as_str())
                .copied()
                .unwrap_or_else(|| reader.service(name))
            {
                continue;
            }
            let summary = by_service.remove(name.as_str()).unwrap_or_default();
            out.push(json!({
                "Name": name,
                "Instances": summary.instances,
                "Passing": summary.passing,
                "Warning": summary.warning,
                "Critical": summary.critical,
                "Maintenance": summary.maintenance,
                "Nodes": summary.nodes.len(),
                "Zones": summary.zones,
                "Tags": tags,
                "Protocol": summary.protocols.into_iter().collect::<Vec<_>>().join(", "),
                "Commands": commands.get(name).copied().unwrap_or(0),
            }));
        }
        (inner.index, Value::Array(out))
    });
    reader.answer(json_response(index, &body))
}

/// One service's instances, counted for the services page.
#[derive(Default)]
struct Summary<'a> {
    instances: u32,
    passing: u32,
    warning: u32,
    critical: u32,
    maintenance: u32,
    zones: BTreeSet<&'a str>,
    nodes: HashSet<&'a str>,
    protocols: BTreeSet<&'a str>,
}

/// The worst status of `checks`, and whether one of them is a
/// maintenance mode in force.
fn health<'a>(checks: impl Iterator<Item = &'a signpost_proto::Check>) -> (Health, bool) {
    checks.fold((Health::Passing, false), |(worst, maintenance), c| {
        let health = c.health().unwrap_or(Health::Critical);
        let maintenance_check =
            c.id.starts_with("_node_maintenance") || c.id.starts_with("_service_maintenance");
        (
            worst.max(health),
            maintenance || (maintenance_check && health != Health::Passing),
        )
    })
}

/// `GET /v1/ui/services/{name}`: the service's live traffic, summed
/// over the agents whose proxies call it (`Traffic`: null when none did
/// lately), and when each check of its nodes last changed status
/// (`CheckChanges`: node, check ID, Unix ms).
pub(super) async fn service(
    State(s): State<HttpState>,
    Path(name): Path<String>,
    reader: ReadFilter,
) -> Response {
    let visible = reader.service(&name);
    let traffic = visible.then(|| s.catalog.traffic_of(&name)).flatten();
    let (index, changes) = s.catalog.read(|inner| {
        // When each check of its instances' nodes last changed, by node.
        let mut changes: BTreeMap<&str, &HashMap<String, u64>> = BTreeMap::new();
        for (node, _) in inner.instances_of(&name) {
            if visible && reader.node(&node.hello.node) {
                changes.insert(&node.hello.node, &node.check_changed);
            }
        }
        (
            inner.service_index(&name),
            json!({ "Traffic": traffic, "CheckChanges": changes }),
        )
    });
    reader.answer(json_response(index, &changes))
}

/// What the console shows changed when this does: the catalog's index,
/// the commands (their states and acknowledgements) and the KV store's
/// index.
fn fingerprint(s: &HttpState) -> (u64, u64, u64) {
    let catalog = s.catalog.read(|inner| inner.index);
    let now = now_millis();
    let commands = s.commands.list().iter().fold(0u64, |acc, c| {
        let state = match c.state(now) {
            "active" => 1,
            "expired" => 2,
            _ => 3,
        };
        let applied = u64::try_from(s.commands.applied_by(&c.id).len()).unwrap_or(0);
        acc.wrapping_mul(31)
            .wrapping_add(c.created_at)
            .wrapping_add(state)
            .wrapping_add(applied << 8)
    });
    let kv = s.kv.mirror().index_of("", true);
    (catalog, commands, kv)
}

/// Gives back its place when a change stream ends.
struct StreamSlot;

impl Drop for StreamSlot {
    fn drop(&mut self) {
        STREAMS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `GET /v1/ui/events`: server-sent events, `change` whenever what the
/// console shows changed (and once at the start), a comment every 15 s
/// to keep proxies from closing it. Ends after five minutes, at the
/// server's shutdown, or once the token is no longer valid.
pub(super) async fn events(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    if let Err(refused) = super::acl::resolve(&s, &headers, "ui.events") {
        return refused.into_response();
    }
    if STREAMS.fetch_add(1, Ordering::Relaxed) >= MAX_STREAMS {
        STREAMS.fetch_sub(1, Ordering::Relaxed);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("too many consoles follow changes (at most {MAX_STREAMS}); try again later"),
        );
    }
    let slot = StreamSlot;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(4);
    tokio::spawn(async move {
        let _slot = slot;
        let started = tokio::time::Instant::now();
        let mut last = None;
        let mut checked = started;
        while started.elapsed() < STREAM_LIFETIME {
            let now = fingerprint(&s);
            if last != Some(now) {
                last = Some(now);
                let event = Event::default()
                    .event("change")
                    .data(format!("{{\"index\":{},\"kv\":{}}}", now.0, now.2));
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            if checked.elapsed() >= TOKEN_RECHECK {
                checked = tokio::time::Instant::now();
                if super::acl::resolve(&s, &headers, "ui.events").is_err() {
                    return;
                }
            }
            tokio::select! {
                () = s.shutdown.cancelled() => return,
                () = tx.closed() => return,
                () = tokio::time::sleep(LOOK_EVERY) => {}
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
