//! The ACL and audit endpoints in Consul's shapes (tokens, policies,
//! bootstrap), and the check every endpoint goes through: the token in
//! `X-Consul-Token` or `Authorization: Bearer`, and what its rules allow.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use signpost_core::acl::{Access, Resource};

use super::{HttpState, error};
use signpost_daemon::token::presented;

use crate::acl::{AuditEntry, BootstrapRefused, Denied, Resolved, TokenRecord, TokenSpec};

/// A refused request: 401 or 403 with why.
pub struct Refused {
    status: StatusCode,
    message: String,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        error(self.status, self.message)
    }
}

/// Who presents the request's token, or the 401 answer for an unknown or
/// expired one (audited).
pub(super) fn resolve(
    s: &HttpState,
    headers: &HeaderMap,
    action: &str,
) -> Result<Resolved, Refused> {
    let secret = presented(headers);
    s.acl
        .resolve(secret)
        .map_err(|denied| refuse(s, denied, action, ""))
}

/// The token allowed `needed` on `resource` for `action` on `target`,
/// or the 401/403 answer (the refusal is audited with who and why).
pub(super) fn authorize(
    s: &HttpState,
    headers: &HeaderMap,
    resource: Resource<'_>,
    needed: Access,
    action: &str,
    target: &str,
) -> Result<Resolved, Refused> {
    s.acl
        .authorize(presented(headers), resource, needed)
        .map_err(|denied| refuse(s, denied, action, target))
}

/// A write without a token, refused before its body is read when the
/// default policy gives anonymous requests no `resource` write (what the
/// body names is checked once it is read).
pub(super) fn anonymous_write(
    s: &HttpState,
    headers: &HeaderMap,
    resource: Resource<'_>,
    action: &str,
) -> Result<(), Refused> {
    if presented(headers).is_some() {
        return Ok(());
    }
    authorize(s, headers, resource, Access::Write, action, "").map(|_| ())
}

fn refuse(s: &HttpState, denied: Denied, action: &str, target: &str) -> Refused {
    match denied {
        Denied::Unknown => {
            s.acl.record_anonymous_refusal(AuditEntry::new(
                "",
                action,
                target,
                "denied: unknown token",
                "",
            ));
            Refused {
                status: StatusCode::UNAUTHORIZED,
                message: "ACL not found: unknown token".to_string(),
            }
        }
        Denied::Expired { accessor } => {
            s.acl.record(AuditEntry::new(
                &accessor,
                action,
                target,
                "denied: token expired",
                "",
            ));
            Refused {
                status: StatusCode::UNAUTHORIZED,
                message: format!("ACL not found: token {accessor} has expired"),
            }
        }
        Denied::Forbidden {
            accessor: None,
            needs,
        } => {
            s.acl.record_anonymous_refusal(AuditEntry::new(
                "",
                action,
                target,
                &format!("denied: no token, needs {needs}"),
                "",
            ));
            Refused {
                status: StatusCode::UNAUTHORIZED,
                message: format!(
                    "Permission denied: no token, and this needs {needs}; send one in X-Consul-Token or Authorization: Bearer"
                ),
            }
        }
        Denied::Forbidden {
            accessor: Some(accessor),
            needs,
        } => {
            s.acl.record(AuditEntry::new(
                &accessor,
                action,
                target,
                &format!("denied: needs {needs}"),
                "",
            ));
            Refused {
                status: StatusCode::FORBIDDEN,
                message: format!("Permission denied: token {accessor} lacks {needs}"),
            }
        }
    }
}

fn token_json(s: &HttpState, t: &TokenRecord) -> Value {
    let policies: Vec<Value> = t
        .policies
        .iter()
        .map(|id| json!({"ID": id, "Name": s.acl.policy_name(id)}))
        .collect();
    let mut v = json!({
        "AccessorID": t.accessor,
        "Description": t.description,
        "Policies": policies,
        "NodeIdentities": t.node_identities.iter().map(|n| json!({"NodeName": n, "Datacenter": s.datacenter})).collect::<Vec<_>>(),
        "ServiceIdentities": t.service_identities.iter().map(|n| json!({"ServiceName": n})).collect::<Vec<_>>(),
        "CreateTime": t.created_at,
        "CreatedBy": t.created_by,
    });
    if let Some(role) = t.role {
        v["Role"] = json!(role);
    }
    if let Some(at) = t.expires_at {
        v["ExpirationTime"] = json!(at);
    }
    v
}

#[derive(Deserialize)]
struct Link {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(rename = "Name", default)]
    name: String,
}

#[derive(Deserialize)]
struct NodeIdentity {
    #[serde(rename = "NodeName")]
    node_name: String,
    #[serde(rename = "Datacenter", default)]
    _datacenter: String,
}

#[derive(Deserialize)]
struct ServiceIdentity {
    #[serde(rename = "ServiceName")]
    service_name: String,
}

