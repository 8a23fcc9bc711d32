//! `PUT /v1/catalog/register` and `/v1/catalog/deregister`: services on
//! hosts that run no agent (a managed database, a SaaS endpoint), in
//! Consul's shapes. Such a node is external: it is never probed, and its
//! health is what its registration says. Agents route to its instances
//! like any other. A node with an agent is refused: its agent owns it.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use signpost_core::acl::{Access, Resource};
use signpost_core::model::Health;
use signpost_core::request::{Fields, object};
use signpost_proto::{Check, Hello, Instance, NodeSnapshot, reported};

use super::HttpState;
use super::acl::{anonymous_write, authorize};
use signpost_daemon::kv_answer::{boolean, text};

/// Largest registration body.
const MAX_BODY: usize = 64 * 1024;

fn bad(message: impl Into<String>) -> Response {
    text(StatusCode::BAD_REQUEST, message)
}

async fn fields(
    s: &HttpState,
    request: Request,
    action: &str,
) -> Result<(axum::http::HeaderMap, Fields), Response> {
    let headers = request.headers().clone();
    // Without a token under a deny policy nothing can be registered:
    // said before the body is read.
    anonymous_write(s, &headers, Resource::Node(""), action)
        .map_err(IntoResponse::into_response)?;
    let bytes = axum::body::to_bytes(request.into_body(), MAX_BODY)
        .await
        .map_err(|_| {
            text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("Request body too large: the most is {MAX_BODY} bytes"),
            )
        })?;
    let value = signpost_core::request::body(&bytes).map_err(bad)?;
    Ok((headers, object(value, "the registration").map_err(bad)?))
}

fn check(value: Value, node: &str) -> Result<(String, Check), String> {
    let mut c = object(value, "a check")?;
    let service = c.string("serviceid")?.unwrap_or_default();
    let name = c.string("name")?.unwrap_or_default();
    let id = c
        .string("checkid")?
        .filter(|i| !i.is_empty())
        .unwrap_or_else(|| {
            if name.is_empty() {
                format!("{node}-check")
            } else {
                name.clone()
            }
        });
    let status: Health = c
        .string("status")?
        .unwrap_or_else(|| "critical".to_string())
        .parse()
        .map_err(|e: String| format!("Check {id:?}: {e}"))?;
    let mut out = Check {
        id,
        name,
        notes: c.string("notes")?.unwrap_or_default(),
        output: c.string("output")?.unwrap_or_default(),
        r#type: "external".to_string(),
        ..Check::default()
    };
    out.set_health(status);
    Ok((service, out))
}

/// `PUT /v1/catalog/register`: a node, optionally a service and checks;
/// what the node had stays (a service is added or replaced by ID).
pub(super) async fn register(State(s): State<HttpState>, request: Request) -> Response {
    let (headers, mut f) = match fields(&s, request, "catalog.register").await {
        Ok(x) => x,
        Err(answer) => return answer,
    };
    let parsed = (|| -> Result<_, String> {
        let node = f
            .string("node")?
            .filter(|n| !n.is_empty())
            .ok_or("Must provide node")?;
        let address = f
            .string("address")?
            .filter(|a| !a.is_empty())
            .ok_or("Must provide address")?;
        let meta = f.string_map("nodemeta")?;
        let service = match f.take("service") {
            None => None,
            Some(v) => {
                let mut sv = object(v, "Service")?;
                let name = sv.string("service")?.unwrap_or_default();
                let id = sv
                    .string("id")?
                    .filter(|i| !i.is_empty())
                    .unwrap_or_else(|| name.clone());
                let port = sv.u32("port")?;
                let mut instance = Instance {
                    id,
                    name,
                    address: sv.string("address")?.unwrap_or_default(),
                    port,
                    tags: sv.strings("tags")?,
                    meta: sv.string_map("meta")?.into_iter().collect(),
                    weight_passing: 1,
                    weight_warning: 1,
                    ..Instance::default()
                };
                if let Some(protocol) = instance.meta.get("protocol").cloned() {
                    let p: signpost_core::model::Protocol = protocol.parse()?;
                    instance.protocol = signpost_proto::Protocol::from(p).into();
                }
                Some(instance)
            }
        };
        let mut checks = Vec::new();
        if let Some(v) = f.take("check") {
            checks.push(check(v, &node)?);
        }
        if let Some(Value::Array(items)) = f.take("checks") {
            for v in items {
                checks.push(check(v, &node)?);
            }
        }
        Ok((node, address, meta, service, checks))
    })();
    let (node, address, meta, service, checks) = match parsed {
        Ok(x) => x,
        Err(e) => return bad(e),
    };
    if let Err(refused) = authorize(
        &s,
        &headers,
        Resource::Node(&node),
        Access::Write,
        "catalog.register",
        &node,
    ) {
        return refused.into_response();
    }
    if let Some(instance) = &service
        && let Err(refused) = authorize(
            &s,
            &headers,
            Resource::Service(&instance.name),
            Access::Write,
            "catalog.register",
            &instance.name,
        )
    {
        return refused.into_response();
    }
    let existing = s.catalog.read(|inner| {
        inner.nodes.get(&node).map(|n| {
            (
                n.hello.external,
                n.instances.values().cloned().collect::<Vec<_>>(),
                n.node_checks.clone(),
            )
        })
    });
    let (mut instances, mut node_checks) = match existing {
        Some((false, _, _)) => {
            return text(
                StatusCode::CONFLICT,
                format!("node {node:?} runs an agent: register its services through that agent"),
            );
        }
        Some((true, instances, node_checks)) => (instances, node_checks),
        None => (Vec::new(), Vec::new()),
    };
    let hello = Hello {
        node: node.clone(),
        address,
        meta: meta.into_iter().collect(),
        external: true,
        datacenter: s.datacenter.clone(),
        ..Hello::default()
    };
    if let Err(e) = reported::hello(&hello) {
        return bad(e.to_string());
    }
    if let Some(mut instance) = service {
        if let Some(old) = instances.iter().find(|i| i.id == instance.id) {
            instance.checks = old.checks.clone();
        }
        instances.retain(|i| i.id != instance.id);
        instances.push(instance);
    }
    for (service_id, c) in checks {
        if service_id.is_empty() {
            node_checks.retain(|x| x.id != c.id);
            node_checks.push(c);
        } else {
            let Some(instance) = instances.iter_mut().find(|i| i.id == service_id) else {
                return bad(format!(
                    "check {:?}: no service {service_id:?} on node {node:?}",
                    c.id
                ));
            };
            instance.checks.retain(|x| x.id != c.id);
            instance.checks.push(c);
        }
    }
    for instance in &instances {
        if let Err(e) = reported::instance(instance) {
            return bad(e.to_string());
        }
    }
    if let Err(e) = reported::checks("the node", &node_checks) {
        return bad(e.to_string());
    }
    let record = NodeSnapshot {
        hello: Some(hello),
        instances,
        node_checks,
        failed_at_unix_ms: 0,
    };
    store(&s, &node, Some(record)).await
}

