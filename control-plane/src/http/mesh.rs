//! The service mesh's API in Consul's shapes, on the store's records
//! ([`crate::mesh`]): intentions (`/v1/connect/intentions...`) and the
//! CA (`/v1/connect/ca/...`).
//!
//! Intentions are kept one record per (source, destination), so a create
//! is a write "if there is none" and two replicas creating the same pair
//! at once cannot both succeed; every change is a compare-and-swap on
//! the record as it was read, tried again when another write got in
//! first. Writes need `intentions` write on the destination; a token
//! reads an intention when it may read the intentions of either end
//! (Consul's `CanRead`). Writes and rotations go to the audit log.

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use signpost_core::acl::{Access, Authorizer, Resource};
use signpost_core::intention::{self, By, Intention, Intentions, MAX_INTENTIONS};
use signpost_daemon::kv_answer::{self, text};

use super::HttpState;
use super::acl::{anonymous_write, authorize, resolve};
use super::kv::{bad, body, failed, freshness, written};
use crate::acl::AuditEntry;
use crate::mesh::{MeshError, StoredIntention, intention_record, stored_intention};

/// Largest intention body taken.
const MAX_BODY: usize = 64 * 1024;
/// How many times a write is tried again after another write changed
/// its record between the read and the commit.
const RETRIES: usize = 5;

/// Whether the token may read `i`: the intentions of its destination or
/// of its source (Consul's `Intention.CanRead`).
fn can_read(authorizer: &Authorizer, i: &Intention) -> bool {
    authorizer.allows(Resource::Intention(&i.destination), Access::Read)
        || authorizer.allows(Resource::Intention(&i.source), Access::Read)
}

/// `list` in the order Consul lists intentions ([`intention::sort`]).
fn in_consul_order(list: Vec<StoredIntention>) -> Vec<StoredIntention> {
    let mut order: Vec<Intention> = list.iter().map(|x| x.intention.clone()).collect();
    intention::sort(&mut order);
    let mut by_record: HashMap<String, StoredIntention> = list
        .into_iter()
        .map(|x| (pair_key(&x.intention), x))
        .collect();
    order
        .iter()
        .filter_map(|i| by_record.remove(&pair_key(i)))
        .collect()
}

fn pair_key(i: &Intention) -> String {
    intention_record(&i.source, &i.destination)
}

/// The intention with this ID.
fn with_id(list: Vec<StoredIntention>, id: &str) -> Option<StoredIntention> {
    list.into_iter()
        .find(|x| !id.is_empty() && x.intention.id == id)
}

/// Consul's words for a pair that already has an intention.
fn duplicate(existing: &Intention) -> String {
    format!(
        "duplicate intention found: {} => {} (ID: {}, Precedence: {})",
        existing.source,
        existing.destination,
        existing.id,
        existing.precedence()
    )
}

/// The body of `PUT /v1/connect/intentions/exact`: the names come from
/// the query (as Consul, whatever the body says), the rest from the body.
fn parse_for_pair(bytes: &[u8], source: &str, destination: &str) -> Result<Intention, String> {
    let mut value: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("Request decode failed: {e}"))?;
    if let Value::Object(map) = &mut value {
        map.retain(|key, _| {
            let key: String = key
                .chars()
                .filter(|c| *c != '_' && *c != '-')
                .flat_map(char::to_lowercase)
                .collect();
            key != "sourcename" && key != "destinationname"
        });
        map.insert("SourceName".into(), json!(source));
        map.insert("DestinationName".into(), json!(destination));
    }
    intention::parse_consul(value.to_string().as_bytes())
}

/// The query's parameters (the last of a repeated one wins, but for
/// `name`, which [`matching`] reads in full).
fn params(q: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .rev()
        .find(|(k, v)| k == key && !v.is_empty())
        .map(|(_, v)| v.as_str())
}