/// Consul's token body (and `Role`, for tokens made the old way).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewToken {
    #[serde(rename = "Description", default)]
    description: String,
    #[serde(rename = "Policies", default)]
    policies: Vec<Link>,
    #[serde(rename = "NodeIdentities", default)]
    node_identities: Vec<NodeIdentity>,
    #[serde(rename = "ServiceIdentities", default)]
    service_identities: Vec<ServiceIdentity>,
    /// A Go duration ("24h").
    #[serde(rename = "ExpirationTTL", default)]
    expiration_ttl: Option<String>,
    #[serde(rename = "Role", default)]
    role: Option<String>,
}

impl NewToken {
    fn spec(self) -> Result<TokenSpec, String> {
        let mut policies: Vec<String> = self
            .policies
            .into_iter()
            .map(|l| if l.id.is_empty() { l.name } else { l.id })
            .collect();
        if let Some(role) = self.role {
            let role: crate::acl::Role = role.parse().map_err(|e| format!("Role: {e}"))?;
            policies.push(crate::acl::policy::role_policy(role).to_string());
        }
        let ttl = match self.expiration_ttl.as_deref() {
            None | Some("") => None,
            Some(text) => Some(
                signpost_core::duration::parse(text).map_err(|e| format!("ExpirationTTL: {e}"))?,
            ),
        };
        Ok(TokenSpec {
            description: self.description,
            policies,
            node_identities: self
                .node_identities
                .into_iter()
                .map(|n| n.node_name)
                .collect(),
            service_identities: self
                .service_identities
                .into_iter()
                .map(|s| s.service_name)
                .collect(),
            ttl,
        })
    }
}

/// A JSON body whatever its content type (Consul's clients do not all
/// send one), or what is wrong with it (for a 400).
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("bad {what} body: {e}"))
}

/// `PUT /v1/acl/token`: a new token; its secret is in the answer only.
pub(super) async fn create(
    State(s): State<HttpState>,
    headers: HeaderMap,
    new: axum::body::Bytes,
) -> Response {
    let admin = match authorize(
        &s,
        &headers,
        Resource::Acl,
        Access::Write,
        "token.create",
        "",
    ) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    let spec = match body::<NewToken>(&new, "token").and_then(NewToken::spec) {
        Ok(spec) => spec,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    match s.acl.create(&spec, &admin.accessor).await {
        Ok((record, secret)) => {
            s.acl.record(AuditEntry::new(
                &admin.accessor,
                "token.create",
                &record.accessor,
                "ok",
                &format!(
                    "policies {:?}, nodes {:?}, services {:?}: {}",
                    record.policies,
                    record.node_identities,
                    record.service_identities,
                    record.description
                ),
            ));
            let mut body = token_json(&s, &record);
            body["SecretID"] = json!(secret);
            (StatusCode::OK, Json(body)).into_response()
        }
        Err(crate::acl::AclError::Invalid(why)) => error(StatusCode::BAD_REQUEST, why),
        Err(e) => {
            tracing::error!(error = %e, "cannot store a token");
            super::store_failed(e.unavailable(), format!("cannot store the token: {e}"))
        }
    }
}

/// `GET /v1/acl/tokens`: every token, without secrets.
pub(super) async fn list(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&s, &headers, Resource::Acl, Access::Read, "token.list", "") {
        return r.into_response();
    }
    let tokens: Vec<Value> = s.acl.tokens().iter().map(|t| token_json(&s, t)).collect();
    Json(Value::Array(tokens)).into_response()
}

/// `GET /v1/acl/token/self`: the presented token, with the rules it
/// resolves to (`Rules`, what agents enforce).
pub(super) async fn whoami(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    match resolve(&s, &headers, "token.self") {
        Ok(Resolved {
            record: Some(t),
            authorizer,
            ..
        }) => {
            let mut v = token_json(&s, &t);
            // What the console offers this token (the server decides
            // anyway).
            let can = |resource, access| authorizer.allows(resource, access);
            v["Can"] = json!({
                "operator_read": can(Resource::Operator, Access::Read),
                "operator_write": can(Resource::Operator, Access::Write),
                "acl_read": can(Resource::Acl, Access::Read),
                "acl_write": can(Resource::Acl, Access::Write),
                "audit_read": can(Resource::Operator, Access::Read),
                "kv_write": can(Resource::Key(""), Access::Write),
            });
            v["Rules"] = json!(authorizer.rules);
            Json(v).into_response()
        }
        Ok(_) => error(
            StatusCode::UNAUTHORIZED,
            "ACL not found: no token".to_string(),
        ),
        Err(r) => r.into_response(),
    }
}

