//! `/v1/agent/connect/*`: Consul's agent-local mesh endpoints, answered
//! from what this host's [`crate::mesh::Mesh`] holds, without a round trip
//! to the control plane: the roots, a local service's certificate (with
//! blocking queries, woken by the mesh's changes), and a connection's
//! verdict under the intentions this host enforces.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};
use signpost_core::acl::{Access, Resource};
use signpost_core::consul::{CaRoot, CaRootList, LeafCert};
use signpost_core::identity::ServiceIdentity;
use signpost_core::intention::{Intentions, rfc3339};
use signpost_proto::MeshState;

use super::render::json;
use super::{Api, ApiError, ApiResult, Params, blocking, decode};
use crate::mesh::Mesh;

/// How long a leaf request waits for a newly registered service's first
/// certificate.
const FIRST_LEAF_WAIT: Duration = Duration::from_secs(10);

/// This host's mesh, or the 500 Consul answers when Connect is off.
fn mesh(api: &Api) -> ApiResult<&Mesh> {
    api.mesh.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Connect must be enabled in order to use this endpoint: this agent takes no part in the mesh (mesh.enabled, with a control plane and the proxy)",
        )
    })
}

/// The roots and intentions the control plane sent, or a 503 until then.
fn state(mesh: &Mesh) -> ApiResult<MeshState> {
    mesh.roots().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this agent has not received the mesh's roots from the control plane yet; try again",
        )
    })
}

/// A certificate's not-before, in Unix seconds.
fn not_before(pem: &str) -> Option<u64> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    u64::try_from(cert.validity().not_before.timestamp()).ok()
}

/// The roots in Consul's shape, and their index: the newest root's
/// not-before (a rotation raises it), plus one per older root still
/// trusted (dropping it after a rotation changes the index too).
fn roots_of(state: &MeshState) -> (u64, CaRootList) {
    let newest = state
        .roots
        .iter()
        .filter_map(|r| not_before(&r.cert_pem))
        .max()
        .unwrap_or(0);
    let older = u64::try_from(state.roots.len().saturating_sub(1)).unwrap_or(0);
    let index = (newest + older).max(1);
    let list = CaRootList {
        active_root_id: state.active_root.clone(),
        trust_domain: state.trust_domain.clone(),
        roots: state
            .roots
            .iter()
            .map(|r| CaRoot {
                id: r.id.clone(),
                name: format!("Signpost mesh CA {}", r.id),
                root_cert: r.cert_pem.clone(),
                // The agent is sent the roots alone; certificates carry
                // the cross-signed copy themselves.
                intermediate_certs: Vec::new(),
                active: r.id == state.active_root,
                create_index: index,
                modify_index: index,
            })
            .collect(),
    };
    (index, list)
}

/// `GET /v1/agent/connect/ca/roots`: readable without a token, as in
/// Consul; blocking on `?index=`.
pub(crate) async fn roots(State(api): State<Api>, RawQuery(q): RawQuery) -> ApiResult<Response> {
    let mesh = mesh(&api)?;
    let changes = mesh.subscribe();
    let params = Params::parse(q.as_deref());
    blocking::answer_watching(&api, &params, changes, || {
        let (index, list) = roots_of(&state(mesh)?);
        Ok((index, json!(list)))
    })
    .await
}

fn system_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `service`'s certificate in Consul's shape, if it has one; its index is
/// its not-before (each renewal raises it).
fn leaf_of(
    mesh: &Mesh,
    state: &MeshState,
    datacenter: &str,
    service: &str,
) -> Option<(u64, LeafCert)> {
    let (cert_pem, key_pem, valid_after, valid_before) = mesh.leaf(service)?;
    let serial_number = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .ok()
        .and_then(|(_, pem)| {
            pem.parse_x509()
                .ok()
                .map(|cert| colon_hex(cert.raw_serial()))
        })
        .unwrap_or_default();
    let index = system_secs(valid_after).max(1);
    let service_uri = ServiceIdentity {
        trust_domain: state.trust_domain.clone(),
        datacenter: datacenter.to_string(),
        service: service.to_string(),
    }
    .uri();
    Some((
        index,
        LeafCert {
            serial_number,
            cert_pem,
            private_key_pem: key_pem,
            service: service.to_string(),
            service_uri,
            valid_after: rfc3339(system_secs(valid_after) * 1000),
            valid_before: rfc3339(system_secs(valid_before) * 1000),
            create_index: index,
            modify_index: index,
        },
    ))
}

