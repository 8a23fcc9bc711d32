//! `/v1/kv`, `/v1/txn` and `/v1/session` in Consul's shapes, on the
//! control plane's store ([`crate::kv`]). Keys obey `key`/`key_prefix`
//! rules, sessions `session`/`session_prefix` rules on their node.

use axum::Json;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use signpost_core::acl::{Access, Resource};
use signpost_core::kv::{
    KvQuery, MAX_TXN_BODY, MAX_VALUE, SessionSpec, TxnOp, Verb, check_key, check_session_id,
    parse_txn,
};
use signpost_daemon::kv_answer::{self, Freshness, text};
use signpost_daemon::read_filter::ReadFilter;

use super::HttpState;
use super::acl::{anonymous_write, authorize};
use crate::kv::KvError;

pub(super) fn bad(message: impl Into<String>) -> Response {
    text(StatusCode::BAD_REQUEST, message)
}

pub(super) fn failed(e: &KvError) -> Response {
    match e {
        KvError::Invalid(m) => text(StatusCode::INTERNAL_SERVER_ERROR, m.clone()),
        KvError::Store(crate::store::StoreError::Unavailable { .. }) | KvError::Contended(_) => {
            text(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        KvError::Store(_) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

pub(super) fn freshness(s: &HttpState) -> Freshness {
    Freshness {
        known_leader: (s.quorum)(),
        last_contact_ms: 0,
    }
}

/// A write's answer, with the index it was committed at: an agent that
/// forwarded it waits until its cache has that index before answering,
/// so its client reads its own write there.
pub(super) fn written(mut response: Response, index: Option<u64>) -> Response {
    if let Some(index) = index {
        response
            .headers_mut()
            .insert("X-Consul-Index", axum::http::HeaderValue::from(index));
    }
    response
}

/// `GET /v1/kv/<key>` (`/v1/kv/` for the whole store).
pub(super) async fn get(
    State(s): State<HttpState>,
    key: Option<Path<String>>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    reader: ReadFilter,
) -> Response {
    let key = key.map(|Path(k)| k).unwrap_or_default();
    let query = match KvQuery::parse(q.as_deref()) {
        Ok(q) => q,
        Err(e) => return bad(e),
    };
    let tree = query.recurse || query.keys;
    if let Err(e) = check_key(&key, tree) {
        return bad(e.to_string());
    }
    if !tree
        && let Err(refused) = authorize(
            &s,
            &headers,
            Resource::Key(&key),
            Access::Read,
            "kv.read",
            &key,
        )
    {
        return refused.into_response();
    }
    if query.consistent
        && let Err(e) = s.kv.sync().await
    {
        return text(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    let mirror = s.kv.mirror();
    if let Some(after) = query.index {
        mirror.wait(&key, tree, after, query.wait_for()).await;
    }
    let (index, pairs) = if tree {
        let (index, found) = mirror.list(&key);
        (index, found.iter().map(|(k, e)| e.pair(k, true)).collect())
    } else {
        let (index, found) = mirror.get(&key);
        (
            index,
            found.map(|e| e.pair(&key, true)).into_iter().collect(),
        )
    };
    kv_answer::read(&query, &key, index, pairs, &reader, freshness(&s))
}

/// Reads a write's body, at most `limit` bytes (413 beyond).
pub(super) async fn body(request: Request, limit: usize) -> Result<axum::body::Bytes, Response> {
    axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|_| {
            text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("Request body too large: the most is {limit} bytes"),
            )
        })
}

/// `PUT /v1/kv/<key>`: `?flags`, `?cas`, `?acquire`, `?release`.
pub(super) async fn put(
    State(s): State<HttpState>,
    Path(key): Path<String>,
    RawQuery(q): RawQuery,
    request: Request,
) -> Response {
    let query = match KvQuery::parse(q.as_deref()) {
        Ok(q) => q,
        Err(e) => return bad(e),
    };
    if let Err(refused) = authorize(
        &s,
        request.headers(),
        Resource::Key(&key),
        Access::Write,
        "kv.write",
        &key,
    ) {
        return refused.into_response();
    }
    if let Err(e) = check_key(&key, false) {
        return bad(e.to_string());
    }
    let value = match body(request, MAX_VALUE).await {
        Ok(v) => v.to_vec(),
        Err(answer) => return answer,
    };
    let (verb, session, index) = match (&query.acquire, &query.release, query.cas) {
        (Some(session), _, _) => (Verb::Lock, session.clone(), 0),
        (_, Some(session), _) => (Verb::Unlock, session.clone(), 0),
        (_, _, Some(index)) => (Verb::Cas, String::new(), index),
        _ => (Verb::Set, String::new(), 0),
    };
    let op = TxnOp {
        verb,
        key,
        value,
        flags: query.flags.unwrap_or(0),
        index,
        session,
    };
    match s.kv.apply(op).await {
        Ok((applied, index)) => written(kv_answer::boolean(applied), index),
        Err(e) => failed(&e),
    }
}

/// `DELETE /v1/kv/<key>`: `?recurse`, `?cas`.
pub(super) async fn delete(
    State(s): State<HttpState>,
    key: Option<Path<String>>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    let key = key.map(|Path(k)| k).unwrap_or_default();
    let query = match KvQuery::parse(q.as_deref()) {
        Ok(q) => q,
        Err(e) => return bad(e),
    };
    if let Err(refused) = authorize(
        &s,
        &headers,
        Resource::Key(&key),
        Access::Write,
        "kv.delete",
        &key,
    ) {
        return refused.into_response();
    }
    if let Err(e) = check_key(&key, query.recurse) {
        return bad(e.to_string());
    }
    let (verb, index) = match (query.recurse, query.cas) {
        (true, _) => (Verb::DeleteTree, 0),
        (false, Some(index)) => (Verb::DeleteCas, index),
        (false, None) => (Verb::Delete, 0),
    };
    let op = TxnOp {
        verb,
        key,
        value: Vec::new(),
        flags: 0,
        index,
        session: String::new(),
    };
    match s.kv.apply(op).await {
        Ok((applied, index)) => written(kv_answer::boolean(applied), index),
        Err(e) => failed(&e),
    }
}

/// `PUT /v1/txn`: KV operations, all or none. 200 with `Results`, 409
/// with `Errors` when one failed (nothing written), 400 for a body that
/// is not a transaction.
pub(super) async fn txn(State(s): State<HttpState>, request: Request) -> Response {
    let headers = request.headers().clone();
    // Without a token under a deny policy nothing can be written: said
    // before the body is read.
    if let Err(refused) = anonymous_write(&s, &headers, Resource::Key(""), "kv.txn") {
        return refused.into_response();
    }
    let bytes = match body(request, MAX_TXN_BODY).await {
        Ok(b) => b,
        Err(answer) => return answer,
    };
    let ops = match parse_txn(&bytes) {
        Ok(ops) => ops,
        Err(e) => return bad(e),
    };
    for op in &ops {
        let needed = if op.verb.writes() {
            Access::Write
        } else {
            Access::Read
        };
        if let Err(refused) = authorize(
            &s,
            &headers,
            Resource::Key(&op.key),
            needed,
            "kv.txn",
            &op.key,
        ) {
            return refused.into_response();
        }
    }
    match s.kv.txn(&ops).await {
        Ok((Ok(results), index)) => written(
            Json(json!({"Results": results, "Errors": null})).into_response(),
            index,
        ),
        Ok((Err(errors), _)) => (
            StatusCode::CONFLICT,
            Json(json!({"Results": null, "Errors": errors})),
        )
            .into_response(),
        Err(e) => failed(&e),
    }
}

/// `PUT /v1/session/create`: `{"ID": ...}`. The node must be in the
/// catalog, its checks registered and not critical.
pub(super) async fn create_session(State(s): State<HttpState>, request: Request) -> Response {
    let headers = request.headers().clone();
    // Without a token under a deny policy nothing can be written: said
    // before the body is read.
    if let Err(refused) = anonymous_write(&s, &headers, Resource::Session(""), "session.create") {
        return refused.into_response();
    }
    let bytes = match body(request, 64 * 1024).await {
        Ok(b) => b,
        Err(answer) => return answer,
    };
    let spec = match SessionSpec::parse(&bytes) {
        Ok(spec) => spec,
        Err(e) => return bad(e),
    };
    let Some(node) = spec.node.clone() else {
        return bad("Node is required (sessions created through an agent get the agent's node)");
    };
    if let Err(refused) = authorize(
        &s,
        &headers,
        Resource::Session(&node),
        Access::Write,
        "session.create",
        &node,
    ) {
        return refused.into_response();
    }
    if let Err(e) = crate::kv::sessions::check_new(&s.catalog, &spec, &node) {
        return text(StatusCode::INTERNAL_SERVER_ERROR, e);
    }
    match s.kv.create_session(&spec, &node).await {
        Ok(id) => Json(json!({ "ID": id })).into_response(),
        Err(e) => failed(&e),
    }
}

/// The session `id` names, checked, and whether the token may write it.
fn session_for_write(
    s: &HttpState,
    headers: &HeaderMap,
    id: &str,
    action: &str,
) -> Result<Option<crate::kv::Session>, Box<Response>> {
    let session = s.kv.mirror().session(id);
    let node = session.as_ref().map(|x| x.node.clone()).unwrap_or_default();
    authorize(
        s,
        headers,
        Resource::Session(&node),
        Access::Write,
        action,
        id,
    )
    .map_err(|r| Box::new(r.into_response()))?;
    check_session_id(id).map_err(|e| Box::new(bad(e)))?;
    Ok(session)
}

/// `PUT /v1/session/destroy/<id>`: `true` (also for a session already gone).
pub(super) async fn destroy_session(
    State(s): State<HttpState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(answer) = session_for_write(&s, &headers, &id, "session.destroy") {
        return *answer;
    }
    match s.kv.end_session_at(&id, "destroyed").await {
        // With the index its keys were released at: an agent that
        // forwarded it waits for its cache to show them free.
        Ok(index) => written(kv_answer::boolean(true), index),
        Err(e) => failed(&e),
    }
}

/// `PUT /v1/session/renew/<id>`: `[session]`, or 404 when it is gone.
pub(super) async fn renew_session(
    State(s): State<HttpState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    match session_for_write(&s, &headers, &id, "session.renew") {
        Err(answer) => return *answer,
        Ok(None) => {
            return text(
                StatusCode::NOT_FOUND,
                format!("Session id '{id}' not found"),
            );
        }
        Ok(Some(_)) => {}
    }
    match s.kv.renew_session(&id).await {
        Ok(Some(session)) => Json(json!([session.json()])).into_response(),
        Ok(None) => text(
            StatusCode::NOT_FOUND,
            format!("Session id '{id}' not found"),
        ),
        Err(e) => failed(&e),
    }
}

/// Sessions as a blocking list read answers them.
async fn sessions_answer(
    s: &HttpState,
    q: Option<&str>,
    reader: &ReadFilter,
    pick: impl Fn(&crate::kv::Session) -> bool,
) -> Response {
    let query = match KvQuery::parse(q) {
        Ok(q) => q,
        Err(e) => return bad(e),
    };
    if query.consistent
        && let Err(e) = s.kv.sync().await
    {
        return text(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    let mirror = s.kv.mirror();
    if let Some(after) = query.index {
        mirror.wait_sessions(after, query.wait_for()).await;
    }
    let (index, sessions) = mirror.sessions(None);
    let listed: Vec<Value> = sessions
        .iter()
        .filter(|x| pick(x) && reader.session(&x.node))
        .map(crate::kv::Session::json)
        .collect();
    let mut response = Json(Value::Array(listed)).into_response();
    kv_answer::headers(&mut response, index, freshness(s));
    reader.answer(response)
}

/// `GET /v1/session/info/<id>`: `[session]` or `[]`.
pub(super) async fn session_info(
    State(s): State<HttpState>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    reader: ReadFilter,
) -> Response {
    if let Err(e) = check_session_id(&id) {
        return bad(e);
    }
    sessions_answer(&s, q.as_deref(), &reader, |x| x.id == id).await
}

/// `GET /v1/session/node/<node>`.
pub(super) async fn node_sessions(
    State(s): State<HttpState>,
    Path(node): Path<String>,
    RawQuery(q): RawQuery,
    reader: ReadFilter,
) -> Response {
    sessions_answer(&s, q.as_deref(), &reader, |x| x.node == node).await
}

/// `GET /v1/session/list`.
pub(super) async fn list_sessions(
    State(s): State<HttpState>,
    RawQuery(q): RawQuery,
    reader: ReadFilter,
) -> Response {
    sessions_answer(&s, q.as_deref(), &reader, |_| true).await
}

/// `PUT /v1/event/fire/<name>?node=&service=&tag=`: the body is the
/// payload (512 bytes at most). Answers the event.
pub(super) async fn fire_event(
    State(s): State<HttpState>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
    request: Request,
) -> Response {
    if let Err(refused) = authorize(
        &s,
        request.headers(),
        Resource::Event(&name),
        Access::Write,
        "event.fire",
        &name,
    ) {
        return refused.into_response();
    }
    let payload = match body(request, signpost_core::event::MAX_PAYLOAD).await {
        Ok(b) => b.to_vec(),
        Err(answer) => return answer,
    };
    let mut filters = [String::new(), String::new(), String::new()];
    for (k, v) in form_urlencoded::parse(q.as_deref().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "node" => filters[0] = v.into_owned(),
            "service" => filters[1] = v.into_owned(),
            "tag" => filters[2] = v.into_owned(),
            _ => {}
        }
    }
    if let Err(e) =
        signpost_core::event::check(&name, &payload, [&filters[0], &filters[1], &filters[2]])
    {
        return bad(e);
    }
    let [node_filter, service_filter, tag_filter] = filters;
    let event = signpost_core::event::UserEvent {
        id: String::new(),
        name,
        payload,
        node_filter,
        service_filter,
        tag_filter,
        version: 1,
        ltime: 0,
    };
    match s.kv.fire(event).await {
        Ok(event) => Json(event).into_response(),
        Err(e) => failed(&e),
    }
}

/// `GET /v1/event/list?name=`: the events kept (oldest first), blocking
/// on the next one with `index`.
pub(super) async fn list_events(
    State(s): State<HttpState>,
    RawQuery(q): RawQuery,
    reader: ReadFilter,
) -> Response {
    let query = match KvQuery::parse(q.as_deref()) {
        Ok(q) => q,
        Err(e) => return bad(e),
    };
    let name = form_urlencoded::parse(q.as_deref().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "name")
        .map(|(_, v)| v.into_owned())
        .filter(|n| !n.is_empty());
    let mirror = s.kv.mirror();
    if let Some(after) = query.index {
        mirror.wait_events(after, query.wait_for()).await;
    }
    let (index, events) = mirror.events(name.as_deref());
    let events: Vec<_> = events
        .into_iter()
        .filter(|e| reader.event(&e.name))
        .collect();
    let mut response = Json(events).into_response();
    kv_answer::headers(&mut response, index, freshness(&s));
    reader.answer(response)
}

/// A `service-defaults` entry as Consul answers it.
fn config_json(entry: &signpost_core::kv::ServiceDefaults, create: u64, modify: u64) -> Value {
    let mut v = serde_json::to_value(entry).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        map.insert("CreateIndex".into(), create.into());
        map.insert("ModifyIndex".into(), modify.into());
    }
    v
}

/// `PUT /v1/config` and `PUT /v1/config/service-defaults/<name>`: a
/// service's protocol for its instances registered without one.
pub(super) async fn put_config(
    State(s): State<HttpState>,
    name: Option<Path<String>>,
    request: Request,
) -> Response {
    let headers = request.headers().clone();
    // Without a token under a deny policy nothing can be written: said
    // before the body is read.
    if let Err(refused) = anonymous_write(&s, &headers, Resource::Service(""), "config.write") {
        return refused.into_response();
    }
    let bytes = match body(request, 64 * 1024).await {
        Ok(b) => b,
        Err(answer) => return answer,
    };
    let entry = match signpost_core::kv::ServiceDefaults::parse(
        &bytes,
        name.as_ref().map(|Path(n)| n.as_str()),
    ) {
        Ok(e) => e,
        Err(e) => return bad(e),
    };
    if let Err(refused) = authorize(
        &s,
        &headers,
        Resource::Service(&entry.name),
        Access::Write,
        "config.write",
        &entry.name,
    ) {
        return refused.into_response();
    }
    match s.kv.put_config(&entry.name.clone(), Some(&entry)).await {
        Ok(index) => written(kv_answer::boolean(true), index),
        Err(e) => failed(&e),
    }
}

/// `GET /v1/config/service-defaults/<name>`.
pub(super) async fn get_config(
    State(s): State<HttpState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = authorize(
        &s,
        &headers,
        Resource::Service(&name),
        Access::Read,
        "config.read",
        &name,
    ) {
        return refused.into_response();
    }
    let configs = s.kv.mirror().configs();
    match configs.get(&name) {
        Some((create, modify, entry)) => {
            let mut response = Json(config_json(entry, *create, *modify)).into_response();
            kv_answer::headers(&mut response, *modify, freshness(&s));
            response
        }
        None => text(
            StatusCode::NOT_FOUND,
            format!("Config entry not found for \"service-defaults\" / \"{name}\""),
        ),
    }
}

/// `GET /v1/config/service-defaults`: the entries the token may read.
pub(super) async fn list_configs(State(s): State<HttpState>, reader: ReadFilter) -> Response {
    let configs = s.kv.mirror().configs();
    let index = configs.values().map(|(_, m, _)| *m).max().unwrap_or(1);
    let listed: Vec<Value> = configs
        .iter()
        .filter(|(name, _)| reader.service(name))
        .map(|(_, (c, m, e))| config_json(e, *c, *m))
        .collect();
    let mut response = Json(listed).into_response();
    kv_answer::headers(&mut response, index, freshness(&s));
    reader.answer(response)
}

/// `DELETE /v1/config/service-defaults/<name>`: `true`.
pub(super) async fn delete_config(
    State(s): State<HttpState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = authorize(
        &s,
        &headers,
        Resource::Service(&name),
        Access::Write,
        "config.delete",
        &name,
    ) {
        return refused.into_response();
    }
    match s.kv.put_config(&name, None).await {
        Ok(index) => written(kv_answer::boolean(true), index),
        Err(e) => failed(&e),
    }
}