/// `GET /v1/acl/token/{accessor}`.
pub(super) async fn show(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(accessor): Path<String>,
) -> Response {
    if let Err(r) = authorize(
        &s,
        &headers,
        Resource::Acl,
        Access::Read,
        "token.read",
        &accessor,
    ) {
        return r.into_response();
    }
    match s.acl.token(&accessor) {
        Some(t) => Json(token_json(&s, &t)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no token {accessor:?}")),
    }
}

/// `DELETE /v1/acl/token/{accessor}`.
pub(super) async fn delete(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(accessor): Path<String>,
) -> Response {
    let admin = match authorize(
        &s,
        &headers,
        Resource::Acl,
        Access::Write,
        "token.delete",
        &accessor,
    ) {
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

fn policy_json(p: &crate::acl::policy::PolicyRecord) -> Value {
    json!({
        "ID": p.id,
        "Name": p.name,
        "Description": p.description,
        "Rules": p.rules,
        "CreateTime": p.created_at,
    })
}

/// Consul's policy body.
#[derive(Deserialize)]
pub(super) struct NewPolicy {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Description", default)]
    description: String,
    #[serde(rename = "Rules", default)]
    rules: String,
    /// Accepted for Consul's clients; one datacenter.
    #[serde(rename = "Datacenters", default)]
    _datacenters: Vec<String>,
    #[serde(rename = "ID", default)]
    _id: String,
}

/// `PUT /v1/acl/policy`: a new policy.
pub(super) async fn create_policy(
    State(s): State<HttpState>,
    headers: HeaderMap,
    new: axum::body::Bytes,
) -> Response {
    write_policy(s, headers, None, new).await
}

/// `PUT /v1/acl/policy/{id}`: changes a policy.
pub(super) async fn update_policy(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    new: axum::body::Bytes,
) -> Response {
    write_policy(s, headers, Some(id), new).await
}

async fn write_policy(
    s: HttpState,
    headers: HeaderMap,
    id: Option<String>,
    new: axum::body::Bytes,
) -> Response {
    let target = id.clone().unwrap_or_default();
    let admin = match authorize(
        &s,
        &headers,
        Resource::Acl,
        Access::Write,
        "policy.write",
        &target,
    ) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    let new = match body::<NewPolicy>(&new, "policy") {
        Ok(n) => n,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    match s
        .acl
        .put_policy(id.as_deref(), &new.name, &new.description, &new.rules)
        .await
    {
        Ok(record) => {
            s.acl.record(AuditEntry::new(
                &admin.accessor,
                "policy.write",
                &record.id,
                "ok",
                &record.name,
            ));
            Json(policy_json(&record)).into_response()
        }
        Err(crate::acl::AclError::Invalid(why)) => error(StatusCode::BAD_REQUEST, why),
        Err(e) => super::store_failed(e.unavailable(), format!("cannot store the policy: {e}")),
    }
}

/// `GET /v1/acl/policies`.
pub(super) async fn policies(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&s, &headers, Resource::Acl, Access::Read, "policy.list", "") {
        return r.into_response();
    }
    Json(s.acl.policies().iter().map(policy_json).collect::<Vec<_>>()).into_response()
}

/// `GET /v1/acl/policy/{id}` and `/v1/acl/policy/name/{name}`.
pub(super) async fn show_policy(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = authorize(
        &s,
        &headers,
        Resource::Acl,
        Access::Read,
        "policy.read",
        &id,
    ) {
        return r.into_response();
    }
    match s.acl.policy(&id) {
        Some(p) => Json(policy_json(&p)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no policy {id:?}")),
    }
}

/// `DELETE /v1/acl/policy/{id}`.
pub(super) async fn delete_policy(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let admin = match authorize(
        &s,
        &headers,
        Resource::Acl,
        Access::Write,
        "policy.delete",
        &id,
    ) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    match s.acl.delete_policy(&id).await {
        Ok(true) => {
            s.acl.record(AuditEntry::new(
                &admin.accessor,
                "policy.delete",
                &id,
                "ok",
                "",
            ));
            Json(json!(true)).into_response()
        }
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no policy {id:?}")),
        Err(crate::acl::AclError::Invalid(why)) => error(StatusCode::BAD_REQUEST, why),
        Err(e) => super::store_failed(e.unavailable(), format!("cannot store the policies: {e}")),
    }
}

/// `PUT /v1/acl/bootstrap`: Consul's reset procedure for a lost
/// management token (see [`crate::acl::Acl::bootstrap_again`]).
pub(super) async fn bootstrap(State(s): State<HttpState>) -> Response {
    match s.acl.bootstrap_again(&s.data_dir).await {
        Ok((record, secret)) => {
            tracing::warn!(accessor = %record.accessor, "a new management token was made through the bootstrap reset");
            let mut body = token_json(&s, &record);
            body["SecretID"] = json!(secret);
            Json(body).into_response()
        }
        Err(BootstrapRefused::NotAllowed { index }) => {
            s.acl.record_anonymous_refusal(AuditEntry::new(
                "",
                "acl.bootstrap",
                "",
                "denied: no reset file with the current index",
                "",
            ));
            error(
                StatusCode::FORBIDDEN,
                format!(
                    "ACL bootstrap no longer allowed (reset index: {index}); to make a new management token, write {index} to {} on a control-plane host and ask again",
                    s.data_dir.join("acl-bootstrap-reset").display()
                ),
            )
        }
        Err(BootstrapRefused::Store(e)) => {
            super::store_failed(e.unavailable(), format!("cannot store the token: {e}"))
        }
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
    if let Err(r) = authorize(
        &s,
        &headers,
        Resource::Operator,
        Access::Read,
        "audit.read",
        "",
    ) {
        return r.into_response();
    }
    Json(s.acl.audit(q.since, q.limit.min(10_000))).into_response()
}
