//! The operator commands' endpoints: create and revoke (operator token,
//! audited), list and show (with which agents applied each).

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use signpost_core::command::{Command, NewCommand, now_millis};

use super::acl::{authorize, resolve};
use super::{HttpState, error};
use crate::acl::AuditEntry;
use signpost_core::acl::{Access, Resource};

fn command_json(s: &HttpState, c: &Command, now: u64) -> Value {
    let mut v = serde_json::to_value(c).unwrap_or(Value::Null);
    v["state"] = json!(c.state(now));
    let applied = s.commands.applied_by(&c.id);
    let (connected, subscribed) = s
        .catalog
        .read(|i| (i.connected(), i.subscriber_nodes(&c.target.service)));
    // The agents using the service (the ones whose traffic it changes)
    // that have not said they applied it.
    let pending: Vec<&String> = subscribed
        .iter()
        .filter(|n| applied.binary_search(n).is_err())
        .collect();
    v["pending_agents"] = json!(pending);
    v["applied"] = json!(applied.len());
    v["applied_by"] = json!(applied);
    v["agents_connected"] = json!(connected);
    v["agents_subscribed"] = json!(subscribed.len());
    v
}

/// `POST /v1/commands`.
pub(super) async fn create(
    State(s): State<HttpState>,
    headers: HeaderMap,
    body: Result<Json<NewCommand>, JsonRejection>,
) -> Response {
    let operator = match authorize(
        &s,
        &headers,
        Resource::Operator,
        Access::Write,
        "command.create",
        "",
    ) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    let new = match body {
        Ok(Json(new)) => new,
        Err(e) => {
            let why = format!("bad command: {}", e.body_text());
            s.acl.record(AuditEntry::new(
                &operator.accessor,
                "command.create",
                "",
                &format!("refused: {why}"),
                "",
            ));
            return error(StatusCode::BAD_REQUEST, why);
        }
    };
    if let Err(e) = new.validate() {
        let why = format!("bad command: {e}");
        s.acl.record(AuditEntry::new(
            &operator.accessor,
            "command.create",
            &new.target.service,
            &format!("refused: {why}"),
            &new.reason,
        ));
        return error(StatusCode::BAD_REQUEST, why);
    }
    match s.commands.create(new, &operator.accessor).await {
        Ok(command) => {
            s.acl.record(AuditEntry::new(
                &operator.accessor,
                &format!("command.create.{}", command.action.name()),
                &format!("{} {}", command.id, command.target.service),
                "ok",
                &command.reason,
            ));
            Json(command_json(&s, &command, now_millis())).into_response()
        }
        Err(e) => super::store_failed(e.unavailable(), format!("cannot store the command: {e}")),
    }
}

#[derive(Deserialize)]
pub(super) struct ListQuery {
    service: Option<String>,
    state: Option<String>,
}

/// `GET /v1/commands?service=&state=active|expired|revoked`.
pub(super) async fn list(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    let reader = match resolve(&s, &headers, "command.list") {
        Ok(r) => r.authorizer,
        Err(r) => return r.into_response(),
    };
    let now = now_millis();
    let commands: Vec<Value> = s
        .commands
        .list()
        .iter()
        .filter(|c| {
            q.service
                .as_deref()
                .is_none_or(|svc| c.target.service.eq_ignore_ascii_case(svc))
        })
        .filter(|c| q.state.as_deref().is_none_or(|st| c.state(now) == st))
        .filter(|c| reader.allows(Resource::Service(&c.target.service), Access::Read))
        .map(|c| command_json(&s, c, now))
        .collect();
    Json(Value::Array(commands)).into_response()
}

/// `GET /v1/commands/{id}`.
pub(super) async fn show(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let reader = match resolve(&s, &headers, "command.read") {
        Ok(r) => r.authorizer,
        Err(r) => return r.into_response(),
    };
    match s
        .commands
        .get(&id)
        .filter(|c| reader.allows(Resource::Service(&c.target.service), Access::Read))
    {
        Some(c) => Json(command_json(&s, &c, now_millis())).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no command {id:?}")),
    }
}

/// `DELETE /v1/commands/{id}`: revoke.
pub(super) async fn revoke(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let operator = match authorize(
        &s,
        &headers,
        Resource::Operator,
        Access::Write,
        "command.revoke",
        &id,
    ) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    match s.commands.revoke(&id).await {
        Ok(Some(c)) => {
            s.acl.record(AuditEntry::new(
                &operator.accessor,
                "command.revoke",
                &format!("{} {}", c.id, c.target.service),
                "ok",
                "",
            ));
            Json(command_json(&s, &c, now_millis())).into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no command {id:?}")),
        Err(e) => super::store_failed(e.unavailable(), format!("cannot store the command: {e}")),
    }
}
