//! The ACL and audit endpoints, and the token check every protected
//! endpoint goes through (`X-Consul-Token` or `Authorization: Bearer`).

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{HttpState, error};
use signpost_daemon::token::presented;

use crate::acl::{AuditEntry, Denied, Role, TokenRecord};

/// A refused request: 401 or 403 with why.
pub(super) struct Refused {
    status: StatusCode,
    message: String,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        error(self.status, self.message)
    }
}

/// The token allowed to do `action` on `target`, or the 401/403 answer
/// (the refusal is audited).
pub(super) fn authorize(
    s: &HttpState,
    headers: &HeaderMap,
    needed: Role,
    action: &str,
    target: &str,
) -> Result<TokenRecord, Refused> {
    let secret = presented(headers);
    match s.acl.authorize(secret, needed) {
        Ok(token) => Ok(token),
        Err(Denied::Unauthenticated) => {
            let why = if secret.is_some() {
                "unknown token"
            } else {
                "no token"
            };
            s.acl.record_anonymous_refusal(AuditEntry::new(
                "",
                action,
                target,
                &format!("denied: {why}"),
                "",
            ));
            Err(Refused {
                status: StatusCode::UNAUTHORIZED,
                message: format!(
                    "{why}: this needs a token with the {} role, in X-Consul-Token or Authorization: Bearer",
                    needed.as_str()
                ),
            })
        }
        Err(Denied::Forbidden { role }) => {
            let token = secret.and_then(|t| s.acl.lookup(t));
            let who = token.map(|t| t.accessor).unwrap_or_default();
            let why = format!("role {} may not, needs {}", role.as_str(), needed.as_str());
            s.acl.record(AuditEntry::new(
                &who,
                action,
                target,
                &format!("denied: {why}"),
                "",
            ));
            Err(Refused {
                status: StatusCode::FORBIDDEN,
                message: format!(
                    "this token's role ({}) may not do this: it needs {}",
                    role.as_str(),
                    needed.as_str()
                ),
            })
        }
    }
}

fn token_json(t: &TokenRecord) -> Value {
    json!({
        "AccessorID": t.accessor,
        "Role": t.role.as_str(),
        "Description": t.description,
        "CreateTime": t.created_at,
        "CreatedBy": t.created_by,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewToken {
    #[serde(rename = "Role")]
    role: String,
    #[serde(rename = "Description", default)]
    description: String,
}

/// `PUT /v1/acl/token`: a new token; its secret is in the answer only.
pub(super) async fn create(
    State(s): State<HttpState>,
    headers: HeaderMap,
    body: Result<Json<NewToken>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let admin = match authorize(&s, &headers, Role::Admin, "token.create", "") {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    let Json(new) = match body {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("bad token body: {}", e.body_text()),
            );
        }
    };
    let role: Role = match new.role.parse() {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("Role: {e}")),
    };
    match s.acl.create(role, &new.description, &admin.accessor).await {
        Ok((record, secret)) => {
            s.acl.record(AuditEntry::new(
                &admin.accessor,
                "token.create",
                &record.accessor,
                "ok",
                &format!("role {}: {}", role.as_str(), new.description),
            ));
            let mut body = token_json(&record);
            body["SecretID"] = json!(secret);
            (StatusCode::OK, Json(body)).into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot store a token");
            super::store_failed(e.unavailable(), format!("cannot store the token: {e}"))
        }
    }
}

/// `GET /v1/acl/tokens`: every token, without secrets.
pub(super) async fn list(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&s, &headers, Role::Admin, "token.list", "") {
        return r.into_response();
    }
    let tokens: Vec<Value> = s.acl.tokens().iter().map(token_json).collect();
    Json(Value::Array(tokens)).into_response()
}

/// `GET /v1/acl/token/self`: the presented token.
pub(super) async fn whoami(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    match presented(&headers).and_then(|t| s.acl.lookup(t)) {
        Some(t) => Json(token_json(&t)).into_response(),
        None => error(
            StatusCode::UNAUTHORIZED,
            "no token, or an unknown one".to_string(),
        ),
    }
}

/// `DELETE /v1/acl/token/{accessor}`.
pub(super) async fn delete(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(accessor): Path<String>,
) -> Response {
    let admin = match authorize(&s, &headers, Role::Admin, "token.delete", &accessor) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    match s.acl.delete(&accessor).await {
        Ok(true) => {
            s.acl.record(AuditEntry::new(
                &admin.accessor,
                "token.delete",
                &accessor,
                "ok",
                "",
            ));
            Json(json!(true)).into_response()
        }
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no token {accessor:?}")),
        Err(e) => super::store_failed(e.unavailable(), format!("cannot store the tokens: {e}")),
    }
}

#[derive(Deserialize)]
pub(super) struct AuditQuery {
    /// Unix milliseconds.
    #[serde(default)]
    since: u64,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    100
}

/// `GET /v1/audit?since=&limit=`: the newest entries, oldest first.
pub(super) async fn audit(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Response {
    if let Err(r) = authorize(&s, &headers, Role::Operator, "audit.read", "") {
        return r.into_response();
    }
    Json(s.acl.audit(q.since, q.limit)).into_response()
}