/// `?source=&destination=`, or the 400 naming the one missing.
fn pair(q: Option<&str>) -> Result<(String, String), Box<Response>> {
    let params = params(q);
    let get = |key: &str| {
        param(&params, key)
            .map(str::to_string)
            .ok_or_else(|| boxed(bad(format!("required query parameter '{key}' not set"))))
    };
    Ok((get("source")?, get("destination")?))
}

/// A read's answer, with the index and freshness headers.
fn read_answer(s: &HttpState, body: Value, index: u64) -> Response {
    let mut response = Json(body).into_response();
    kv_answer::headers(&mut response, index, freshness(s));
    response
}

/// The newest index among `list` (at least 1).
fn index_of<'a>(list: impl IntoIterator<Item = &'a StoredIntention>) -> u64 {
    list.into_iter()
        .map(|x| x.modify_index)
        .max()
        .unwrap_or(1)
        .max(1)
}

/// Whether the token may read the intention from `source` to
/// `destination`, or the refusal (audited).
fn readable(
    s: &HttpState,
    headers: &HeaderMap,
    source: &str,
    destination: &str,
    action: &str,
) -> Result<(), Box<Response>> {
    let resolved = resolve(s, headers, action).map_err(boxed)?;
    let probe = Intention {
        source: source.to_string(),
        destination: destination.to_string(),
        ..blank()
    };
    if can_read(&resolved.authorizer, &probe) {
        return Ok(());
    }
    authorize(
        s,
        headers,
        Resource::Intention(destination),
        Access::Read,
        action,
        &probe.label(),
    )
    .map(drop)
    .map_err(boxed)
}

fn blank() -> Intention {
    Intention {
        id: String::new(),
        source: String::new(),
        destination: String::new(),
        action: None,
        permissions: Vec::new(),
        shadow: false,
        description: String::new(),
        meta: BTreeMap::new(),
        created_at_ms: 0,
        updated_at_ms: 0,
    }
}

/// Who may write intentions of `destination` (for the audit log), or
/// the refusal.
fn writer(
    s: &HttpState,
    headers: &HeaderMap,
    destination: &str,
    action: &str,
    target: &str,
) -> Result<String, Box<Response>> {
    authorize(
        s,
        headers,
        Resource::Intention(destination),
        Access::Write,
        action,
        target,
    )
    .map(|r| r.who().to_string())
    .map_err(boxed)
}

fn boxed(answer: impl IntoResponse) -> Box<Response> {
    Box::new(answer.into_response())
}

fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "Intention not found")
}

/// What [`write`] did: the intention before and after, and the index
/// it was written at.
struct Written {
    index: Option<u64>,
    before: Option<Intention>,
    after: Option<Intention>,
}

/// Writes what `change` makes of the intention in `record` (`None`:
/// deletes it), if the record is still as read; reads and tries again
/// when another write got in first.
async fn write(
    s: &HttpState,
    record: &str,
    mut change: impl FnMut(Option<&StoredIntention>) -> Result<Option<Intention>, Box<Response>>,
) -> Result<Written, Box<Response>> {
    for _ in 0..RETRIES {
        let current = stored_intention(&s.kv, record);
        let after = change(current.as_ref())?;
        let bytes = match &after {
            Some(i) => Some(serde_json::to_vec(i).map_err(|e| {
                boxed(text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot encode the intention: {e}"),
                ))
            })?),
            None => None,
        };
        let expected = Some(current.as_ref().map(|c| c.modify_index));
        match s.kv.put_mesh(record, bytes, expected).await {
            Ok((true, index)) => {
                return Ok(Written {
                    index,
                    before: current.map(|c| c.intention),
                    after,
                });
            }
            Ok((false, _)) => continue,
            Err(e) => return Err(boxed(failed(&e))),
        }
    }
    Err(boxed(text(
        StatusCode::CONFLICT,
        format!(
            "other writes changed the intention {RETRIES} times while this one was made; try again"
        ),
    )))
}

