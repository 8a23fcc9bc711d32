//! Agents on `acl.default_policy: deny`: a service's token registers and
//! updates only that service, reads are filtered by what a token may
//! read (on the agent and the control plane), every refusal reaches the
//! control plane's audit log, and no secret reaches a log.

use reqwest::header::HeaderMap;

use super::*;
use signpost_tests::Agent;

/// A request to `url` presenting `token`: status, body, headers.
async fn call(
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, String, HeaderMap) {
    let mut request = signpost_tests::api_client()
        .build()
        .unwrap()
        .request(method, url);
    if let Some(token) = token {
        request = request.header("X-Consul-Token", token);
    }
    if let Some(body) = body {
        request = request.body(body.to_string());
    }
    let r = request.send().await.unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, r.text().await.unwrap(), headers)
}

/// `path` on `cp` with `token`: status, JSON and whether it was filtered.
async fn cp_get(cp: &ControlPlane, path: &str, token: Option<&str>) -> (u16, Value, bool) {
    let mut request = cp.client().get(cp.url(path));
    if let Some(token) = token {
        request = request.header("X-Consul-Token", token);
    }
    let r = request.send().await.unwrap();
    let filtered = r
        .headers()
        .contains_key("x-consul-results-filtered-by-acls");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null), filtered)
}

/// A control plane and an agent, both on default deny; the agent joins
/// as `node` with a token bound to that node. Returns the management
/// token and the node's token.
async fn deny_fleet(node: &str) -> (ControlPlane, Agent, String, String) {
    let cp = ControlPlane::start_with("acl:\n  default_policy: deny\n").await;
    let admin = bootstrap(&cp);
    let (_, node_secret) = node_token(&cp, &admin, node).await;
    let agent = Agent::start_named(
        node,
        &format!(
            "{}acl:\n  default_policy: deny\n",
            cp.agent_config(&node_secret)
        ),
    )
    .await;
    agent
        .eventually("the agent to join", || async {
            let (_, nodes, _) = cp_get(&cp, "/v1/nodes", Some(&admin)).await;
            nodes
                .as_array()?
                .iter()
                .any(|n| n["Node"] == node)
                .then_some(())
        })
        .await;
    (cp, agent, admin, node_secret)
}

fn service(name: &str, port: u16) -> Value {
    json!({"Name": name, "ID": format!("{name}-1"), "Port": port,
           "Check": {"CheckID": format!("{name}-ttl"), "TTL": "1h"}})
}