/// Bytes as Consul writes serial numbers: `0a:ff:...`.
fn colon_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `GET /v1/agent/connect/ca/leaf/<service>`: the certificate and key of a
/// service registered here (needs `service` write on it, as Consul);
/// blocking on `?index=` until it is renewed.
pub(crate) async fn leaf(
    State(api): State<Api>,
    Path(service): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Response> {
    api.allow(
        &headers,
        Resource::Service(&service),
        Access::Write,
        "connect.leaf",
    )
    .await?;
    let mesh = mesh(&api)?;
    let registered = api.agent.state.read(|inner| {
        inner
            .services
            .values()
            .any(|s| s.def.name.as_str() == service)
    });
    if !registered {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "service {service:?} is not registered on this agent: its certificate is made where it runs"
            ),
        ));
    }
    let datacenter = api.agent.config.datacenter.clone();
    let mut changes = mesh.subscribe();
    // A service registered a moment ago gets its first certificate soon.
    let deadline = tokio::time::Instant::now() + FIRST_LEAF_WAIT;
    while mesh.leaf(&service).is_none() {
        tokio::select! {
            _ = api.shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(deadline) => break,
            changed = changes.changed() => if changed.is_err() { break },
        }
    }
    let params = Params::parse(q.as_deref());
    blocking::answer_watching(&api, &params, mesh.subscribe(), || {
        let state = state(mesh)?;
        let (index, leaf) = leaf_of(mesh, &state, &datacenter, &service).ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("service {service:?} has no mesh certificate yet: this agent asks the control plane for one; try again"),
            )
        })?;
        Ok((index, json!(leaf)))
    })
    .await
}

/// Consul's verdict for a connection from `client_uri` to `target`
/// under `intentions`: whether it is authorized and why, or what is
/// wrong with the URI. An identity from another trust domain is never
/// authorized; a deny in shadow mode is (and says so).
pub(crate) fn decide(
    intentions: &Intentions,
    trust_domain: &str,
    target: &str,
    client_uri: &str,
) -> Result<(bool, String), String> {
    let id = ServiceIdentity::parse(client_uri).ok_or_else(|| {
        format!(
            "ClientCertURI not a valid Connect identifier: {client_uri:?} (expected spiffe://<trust domain>/dc/<dc>/svc/<service>)"
        )
    })?;
    if id.trust_domain != trust_domain {
        return Ok((
            false,
            format!(
                "Identity from an external trust domain: {} (this mesh's is {trust_domain})",
                id.trust_domain
            ),
        ));
    }
    let decision = intentions.connection(&id.service, target);
    let reason = if decision.shadow_denied {
        format!(
            "{} (shadow mode: allowed, and logged as denied)",
            decision.reason
        )
    } else {
        decision.reason
    };
    Ok((decision.allowed, reason))
}

/// `Target` and `ClientCertURI` of an authorize body.
fn authorize_request(value: Value) -> Result<(String, String), String> {
    let mut f = signpost_core::request::object(value, "the request")?;
    let target = f.string("target")?.unwrap_or_default();
    let uri = f.string("clientcerturi")?.unwrap_or_default();
    if target.is_empty() {
        return Err("Target service must be specified".to_string());
    }
    if uri.is_empty() {
        return Err("ClientCertURI must be specified".to_string());
    }
    Ok((target, uri))
}