/// Writes an external node's record where the catalog is kept.
async fn store(s: &HttpState, node: &str, record: Option<NodeSnapshot>) -> Response {
    match &s.nodes {
        Some(shared) => {
            let key = format!("nodes/{node}");
            let written = match record {
                Some(r) => shared.put(key, prost::Message::encode_to_vec(&r)).await,
                None => shared.delete(key).await,
            };
            match written {
                Ok(()) => boolean(true),
                Err(e) => super::store_failed(
                    matches!(e, crate::store::StoreError::Unavailable { .. }),
                    e.to_string(),
                ),
            }
        }
        None => {
            s.catalog.put_external(node, record);
            // A 200 means it is on disk: the snapshot now, not in a moment.
            use crate::store::Store as _;
            let store = crate::store::FileStore::new(&s.data_dir);
            match store.save(s.catalog.snapshot()).await {
                Ok(()) => boolean(true),
                Err(e) => super::store_failed(false, e.to_string()),
            }
        }
    }
}

/// `PUT /v1/catalog/deregister`: `{"Node"}` removes the node, with
/// `ServiceID` that service, with `CheckID` that check.
pub(super) async fn deregister(State(s): State<HttpState>, request: Request) -> Response {
    let (headers, mut f) = match fields(&s, request, "catalog.deregister").await {
        Ok(x) => x,
        Err(answer) => return answer,
    };
    let parsed = (|| -> Result<_, String> {
        let node = f
            .string("node")?
            .filter(|n| !n.is_empty())
            .ok_or("Must provide node")?;
        Ok((
            node,
            f.string("serviceid")?.filter(|x| !x.is_empty()),
            f.string("checkid")?.filter(|x| !x.is_empty()),
        ))
    })();
    let (node, service, check) = match parsed {
        Ok(x) => x,
        Err(e) => return bad(e),
    };
    if let Err(refused) = authorize(
        &s,
        &headers,
        Resource::Node(&node),
        Access::Write,
        "catalog.deregister",
        &node,
    ) {
        return refused.into_response();
    }
    let existing = s.catalog.read(|inner| {
        inner.nodes.get(&node).map(|n| NodeSnapshot {
            hello: Some(n.hello.clone()),
            instances: n.instances.values().cloned().collect(),
            node_checks: n.node_checks.clone(),
            failed_at_unix_ms: 0,
        })
    });
    let Some(mut record) = existing else {
        return boolean(true);
    };
    if !record.hello.as_ref().is_some_and(|h| h.external) {
        return text(
            StatusCode::CONFLICT,
            format!("node {node:?} runs an agent: deregister its services through that agent"),
        );
    }
    match (service, check) {
        (None, None) => store(&s, &node, None).await,
        (Some(id), _) => {
            record.instances.retain(|i| i.id != id);
            store(&s, &node, Some(record)).await
        }
        (None, Some(id)) => {
            record.node_checks.retain(|c| c.id != id);
            for i in &mut record.instances {
                i.checks.retain(|c| c.id != id);
            }
            store(&s, &node, Some(record)).await
        }
    }
}
