//! ACL tokens, policies and the audit log on a real control plane: the
//! bootstrap management token, roles kept as built-in policies, 401/403
//! with a clear message, hashed storage, the CLI, and an agent joining
//! with an ACL token. The submodules close the rest of the management
//! plane: per-service tokens and filtered reads on agents, node
//! identity, every write endpoint refusing anonymous requests, TLS and
//! client certificates, recovery and expiry.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

mod identity;
mod management;
mod policies;

use serde_json::{Value, json};
use signpost_tests::{ControlPlane, signpost};

pub(crate) fn bootstrap(cp: &ControlPlane) -> String {
    std::fs::read_to_string(cp.dir.path().join("data").join("bootstrap-token"))
        .unwrap()
        .trim()
        .to_string()
}

async fn create(cp: &ControlPlane, token: Option<&str>, role: &str) -> reqwest::Response {
    put_token(
        cp,
        token,
        json!({"Role": role, "Description": format!("a {role} token")}),
    )
    .await
}

/// `PUT /v1/acl/token` with `body`, presenting `token`.
async fn put_token(cp: &ControlPlane, token: Option<&str>, body: Value) -> reqwest::Response {
    let mut request = cp.client().put(cp.url("/v1/acl/token")).json(&body);
    if let Some(token) = token {
        request = request.header("X-Consul-Token", token);
    }
    request.send().await.unwrap()
}

/// A new token made by `admin` with `body`: (accessor, secret).
async fn token(cp: &ControlPlane, admin: &str, body: Value) -> (String, String) {
    let r = put_token(cp, Some(admin), body).await;
    assert_eq!(r.status(), 200);
    let t: Value = r.json().await.unwrap();
    (
        t["AccessorID"].as_str().unwrap().to_string(),
        t["SecretID"].as_str().unwrap().to_string(),
    )
}

/// A new token bound to `node` (its node identity): (accessor, secret).
async fn node_token(cp: &ControlPlane, admin: &str, node: &str) -> (String, String) {
    token(cp, admin, json!({"NodeIdentities": [{"NodeName": node}]})).await
}

/// The CLI against this control plane, with `token`.
fn cli(cp: &ControlPlane, token: &str, args: &[&str]) -> (i32, String, String) {
    let flags = cp.cli_flags();
    let mut all: Vec<&str> = flags.iter().map(String::as_str).collect();
    all.extend(["--token", token]);
    all.extend_from_slice(args);
    signpost(&all)
}