/// `POST /v1/agent/connect/authorize` (`{"Target", "ClientCertURI"}`):
/// `{"Authorized", "Reason"}` for a connection (an intention with HTTP
/// permissions denies it, as Consul's does), from the intentions this
/// host enforces. Needs `service` write on the target, as Consul.
pub(crate) async fn authorize(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let request = decode::body(&body).and_then(authorize_request);
    // A body that names no target needs write on every service to hear why.
    let target = request.as_ref().map_or("", |(t, _)| t.as_str());
    api.allow(
        &headers,
        Resource::Service(target),
        Access::Write,
        "connect.authorize",
    )
    .await?;
    let (target, uri) = request.map_err(ApiError::bad_request)?;
    let mesh = mesh(&api)?;
    let state = state(mesh)?;
    let (authorized, reason) = decide(&mesh.intentions(), &state.trust_domain, &target, &uri)
        .map_err(ApiError::bad_request)?;
    Ok(json(&json!({ "Authorized": authorized, "Reason": reason })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use signpost_core::intention::{Action, Intention};

    fn intention(source: &str, destination: &str, action: Action, shadow: bool) -> Intention {
        Intention {
            id: format!("{source}-{destination}"),
            source: source.into(),
            destination: destination.into(),
            action: Some(action),
            permissions: Vec::new(),
            shadow,
            description: String::new(),
            meta: Default::default(),
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn authorize_reads_the_uri_and_refuses_other_trust_domains() {
        let set = Intentions::new(
            vec![
                intention("web", "db", Action::Allow, false),
                intention("*", "db", Action::Deny, false),
                intention("batch", "api", Action::Deny, true),
            ],
            Action::Deny,
            false,
        );
        let td = "signpost.mesh";
        let web = "spiffe://signpost.mesh/dc/dc1/svc/web";
        let (ok, why) = decide(&set, td, "db", web).unwrap();
        assert!(ok, "{why}");
        assert!(why.contains("web → db"), "{why}");
        let (ok, _) = decide(&set, td, "db", "spiffe://signpost.mesh/dc/dc2/svc/api").unwrap();
        assert!(!ok, "* → db denies");
        let (ok, why) = decide(&set, td, "api", "spiffe://signpost.mesh/dc/dc1/svc/batch").unwrap();
        assert!(ok && why.contains("shadow"), "{why}");
        let (ok, why) = decide(&set, td, "db", "spiffe://other.mesh/dc/dc1/svc/web").unwrap();
        assert!(!ok && why.contains("external trust domain"), "{why}");
        for bad in [
            "web",
            "spiffe://signpost.mesh/ns/default/dc/dc1/svc/web",
            "https://signpost.mesh/dc/dc1/svc/web",
            "",
        ] {
            let e = decide(&set, td, "db", bad).unwrap_err();
            assert!(e.contains("not a valid Connect identifier"), "{e}");
        }
    }

    #[test]
    fn authorize_bodies_need_a_target_and_a_uri() {
        let body = |text: &str| decode::body(text.as_bytes()).and_then(authorize_request);
        assert_eq!(
            body(r#"{"Target": "db", "ClientCertURI": "spiffe://x/dc/a/svc/web"}"#).unwrap(),
            ("db".to_string(), "spiffe://x/dc/a/svc/web".to_string())
        );
        assert_eq!(
            body(r#"{"target": "db", "client_cert_uri": "u"}"#)
                .unwrap()
                .1,
            "u"
        );
        assert!(
            body(r#"{"ClientCertURI": "u"}"#)
                .unwrap_err()
                .contains("Target")
        );
        assert!(
            body(r#"{"Target": "db"}"#)
                .unwrap_err()
                .contains("ClientCertURI")
        );
        assert!(body("[]").is_err());
    }

    fn root(id: &str, not_before_secs: u64) -> signpost_proto::MeshRoot {
        let mut params = rcgen::CertificateParams::default();
        params.not_before = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(not_before_secs);
        params.not_after = params.not_before + Duration::from_secs(3600);
        let key = rcgen::KeyPair::generate().unwrap();
        signpost_proto::MeshRoot {
            id: id.into(),
            cert_pem: params.self_signed(&key).unwrap().pem(),
        }
    }

    #[test]
    fn the_roots_index_moves_with_a_rotation_and_a_prune() {
        let old = root("a", 1_000_000);
        let new = root("b", 2_000_000);
        let state = |roots: Vec<signpost_proto::MeshRoot>, active: &str| MeshState {
            trust_domain: "signpost.mesh".into(),
            roots,
            active_root: active.into(),
            ..MeshState::default()
        };
        let (before, list) = roots_of(&state(vec![old.clone()], "a"));
        let (during, rotated) = roots_of(&state(vec![old, new.clone()], "b"));
        let (after, _) = roots_of(&state(vec![new], "b"));
        assert_eq!((before, during, after), (1_000_000, 2_000_001, 2_000_000));
        assert_eq!(list.active_root_id, "a");
        assert!(list.roots[0].active);
        let active: Vec<bool> = rotated.roots.iter().map(|r| r.active).collect();
        assert_eq!(active, [false, true]);
        assert_eq!(rotated.roots[1].name, "Signpost mesh CA b");
        let (none, _) = roots_of(&MeshState::default());
        assert_eq!(none, 1);
    }

    #[test]
    fn serials_are_colon_hex() {
        assert_eq!(colon_hex(&[0x0a, 0xff, 0x10]), "0a:ff:10");
        assert_eq!(colon_hex(&[]), "");
    }
}