/// Refuses a new intention when the store holds [`MAX_INTENTIONS`].
fn room_for_one(s: &HttpState) -> Result<(), Box<Response>> {
    let held = s.kv.mirror().mesh(crate::mesh::INTENTION_PREFIX).len();
    if held >= MAX_INTENTIONS {
        return Err(boxed(text(
            StatusCode::CONFLICT,
            format!(
                "the store holds {held} intentions, the most it takes ({MAX_INTENTIONS}): delete some first"
            ),
        )));
    }
    Ok(())
}

/// `new` as stored over `current`: a new ID and creation time for a new
/// pair, the old ones kept for an update.
fn stamped(mut new: Intention, current: Option<&StoredIntention>, now: u64) -> Intention {
    match current {
        Some(c) if !c.intention.id.is_empty() => {
            new.id = c.intention.id.clone();
            new.created_at_ms = c.intention.created_at_ms;
        }
        _ => {
            new.id = crate::kv::new_uuid();
            new.created_at_ms = now;
        }
    }
    new.updated_at_ms = now;
    new
}

fn audit(s: &HttpState, who: &str, action: &str, i: &Intention) {
    s.acl.record(AuditEntry::new(
        who,
        action,
        &i.label(),
        "ok",
        &format!("ID {}", i.id),
    ));
}

// === intentions ===