#[tokio::test]
async fn tokens_need_the_right_role_and_every_change_is_audited() {
    let mut cp = ControlPlane::start().await;
    let admin = bootstrap(&cp);

    // No token, an unknown one, a token with too small a role.
    let r = create(&cp, None, "operator").await;
    assert_eq!(r.status(), 401);
    let message = r.text().await.unwrap();
    assert!(message.contains("X-Consul-Token"), "{message}");
    assert_eq!(create(&cp, Some("not-a-token"), "read").await.status(), 401);
    let reader: Value = create(&cp, Some(&admin), "read")
        .await
        .json()
        .await
        .unwrap();
    let reader_secret = reader["SecretID"].as_str().unwrap().to_string();
    let r = create(&cp, Some(&reader_secret), "admin").await;
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("lacks acl write"));
    // Authorization: Bearer works as well as X-Consul-Token; the read
    // role is now its built-in policy.
    let r = cp
        .client()
        .get(cp.url("/v1/acl/token/self"))
        .bearer_auth(&reader_secret)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let me = r.json::<Value>().await.unwrap();
    assert_eq!(me["Policies"][0]["Name"], "builtin/global-read-only");

    // The CLI: create, list (no secrets), audit, delete; a refused token
    // exits with 77.
    let (code, out, err) = cli(
        &cp,
        &admin,
        &["acl", "token", "create", "--role", "operator", "--json"],
    );
    assert_eq!(code, 0, "{err}");
    let operator: Value = serde_json::from_str(&out).unwrap();
    let op_secret = operator["SecretID"].as_str().unwrap();
    let (code, out, _) = cli(&cp, &admin, &["acl", "token", "list"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("builtin/operator")
            && out.contains("builtin/global-read-only")
            && out.contains("global-management"),
        "{out}"
    );
    assert!(
        !out.contains(op_secret) && !out.contains(&admin),
        "no secret is listed"
    );
    let (code, _, err) = cli(
        &cp,
        op_secret,
        &["acl", "token", "create", "--role", "admin"],
    );
    assert_eq!(code, 77, "{err}");
    assert!(err.contains("403"), "{err}");
    let (code, out, err) = cli(&cp, op_secret, &["audit", "--json"]);
    assert_eq!(code, 0, "{err}");
    let audit: Vec<Value> = serde_json::from_str(&out).unwrap();
    let actions: Vec<(String, String)> = audit
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_string(),
                e["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        actions.contains(&("token.create".into(), "ok".into())),
        "{actions:?}"
    );
    assert!(
        actions
            .iter()
            .filter(|(a, o)| a == "token.create" && o.starts_with("denied"))
            .count()
            >= 3,
        // Those without a valid token: the first at once, the others
        // counted once a period.
        "every refused attempt is audited: {actions:?}"
    );
    let (code, out, _) = cli(&cp, op_secret, &["audit"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("WHO") && out.contains("denied: no token"),
        "{out}"
    );

    // Secrets are stored hashed; tokens and the audit log survive a
    // restart; the bootstrap file is never written again.
    let stored = std::fs::read_to_string(cp.dir.path().join("data").join("acl.json")).unwrap();
    assert!(!stored.contains(&admin) && !stored.contains(op_secret));
    std::fs::remove_file(cp.dir.path().join("data").join("bootstrap-token")).unwrap();
    cp.restart().await;
    assert!(!cp.dir.path().join("data").join("bootstrap-token").exists());
    let (code, out, _) = cli(&cp, &admin, &["acl", "token", "list", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<Vec<Value>>(&out).unwrap().len(), 3);
    let accessor = reader["AccessorID"].as_str().unwrap();
    let (code, _, err) = cli(&cp, &admin, &["acl", "token", "delete", accessor]);
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = cli(&cp, &reader_secret, &["audit"]);
    assert_eq!(code, 77, "a deleted token is refused");
    let (_, out, _) = cli(&cp, &admin, &["audit", "--json"]);
    let audit: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert!(
        audit
            .iter()
            .any(|e| e["action"] == "token.delete" && e["target"] == accessor)
    );
    assert!(
        audit
            .iter()
            .any(|e| e["action"] == "token.create" && e["who"] == "bootstrap"),
        "the audit log survived the restart"
    );
}

/// An agent joins with an ACL token that has the agent role; a read
/// token (which may not write any node) is refused.
#[tokio::test]
async fn an_agent_joins_with_an_acl_agent_token() {
    let cp = ControlPlane::start().await;
    let admin = bootstrap(&cp);
    let agent_token: Value = create(&cp, Some(&admin), "agent")
        .await
        .json()
        .await
        .unwrap();
    let secret = agent_token["SecretID"].as_str().unwrap();
    let agent = signpost_tests::Agent::start_named("acl-node", &cp.agent_config(secret)).await;
    agent
        .eventually("the agent to join", || async {
            let nodes = cp.get("/v1/nodes").await.json();
            (nodes
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["Node"] == "acl-node"))
            .then_some(())
        })
        .await;

    let reader: Value = create(&cp, Some(&admin), "read")
        .await
        .json()
        .await
        .unwrap();
    let refused = signpost_tests::Agent::start_named(
        "refused-node",
        &cp.agent_config(reader["SecretID"].as_str().unwrap()),
    )
    .await;
    refused
        .eventually("the refusal to be logged", || async {
            refused
                .log()
                .contains("may not register as node \\\"refused-node\\\"")
                .then_some(())
        })
        .await;
}
