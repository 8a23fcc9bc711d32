//! The management plane's doors: every write endpoint of the agent and
//! the control plane (enumerated from their routers) refuses a request
//! without a token; the control plane's API is HTTPS that the CLI
//! verifies; a lost management token is replaced only by someone who can
//! write on a control-plane host; tokens expire.

use super::*;
use signpost_daemon::routes::{Method, example_path};
use signpost_tests::{Agent, PATIENCE, poll};

/// Sends `method` to `url` without a token; the status.
async fn anonymous(client: &reqwest::Client, method: Method, url: &str) -> u16 {
    let method = match method {
        Method::Get => reqwest::Method::GET,
        Method::Post => reqwest::Method::POST,
        Method::Delete => reqwest::Method::DELETE,
        Method::Put | Method::Any => reqwest::Method::PUT,
    };
    client
        .request(method, url)
        .body("{}")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn every_write_endpoint_refuses_a_request_without_a_token() {
    let cp = ControlPlane::start_with("acl:\n  default_policy: deny\n").await;
    let admin = bootstrap(&cp);
    let (_, node) = node_token(&cp, &admin, "routes-node").await;
    let agent = Agent::start_named(
        "routes-node",
        &format!("{}acl:\n  default_policy: deny\n", cp.agent_config(&node),),
    )
    .await;
    let plain = signpost_tests::api_client().build().unwrap();

    let mut checked = 0;
    for (method, pattern) in signpost_agent::route_table() {
        if !method.writes() {
            continue;
        }
        let url = format!("{}{}", agent.base(), example_path(pattern));
        let status = anonymous(&plain, method, &url).await;
        assert!(
            status == 401 || status == 403,
            "the agent's {method:?} {pattern} answered {status} without a token"
        );
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} of the agent's write routes");

    let mut checked = 0;
    for (method, pattern) in signpost_control_plane::http::routes().table() {
        if !method.writes() {
            continue;
        }
        let url = cp.url(&example_path(pattern));
        let status = anonymous(cp.client(), *method, &url).await;
        assert!(
            status == 401 || status == 403,
            "the control plane's {method:?} {pattern} answered {status} without a token"
        );
        checked += 1;
    }
    assert!(
        checked >= 8,
        "only {checked} of the control plane's write routes"
    );
}

#[tokio::test]
async fn the_cli_reaches_the_control_plane_over_verified_tls_only() {
    let cp = ControlPlane::start().await;
    let other = ControlPlane::start().await;
    let admin = bootstrap(&cp);
    let (code, out, err) = cli(&cp, &admin, &["acl", "token", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<Vec<Value>>(&out).unwrap().len(), 1);

    // A CA that did not sign its certificate: refused, and not as a token
    // problem (77).
    let (code, _, err) = signpost(&[
        "--control-plane",
        &cp.http.to_string(),
        "--ca-file",
        other.ca_file().to_str().unwrap(),
        "--token",
        &admin,
        "acl",
        "token",
        "list",
    ]);
    assert!(code != 0 && code != 77, "{code}: {err}");
    assert!(err.contains("cannot reach the control plane"), "{err}");

    // Plain HTTP gets no answer from it.
    let plain = signpost_tests::api_client().build().unwrap();
    assert!(
        plain
            .get(format!("http://{}/v1/nodes", cp.http))
            .send()
            .await
            .is_err()
    );

    // A body without a JSON content type, as some of Consul's clients send.
    let r = cp
        .client()
        .put(cp.url("/v1/acl/policy"))
        .header("X-Consul-Token", &admin)
        .body(r#"{"Name": "plain", "Rules": "operator = \"read\""}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    // CONSUL_HTTP_TOKEN works as clients written for Consul expect.
    let out = std::process::Command::new(signpost_tests::signpost_bin())
        .args(cp.cli_flags())
        .args(["audit", "--json"])
        .env("CONSUL_HTTP_TOKEN", &admin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_lost_bootstrap_token_is_replaced_only_through_the_reset_file() {
    let cp = ControlPlane::start().await;
    let data = cp.dir.path().join("data");
    std::fs::remove_file(data.join("bootstrap-token")).unwrap();
    let bootstrap_again = || async {
        let r = cp
            .client()
            .put(cp.url("/v1/acl/bootstrap"))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let (status, text) = bootstrap_again().await;
    assert_eq!(status, 403);
    assert!(text.contains("reset index: 1"), "{text}");
    assert!(text.contains("acl-bootstrap-reset"), "{text}");

    // Root on the control-plane host writes the index it was told.
    std::fs::write(data.join("acl-bootstrap-reset"), "1\n").unwrap();
    let (status, text) = bootstrap_again().await;
    assert_eq!(status, 200, "{text}");
    let new: Value = serde_json::from_str(&text).unwrap();
    let secret = new["SecretID"].as_str().unwrap();
    let (code, _, err) = cli(&cp, secret, &["acl", "token", "list"]);
    assert_eq!(code, 0, "the new management token works: {err}");
    assert!(!data.join("acl-bootstrap-reset").exists());

    // Once only: the index moved on.
    std::fs::write(data.join("acl-bootstrap-reset"), "1\n").unwrap();
    let (status, text) = bootstrap_again().await;
    assert_eq!(status, 403);
    assert!(text.contains("reset index: 2"), "{text}");
    let (_, out, _) = cli(&cp, secret, &["audit", "--json"]);
    assert!(out.contains("acl.bootstrap"), "{out}");
    assert!(!cp.log().contains(secret), "the secret is not logged");
}

#[tokio::test]
async fn tokens_expire_and_are_deleted() {
    let cp = ControlPlane::start().await;
    let admin = bootstrap(&cp);
    let (accessor, secret) = token(
        &cp,
        &admin,
        json!({"Policies": [{"Name": "builtin/global-read-only"}], "ExpirationTTL": "2s"}),
    )
    .await;
    let whoami = || async {
        let r = cp
            .client()
            .get(cp.url("/v1/acl/token/self"))
            .header("X-Consul-Token", &secret)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let (status, text) = whoami().await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("ExpirationTime"), "{text}");
    let text = poll(
        "the token to expire",
        PATIENCE,
        || cp.log(),
        || async {
            let (status, text) = whoami().await;
            (status == 401).then_some(text)
        },
    )
    .await;
    assert!(text.contains("ACL not found"), "{text}");
    poll(
        "the expired token deleted",
        PATIENCE,
        || cp.log(),
        || async {
            let (_, out, _) = cli(&cp, &admin, &["audit", "--json"]);
            (out.contains("token.expire") && out.contains(&accessor)).then_some(())
        },
    )
    .await;
    let (_, out, _) = cli(&cp, &admin, &["acl", "token", "list", "--json"]);
    assert!(!out.contains(&accessor), "{out}");
}