/// `GET /v1/connect/intentions`: those the token may read, in Consul's
/// order.
pub(super) async fn list(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    let resolved = match resolve(&s, &headers, "intention.list") {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    let all = crate::mesh::stored_intentions(&s.kv);
    let (index, total) = (index_of(&all), all.len());
    let visible: Vec<StoredIntention> = all
        .into_iter()
        .filter(|x| can_read(&resolved.authorizer, &x.intention))
        .collect();
    let filtered = visible.len() < total;
    let body: Vec<Value> = in_consul_order(visible)
        .iter()
        .map(|x| x.intention.to_consul_json(x.create_index, x.modify_index))
        .collect();
    let mut response = read_answer(&s, Value::Array(body), index);
    if filtered {
        response.headers_mut().insert(
            "X-Consul-Results-Filtered-By-ACLs",
            HeaderValue::from_static("true"),
        );
    }
    response
}

/// `POST /v1/connect/intentions`: a new intention, `{"ID": ...}`; a 409
/// when its source and destination already have one.
pub(super) async fn create(State(s): State<HttpState>, request: Request) -> Response {
    let headers = request.headers().clone();
    // Without a token under a deny policy nothing can be written: said
    // before the body is read.
    if let Err(refused) = anonymous_write(&s, &headers, Resource::Intention(""), "intention.create")
    {
        return refused.into_response();
    }
    let bytes = match body(request, MAX_BODY).await {
        Ok(b) => b,
        Err(answer) => return answer,
    };
    let new = match intention::parse_consul(&bytes) {
        Ok(i) => i,
        Err(e) => return bad(e),
    };
    let who = match writer(
        &s,
        &headers,
        &new.destination,
        "intention.create",
        &new.label(),
    ) {
        Ok(who) => who,
        Err(refused) => return *refused,
    };
    let record = intention_record(&new.source, &new.destination);
    let now = crate::kv::now_ms();
    let outcome = write(&s, &record, |current| {
        if let Some(existing) = current {
            return Err(boxed(text(
                StatusCode::CONFLICT,
                duplicate(&existing.intention),
            )));
        }
        room_for_one(&s)?;
        Ok(Some(stamped(new.clone(), None, now)))
    })
    .await;
    match outcome {
        Ok(Written {
            index,
            after: Some(i),
            ..
        }) => {
            audit(&s, &who, "intention.create", &i);
            written(Json(json!({ "ID": i.id })).into_response(), index)
        }
        Ok(_) => not_found(),
        Err(answer) => *answer,
    }
}

/// `GET /v1/connect/intentions/exact?source=&destination=`.
pub(super) async fn get_exact(
    State(s): State<HttpState>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    let (source, destination) = match pair(q.as_deref()) {
        Ok(p) => p,
        Err(answer) => return *answer,
    };
    if let Err(refused) = readable(&s, &headers, &source, &destination, "intention.read") {
        return *refused;
    }
    match stored_intention(&s.kv, &intention_record(&source, &destination)) {
        Some(x) => read_answer(
            &s,
            x.intention.to_consul_json(x.create_index, x.modify_index),
            x.modify_index,
        ),
        None => not_found(),
    }
}

/// `PUT /v1/connect/intentions/exact?source=&destination=`: creates or
/// replaces the pair's intention (its ID and creation time kept); `true`.
pub(super) async fn put_exact(
    State(s): State<HttpState>,
    RawQuery(q): RawQuery,
    request: Request,
) -> Response {
    let headers = request.headers().clone();
    if let Err(refused) = anonymous_write(&s, &headers, Resource::Intention(""), "intention.write")
    {
        return refused.into_response();
    }
    let (source, destination) = match pair(q.as_deref()) {
        Ok(p) => p,
        Err(answer) => return *answer,
    };
    let bytes = match body(request, MAX_BODY).await {
        Ok(b) => b,
        Err(answer) => return answer,
    };
    let new = match parse_for_pair(&bytes, &source, &destination) {
        Ok(i) => i,
        Err(e) => return bad(e),
    };
    let who = match writer(
        &s,
        &headers,
        &new.destination,
        "intention.write",
        &new.label(),
    ) {
        Ok(who) => who,
        Err(refused) => return *refused,
    };
    upsert(&s, &who, new, None).await
}

/// Writes `new` over its pair's intention; with `id`, only if that is
/// the intention there (an update by ID). `true`.
async fn upsert(s: &HttpState, who: &str, new: Intention, id: Option<&str>) -> Response {
    let record = intention_record(&new.source, &new.destination);
    let now = crate::kv::now_ms();
    let outcome = write(s, &record, |current| {
        match (id, current) {
            (Some(id), Some(c)) if c.intention.id == id => {}
            // Deleted (or replaced) since it was looked up.
            (Some(_), _) => return Err(boxed(not_found())),
            (None, Some(_)) => {}
            (None, None) => room_for_one(s)?,
        }
        Ok(Some(stamped(new.clone(), current, now)))
    })
    .await;
    match outcome {
        Ok(Written {
            index,
            after: Some(i),
            ..
        }) => {
            audit(s, who, "intention.write", &i);
            written(kv_answer::boolean(true), index)
        }
        Ok(_) => not_found(),
        Err(answer) => *answer,
    }
}

/// `DELETE /v1/connect/intentions/exact?source=&destination=`: `true`, or
/// 404 when there is none.
pub(super) async fn delete_exact(
    State(s): State<HttpState>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = anonymous_write(&s, &headers, Resource::Intention(""), "intention.delete")
    {
        return refused.into_response();
    }
    let (source, destination) = match pair(q.as_deref()) {
        Ok(p) => p,
        Err(answer) => return *answer,
    };
    let target = format!("{source} → {destination}");
    let who = match writer(&s, &headers, &destination, "intention.delete", &target) {
        Ok(who) => who,
        Err(refused) => return *refused,
    };
    remove(&s, &who, &intention_record(&source, &destination), None).await
}

/// Deletes the intention in `record` (with `id`: only if it is that one).
async fn remove(s: &HttpState, who: &str, record: &str, id: Option<&str>) -> Response {
    let outcome = write(s, record, |current| match current {
        Some(c) if id.is_none_or(|id| c.intention.id == id) => Ok(None),
        _ => Err(boxed(not_found())),
    })
    .await;
    match outcome {
        Ok(Written {
            index,
            before: Some(i),
            ..
        }) => {
            audit(s, who, "intention.delete", &i);
            written(kv_answer::boolean(true), index)
        }
        Ok(_) => not_found(),
        Err(answer) => *answer,
    }
}

/// `GET /v1/connect/intentions/{id}`.
pub(super) async fn get_by_id(
    State(s): State<HttpState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(x) = with_id(crate::mesh::stored_intentions(&s.kv), &id) else {
        // An unknown token hears that first.
        return match resolve(&s, &headers, "intention.read") {
            Ok(_) => not_found(),
            Err(refused) => refused.into_response(),
        };
    };
    let i = &x.intention;
    if let Err(refused) = readable(&s, &headers, &i.source, &i.destination, "intention.read") {
        return *refused;
    }
    read_answer(
        &s,
        i.to_consul_json(x.create_index, x.modify_index),
        x.modify_index,
    )
}

/// `PUT /v1/connect/intentions/{id}`: replaces the intention, which keeps
/// its source and destination (to move one, delete it and create
/// another); `true`.
pub(super) async fn put_by_id(
    State(s): State<HttpState>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let headers = request.headers().clone();
    if let Err(refused) = anonymous_write(&s, &headers, Resource::Intention(""), "intention.write")
    {
        return refused.into_response();
    }
    let bytes = match body(request, MAX_BODY).await {
        Ok(b) => b,
        Err(answer) => return answer,
    };
    let new = match intention::parse_consul(&bytes) {
        Ok(i) => i,
        Err(e) => return bad(e),
    };
    let Some(x) = with_id(crate::mesh::stored_intentions(&s.kv), &id) else {
        return match writer(&s, &headers, &new.destination, "intention.write", &id) {
            Ok(_) => not_found(),
            Err(refused) => *refused,
        };
    };
    let who = match writer(
        &s,
        &headers,
        &x.intention.destination,
        "intention.write",
        &id,
    ) {
        Ok(who) => who,
        Err(refused) => return *refused,
    };
    if (&new.source, &new.destination) != (&x.intention.source, &x.intention.destination) {
        return bad(format!(
            "SourceName and DestinationName cannot change ({id} is {}): delete the intention and create another",
            x.intention.label()
        ));
    }
    upsert(&s, &who, new, Some(&id)).await
}

/// `DELETE /v1/connect/intentions/{id}`: `true`, or 404.
pub(super) async fn delete_by_id(
    State(s): State<HttpState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = anonymous_write(&s, &headers, Resource::Intention(""), "intention.delete")
    {
        return refused.into_response();
    }
    let Some(x) = with_id(crate::mesh::stored_intentions(&s.kv), &id) else {
        return not_found();
    };
    let who = match writer(
        &s,
        &headers,
        &x.intention.destination,
        "intention.delete",
        &id,
    ) {
        Ok(who) => who,
        Err(refused) => return *refused,
    };
    remove(&s, &who, &x.record, Some(&id)).await
}

/// `GET /v1/connect/intentions/check?source=&destination=`:
/// `{"Allowed": bool}`, a connection's verdict (an intention with HTTP
/// permissions denies it, as Consul's check does) under the fleet's
/// default and shadow mode. Needs `intentions` read on the destination.
pub(super) async fn check(
    State(s): State<HttpState>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    let (source, destination) = match pair(q.as_deref()) {
        Ok(p) => p,
        Err(answer) => return *answer,
    };
    if let Err(refused) = authorize(
        &s,
        &headers,
        Resource::Intention(&destination),
        Access::Read,
        "intention.check",
        &format!("{source} → {destination}"),
    ) {
        return refused.into_response();
    }
    let all = crate::mesh::stored_intentions(&s.kv);
    let index = index_of(&all);
    let set = Intentions::new(
        all.into_iter().map(|x| x.intention).collect(),
        s.mesh.default_intention,
        s.mesh.shadow,
    );
    let decision = set.connection(&source, &destination);
    read_answer(&s, json!({ "Allowed": decision.allowed }), index)
}

/// `GET /v1/connect/intentions/match?by=source|destination&name=X`
/// (`name` repeated for more): `{"X": [...]}`, each list in the order
/// the intentions are tried, without those the token may not read.
pub(super) async fn matching(
    State(s): State<HttpState>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    let params = params(q.as_deref());
    let by = match param(&params, "by").map(By::parse) {
        Some(Some(by)) => by,
        Some(None) => return bad("'by' parameter must be one of 'source' or 'destination'"),
        None => return bad("required query parameter 'by' not set"),
    };
    let names: Vec<&str> = params
        .iter()
        .filter(|(k, v)| k == "name" && !v.is_empty())
        .map(|(_, v)| v.as_str())
        .collect();
    if names.is_empty() {
        return bad("required query parameter 'name' not set");
    }
    let resolved = match resolve(&s, &headers, "intention.match") {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    let all = crate::mesh::stored_intentions(&s.kv);
    let index = index_of(&all);
    let indexes: HashMap<String, (u64, u64)> = all
        .iter()
        .map(|x| (pair_key(&x.intention), (x.create_index, x.modify_index)))
        .collect();
    let set = Intentions::new(
        all.into_iter().map(|x| x.intention).collect(),
        s.mesh.default_intention,
        s.mesh.shadow,
    );
    let mut out = Map::new();
    for name in names {
        let found: Vec<Value> = set
            .matching(by, name)
            .into_iter()
            .filter(|i| can_read(&resolved.authorizer, i))
            .map(|i| {
                let (c, m) = indexes.get(&pair_key(i)).copied().unwrap_or((0, 0));
                i.to_consul_json(c, m)
            })
            .collect();
        out.insert(name.to_string(), Value::Array(found));
    }
    read_answer(&s, Value::Object(out), index)
}

// === CA ===

/// `GET /v1/connect/ca/roots` (`?pem` for the certificates alone):
/// readable by anyone, as in Consul; never a key. Before the CA exists
/// (the first moments of a new fleet), no roots, as Consul answers.
pub(super) async fn roots(State(s): State<HttpState>, RawQuery(q): RawQuery) -> Response {
    let (list, modify) = match crate::mesh::load_indexed(&s.kv) {
        Ok(Some((ca, create, modify))) => (ca.to_consul(create, modify), modify),
        Ok(None) => (
            signpost_core::consul::CaRootList {
                active_root_id: String::new(),
                trust_domain: s.mesh.trust_domain.clone(),
                roots: Vec::new(),
            },
            1,
        ),
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let params = params(q.as_deref());
    let pem = params
        .iter()
        .any(|(k, v)| k == "pem" && matches!(v.as_str(), "" | "1" | "true"));
    if pem {
        let chain: String = list.roots.iter().map(|r| r.root_cert.as_str()).collect();
        let mut response = (
            [(header::CONTENT_TYPE, "application/pem-certificate-chain")],
            chain,
        )
            .into_response();
        kv_answer::headers(&mut response, modify, freshness(&s));
        return response;
    }
    read_answer(&s, json!(list), modify)
}

/// `POST /v1/connect/ca/rotate` (and Consul's `PUT
/// /v1/connect/ca/configuration`, whatever its body: Signpost's CA has no
/// settings to change, and a new configuration means a new root):
/// `{"ID": <the new root>}`. Needs `operator` write.
pub(super) async fn rotate(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    let who = match authorize(
        &s,
        &headers,
        Resource::Operator,
        Access::Write,
        "ca.rotate",
        "",
    ) {
        Ok(r) => r.who().to_string(),
        Err(refused) => return refused.into_response(),
    };
    match crate::mesh::rotate(&s.kv).await {
        Ok(id) => {
            s.acl
                .record(AuditEntry::new(&who, "ca.rotate", &id, "ok", ""));
            Json(json!({ "ID": id })).into_response()
        }
        Err(MeshError::Store(e)) => failed(&e),
        Err(e @ MeshError::NoCa) => text(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e @ MeshError::Conflict) => text(StatusCode::CONFLICT, e.to_string()),
        Err(e @ MeshError::Invalid(_)) => bad(e.to_string()),
        Err(e @ (MeshError::Corrupt(_) | MeshError::Sign(_))) => {
            tracing::error!(error = %e, "cannot rotate the mesh CA");
            text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signpost_core::acl::{DefaultPolicy, Rules};
    use signpost_core::intention::Action;

    fn stored(source: &str, destination: &str, id: &str, modify: u64) -> StoredIntention {
        StoredIntention {
            record: intention_record(source, destination),
            intention: Intention {
                id: id.to_string(),
                source: source.to_string(),
                destination: destination.to_string(),
                action: Some(Action::Allow),
                ..blank()
            },
            create_index: 1,
            modify_index: modify,
        }
    }

    #[test]
    fn lists_in_consul_order_and_finds_by_id() {
        let list = vec![
            stored("*", "*", "a", 3),
            stored("web", "*", "b", 4),
            stored("web", "db", "c", 9),
            stored("*", "db", "d", 2),
        ];
        assert_eq!(index_of(&list), 9);
        let ids: Vec<String> = in_consul_order(list.clone())
            .into_iter()
            .map(|x| x.intention.id)
            .collect();
        assert_eq!(ids, ["c", "d", "b", "a"]);
        let found = with_id(list.clone(), "b").unwrap();
        assert_eq!(found.record, "intention/*/web");
        assert!(with_id(list.clone(), "zz").is_none());
        assert!(with_id(list, "").is_none(), "an empty ID names nothing");
        assert_eq!(index_of(&[]), 1);
    }

    #[test]
    fn either_end_lets_a_token_read_an_intention() {
        let rules = Rules::from_consul_json(&json!({
            "service": {"web": {"policy": "read"}, "db": {"policy": "deny"}},
        }))
        .unwrap();
        let a = Authorizer::new(rules, DefaultPolicy::Deny);
        assert!(can_read(&a, &stored("web", "db", "x", 1).intention));
        assert!(can_read(&a, &stored("db", "web", "x", 1).intention));
        assert!(!can_read(&a, &stored("api", "db", "x", 1).intention));
    }

    #[test]
    fn exact_bodies_take_their_names_from_the_query() {
        let i = parse_for_pair(
            br#"{"source_name": "other", "DestinationName": "elsewhere", "Action": "deny"}"#,
            "web",
            "db",
        )
        .unwrap();
        assert_eq!((i.source.as_str(), i.destination.as_str()), ("web", "db"));
        assert_eq!(i.action, Some(Action::Deny));
        let e = parse_for_pair(br#"{"Action": "permit"}"#, "web", "db").unwrap_err();
        assert!(e.contains("Action must be set"), "{e}");
        let e = parse_for_pair(br#"{"Action": "allow"}"#, "web", "d b").unwrap_err();
        assert!(e.contains("DestinationName"), "{e}");
        assert!(parse_for_pair(b"", "web", "db").is_err());
    }

    #[test]
    fn updates_keep_the_id_and_creation_time() {
        let mut old = stored("web", "db", "id-1", 5);
        old.intention.created_at_ms = 100;
        let new = stamped(stored("web", "db", "", 0).intention, Some(&old), 200);
        assert_eq!(
            (new.id.as_str(), new.created_at_ms, new.updated_at_ms),
            ("id-1", 100, 200)
        );
        let fresh = stamped(stored("web", "db", "", 0).intention, None, 300);
        assert_eq!(fresh.id.len(), 36);
        assert_eq!((fresh.created_at_ms, fresh.updated_at_ms), (300, 300));
        assert_eq!(
            duplicate(&old.intention),
            "duplicate intention found: web => db (ID: id-1, Precedence: 9)"
        );
    }

    #[test]
    fn query_pairs_name_what_is_missing() {
        assert_eq!(
            pair(Some("source=web&destination=%2A")).ok(),
            Some(("web".to_string(), "*".to_string()))
        );
        assert_eq!(pair(Some("source=web")).unwrap_err().status(), 400);
        assert_eq!(
            pair(Some("destination=db&source=")).unwrap_err().status(),
            400
        );
    }
}