#[tokio::test]
async fn a_service_token_registers_only_its_service_and_refusals_are_audited() {
    let (cp, agent, admin, node_secret) = deny_fleet("deny-node").await;
    let (web_accessor, web) = token(
        &cp,
        &admin,
        json!({"ServiceIdentities": [{"ServiceName": "web"}]}),
    )
    .await;
    let (_, db) = token(
        &cp,
        &admin,
        json!({"ServiceIdentities": [{"ServiceName": "db"}]}),
    )
    .await;
    let url = |path: &str| format!("{}{path}", agent.base());
    let put = reqwest::Method::PUT;
    let register = url("/v1/agent/service/register");

    // Its own service: yes. Another, or none: 403 naming what it needs.
    let (status, text, _) = call(
        put.clone(),
        &register,
        Some(&web),
        Some(service("web", 8080)),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let (status, text, _) = call(
        put.clone(),
        &register,
        Some(&web),
        Some(service("db", 5432)),
    )
    .await;
    assert_eq!(status, 403);
    assert!(text.contains("service \"db\" write"), "{text}");
    let (status, _, _) = call(put.clone(), &register, None, Some(service("web", 8080))).await;
    assert_eq!(status, 403, "no token, default deny");
    let (status, _, _) = call(
        put.clone(),
        &register,
        Some("not-a-token"),
        Some(service("web", 8080)),
    )
    .await;
    assert_eq!(status, 403);

    // Its checks and maintenance follow the service's token.
    for path in [
        "/v1/agent/check/pass/web-ttl",
        "/v1/agent/service/maintenance/web-1?enable=true",
        "/v1/agent/service/deregister/web-1",
    ] {
        let (status, _, _) = call(put.clone(), &url(path), Some(&db), None).await;
        assert_eq!(status, 403, "{path} with another service's token");
    }
    let (status, text, _) = call(
        put.clone(),
        &url("/v1/agent/check/pass/web-ttl"),
        Some(&web),
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    // The node's maintenance needs the node's token; reading the agent
    // needs agent read (the node's identity has it).
    let maint = url("/v1/agent/maintenance?enable=true&reason=r");
    assert_eq!(call(put.clone(), &maint, Some(&web), None).await.0, 403);
    assert_eq!(
        call(put.clone(), &maint, Some(&node_secret), None).await.0,
        200
    );
    let self_url = url("/v1/agent/self");
    assert_eq!(
        call(reqwest::Method::GET, &self_url, None, None).await.0,
        403
    );
    assert_eq!(
        call(reqwest::Method::GET, &self_url, Some(&node_secret), None)
            .await
            .0,
        200
    );
    let (status, _, _) = call(
        put,
        &url("/v1/agent/service/deregister/web-1"),
        Some(&web),
        None,
    )
    .await;
    assert_eq!(status, 200);

    // The agent's refusals are in the control plane's audit log: who,
    // what and why.
    let entry = agent
        .eventually("the agent's refusal in the audit log", || async {
            let (_, audit, _) = cp_get(&cp, "/v1/audit?limit=1000", Some(&admin)).await;
            audit
                .as_array()?
                .iter()
                .find(|e| {
                    e["who"] == web_accessor.as_str()
                        && e["action"] == "service.register"
                        && e["target"] == "service \"db\""
                })
                .cloned()
        })
        .await;
    assert_eq!(entry["outcome"], "denied: needs service \"db\" write");
    assert!(
        entry["reason"].as_str().unwrap().contains("deny-node"),
        "{entry}"
    );

    // No secret in any log.
    for secret in [&admin, &node_secret, &web, &db] {
        assert!(
            !cp.log().contains(secret.as_str()),
            "a secret in the control plane's log"
        );
        assert!(
            !agent.log().contains(secret.as_str()),
            "a secret in the agent's log"
        );
    }
}

#[tokio::test]
async fn a_read_only_token_sees_filtered_catalogs() {
    let (cp, agent, admin, _) = deny_fleet("read-node").await;
    let register = format!("{}/v1/agent/service/register", agent.base());
    for (name, port) in [("web", 8080), ("db", 5432)] {
        let (status, text, _) = call(
            reqwest::Method::PUT,
            &register,
            Some(&admin),
            Some(service(name, port)),
        )
        .await;
        assert_eq!(status, 200, "{text}");
    }
    let r = cp
        .client()
        .put(cp.url("/v1/acl/policy"))
        .header("X-Consul-Token", &admin)
        .json(&json!({"Name": "web-reader", "Rules":
            "service \"web\" { policy = \"read\" }\nnode_prefix \"\" { policy = \"read\" }"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, reader) = token(&cp, &admin, json!({"Policies": [{"Name": "web-reader"}]})).await;

    // The agent: web only, and it says so.
    let get = |path: &str, token: Option<String>| {
        let url = format!("{}{path}", agent.base());
        async move { call(reqwest::Method::GET, &url, token.as_deref(), None).await }
    };
    let (status, text, headers) = get("/v1/catalog/services", Some(reader.clone())).await;
    assert_eq!(status, 200);
    let names: Value = serde_json::from_str(&text).unwrap();
    assert!(
        names.get("web").is_some() && names.get("db").is_none(),
        "{names}"
    );
    assert_eq!(headers["x-consul-results-filtered-by-acls"], "true");
    let (_, text, headers) = get("/v1/health/service/db", Some(reader.clone())).await;
    assert_eq!(text, "[]");
    assert_eq!(headers["x-consul-results-filtered-by-acls"], "true");
    let (_, text, headers) = get("/v1/health/service/web", Some(reader.clone())).await;
    assert_eq!(
        serde_json::from_str::<Value>(&text)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert!(
        !headers.contains_key("x-consul-results-filtered-by-acls"),
        "nothing hidden"
    );
    let (_, text, _) = get("/v1/agent/services", Some(reader.clone())).await;
    let services: Value = serde_json::from_str(&text).unwrap();
    assert!(
        services.get("web-1").is_some() && services.get("db-1").is_none(),
        "{services}"
    );
    let (_, text, _) = get("/v1/catalog/services", None).await;
    assert_eq!(text, "{}", "nothing without a token");
    let (status, _, _) = get("/v1/agent/service/register", Some(reader.clone())).await;
    assert_eq!(status, 405, "the route only takes PUT");
    let (status, _, _) = call(
        reqwest::Method::PUT,
        &register,
        Some(&reader),
        Some(service("web", 8081)),
    )
    .await;
    assert_eq!(status, 403, "read is not write");

    // The control plane filters the same way.
    let (_, names, filtered) = cp_get(&cp, "/v1/catalog/services", Some(&reader)).await;
    assert!(
        names.get("web").is_some() && names.get("db").is_none(),
        "{names}"
    );
    assert!(filtered);
    let (_, names, filtered) = cp_get(&cp, "/v1/catalog/services", None).await;
    assert_eq!(names, json!({}));
    assert!(filtered);
    let (_, entries, _) = cp_get(&cp, "/v1/health/service/db", Some(&reader)).await;
    assert_eq!(entries, json!([]));
}

#[tokio::test]
async fn kv_obeys_key_prefix_rules_and_refusals_are_audited() {
    let (cp, agent, admin, _) = deny_fleet("kv-acl-node").await;
    let r = cp
        .client()
        .put(cp.url("/v1/acl/policy"))
        .header("X-Consul-Token", &admin)
        .json(&json!({"Name": "app-config", "Rules":
            "key_prefix \"app/\" { policy = \"write\" }\nkey_prefix \"app/secret/\" { policy = \"deny\" }\nsession_prefix \"\" { policy = \"write\" }"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (accessor, app) = token(&cp, &admin, json!({"Policies": [{"Name": "app-config"}]})).await;
    let url = |path: &str| format!("{}{path}", agent.base());
    let put = |path: &str, token: Option<String>| {
        let url = url(path);
        async move {
            let (status, text, _) = call(reqwest::Method::PUT, &url, token.as_deref(), None).await;
            (status, text)
        }
    };
    assert_eq!(
        put("/v1/kv/app/timeout", Some(app.clone())).await,
        (200, "true".into())
    );
    assert_eq!(
        put("/v1/kv/app/secret/key", Some(admin.clone())).await.0,
        200
    );
    // Outside its prefix, under its deny, or without a token: 403.
    for (path, token) in [
        ("/v1/kv/other/x", Some(app.clone())),
        ("/v1/kv/app/secret/key", Some(app.clone())),
        ("/v1/kv/app/timeout", None),
    ] {
        let (status, text) = put(path, token).await;
        assert!(status == 403 || status == 401, "{path}: {status} {text}");
    }
    // Reads: a denied key is a 403, a listing leaves it out and says so.
    let (status, _, _) = call(
        reqwest::Method::GET,
        &url("/v1/kv/app/secret/key"),
        Some(&app),
        None,
    )
    .await;
    assert_eq!(status, 403);
    let (status, text, headers) = call(
        reqwest::Method::GET,
        &url("/v1/kv/app/?recurse"),
        Some(&app),
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let keys: Vec<String> = serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, ["app/timeout"]);
    assert_eq!(headers["x-consul-results-filtered-by-acls"], "true");
    // A transaction touching a denied key is refused whole.
    let txn = json!([{"KV": {"Verb": "set", "Key": "app/a"}}, {"KV": {"Verb": "get", "Key": "app/secret/key"}}]);
    let (status, _, _) = call(reqwest::Method::PUT, &url("/v1/txn"), Some(&app), Some(txn)).await;
    assert_eq!(status, 403);
    let (status, _, _) = call(
        reqwest::Method::GET,
        &url("/v1/kv/app/a"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(status, 404, "nothing of it was written");
    // The control plane audited the refusals: who, what, which key.
    let entry = agent
        .eventually("the KV refusal in the audit log", || async {
            let (_, audit, _) = cp_get(&cp, "/v1/audit?limit=1000", Some(&admin)).await;
            audit
                .as_array()?
                .iter()
                .find(|e| {
                    e["who"] == accessor.as_str()
                        && e["action"] == "kv.write"
                        && e["target"] == "other/x"
                })
                .cloned()
        })
        .await;
    assert!(
        entry["outcome"]
            .as_str()
            .unwrap()
            .contains("key \"other/x\""),
        "{entry}"
    );
}

/// Intentions obey `intentions` on service rules, as Consul's: a token
/// with `intentions = "write"` on `web` writes web's intentions (through
/// the CLI and through the agent), not db's; reading needs intentions
/// read on the source or the destination.
#[tokio::test]
async fn intentions_need_intentions_write_on_their_destination() {
    let (cp, agent, admin, _) = deny_fleet("intentions-acl-node").await;
    let r = cp
        .client()
        .put(cp.url("/v1/acl/policy"))
        .header("X-Consul-Token", &admin)
        .json(&json!({"Name": "web-owners", "Rules":
            "service \"web\" { policy = \"read\" intentions = \"write\" }"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, owner) = token(&cp, &admin, json!({"Policies": [{"Name": "web-owners"}]})).await;

    // The CLI, against the control plane.
    let (code, _, err) = cli(
        &cp,
        &owner,
        &["intention", "create", "--deny", "api", "web"],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cli(&cp, &owner, &["intention", "create", "--deny", "api", "db"]);
    assert_eq!(code, 77, "db's intentions are not the token's: {err}");
    let (code, out, _) = cli(&cp, &owner, &["intention", "check", "api", "web"]);
    assert_eq!(code, 1, "denied: {out}");
    let (code, out, err) = cli(&cp, &owner, &["intention", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let listed: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["SourceName"], "api");
    assert_eq!(listed[0]["DestinationName"], "web");
    assert_eq!(listed[0]["Action"], "deny");

    // Through the agent, which forwards: the same rules.
    let url = |path: &str| format!("{}{path}", agent.base());
    let body = json!({"SourceName": "*", "DestinationName": "web", "Action": "allow"});
    let (status, text, _) = call(
        reqwest::Method::POST,
        &url("/v1/connect/intentions"),
        Some(&owner),
        Some(body.clone()),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let (status, _, _) = call(
        reqwest::Method::POST,
        &url("/v1/connect/intentions"),
        None,
        Some(body),
    )
    .await;
    assert!(status == 401 || status == 403, "anonymous: {status}");
    // A token that may not read web's intentions sees none of them.
    let r = cp
        .client()
        .put(cp.url("/v1/acl/policy"))
        .header("X-Consul-Token", &admin)
        .json(&json!({"Name": "config-readers", "Rules": "key_prefix \"config/\" { policy = \"read\" }"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, nobody) = token(
        &cp,
        &admin,
        json!({"Policies": [{"Name": "config-readers"}]}),
    )
    .await;
    let (status, text, headers) = call(
        reqwest::Method::GET,
        &url("/v1/connect/intentions"),
        Some(&nobody),
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), json!([]));
    assert_eq!(headers["x-consul-results-filtered-by-acls"], "true");

    let (code, _, err) = cli(&cp, &owner, &["intention", "delete", "api", "web"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = cli(&cp, &owner, &["intention", "check", "api", "web"]);
    assert_eq!(code, 0, "allowed again by '*' -> web");
}
