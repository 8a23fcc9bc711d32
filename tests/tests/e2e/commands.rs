//! Operator commands end to end: created with the CLI on a real control
//! plane, applied by a real agent's proxy to real traffic, expired and
//! revoked, kept across an agent restart with the control plane down.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

use std::time::Instant;

use serde_json::Value;
use signpost_tests::upstream::{client, spread, upstreams, vip, vip_client};
use signpost_tests::{AGENT_TOKEN, Agent, ControlPlane, signpost};

/// An operator token's secret, made with the bootstrap admin token.
fn operator(cp: &ControlPlane) -> String {
    let admin = std::fs::read_to_string(cp.dir.path().join("data").join("bootstrap-token"))
        .unwrap()
        .trim()
        .to_string();
    let (code, out, err) = cmd(
        cp,
        &admin,
        &["acl", "token", "create", "--role", "operator", "--json"],
    );
    assert_eq!(code, 0, "{err}");
    let token: Value = serde_json::from_str(&out).unwrap();
    token["SecretID"].as_str().unwrap().to_string()
}

fn cmd(cp: &ControlPlane, token: &str, args: &[&str]) -> (i32, String, String) {
    let flags = cp.cli_flags();
    let mut all: Vec<&str> = flags.iter().map(String::as_str).collect();
    all.extend(["--token", token]);
    all.extend_from_slice(args);
    signpost(&all)
}

/// Creates a command with the CLI; returns its id.
fn create(cp: &ControlPlane, token: &str, args: &[&str]) -> String {
    let mut all = vec!["cmd"];
    all.extend_from_slice(args);
    all.push("--json");
    let (code, out, err) = cmd(cp, token, &all);
    assert_eq!(code, 0, "{args:?}: {err}");
    let command: Value = serde_json::from_str(&out).unwrap();
    command["id"].as_str().unwrap().to_string()
}

async fn agent(cp: &ControlPlane) -> Agent {
    let range = format!("127.75.{}.0/24", rand::random_range(0..=255u8));
    Agent::start_named(
        "cmd-node",
        &format!(
            "{}dns:\n  recursors: []\nproxy:\n  vip_range: {range}\n  defaults:\n    balancer: round_robin\n",
            cp.agent_config(AGENT_TOKEN),
        ),
    )
    .await
}

#[tokio::test]
async fn block_degrade_circuit_and_policy_change_traffic_until_revoked_or_expired() {
    let cp = ControlPlane::start().await;
    let token = operator(&cp);
    let web = upstreams("web", 2).await;
    let mut agent = agent(&cp).await;
    let entries: String = web.iter().map(|u| u.entry("web", "http")).collect();
    agent.write_service_file("web.yaml", &format!("services:\n{entries}"));
    let port = web[0].addr.port();
    let (c, url) = vip_client(&agent, "web", port).await;
    assert_eq!(spread(&c, &url, 10).await.len(), 2);

    // Block web-1: it gets nothing.
    let instance = web[0].addr.to_string();
    let block = create(
        &cp,
        &token,
        &[
            "block", "web", &instance, "--reason", "bad disk", "--ttl", "10m",
        ],
    );
    agent
        .eventually("web-1 to be blocked", || async {
            let seen = spread(&c, &url, 10).await;
            (seen.get("web-2") == Some(&10)).then_some(())
        })
        .await;
    // The control plane knows the agent applied it (the agent's
    // acknowledgement travels apart from the traffic it changed).
    let shown = agent
        .eventually("the block's acknowledgement", || async {
            let (_, out, _) = cmd(&cp, &token, &["cmd", "show", &block, "--json"]);
            let shown: Value = serde_json::from_str(&out).unwrap();
            (shown["applied"] == 1).then_some(shown)
        })
        .await;
    assert_eq!(shown["state"], "active");
    assert_eq!(
        shown["applied_by"],
        serde_json::json!(["cmd-node"]),
        "{shown}"
    );
    assert_eq!(shown["agents_subscribed"], 1, "the agent uses web: {shown}");

    // Degrade with a fallback answer: the service is not called.
    let degrade = create(
        &cp,
        &token,
        &[
            "degrade",
            "web",
            "--status",
            "200",
            "--body",
            "cached answer",
            "--header",
            "x-from: fallback",
            "--reason",
            "db down",
            "--ttl",
            "10m",
        ],
    );
    let hits = web[1].hits();
    agent
        .eventually("the fallback answer", || async {
            let r = c.get(&url).send().await.unwrap();
            let from = r.headers().get("x-from").cloned();
            (r.text().await.unwrap() == "cached answer" && from.is_some()).then_some(())
        })
        .await;
    let settled = web[1].hits();
    for _ in 0..5 {
        assert_eq!(
            c.get(&url).send().await.unwrap().text().await.unwrap(),
            "cached answer"
        );
    }
    assert_eq!(web[1].hits(), settled, "a degraded service is not called");
    assert!(settled >= hits);

    // Revoke both; open the circuit instead: fail fast with the reason.
    for id in [&block, &degrade] {
        let (code, _, err) = cmd(&cp, &token, &["cmd", "revoke", id]);
        assert_eq!(code, 0, "{err}");
    }
    // A route: only GET /search is degraded; the rest is served.
    let route = create(
        &cp,
        &token,
        &[
            "degrade",
            "web",
            "--path",
            "/search",
            "--method",
            "get",
            "--status",
            "200",
            "--body",
            "no results",
            "--reason",
            "search down",
            "--ttl",
            "10m",
        ],
    );
    let search = format!("http://web.service.internal:{port}/search?q=x");
    agent
        .eventually("the route to be degraded", || async {
            let r = c.get(&search).send().await.unwrap();
            (r.text().await.unwrap() == "no results").then_some(())
        })
        .await;
    // One instance degraded: the requests it would get get the fallback.
    let one = create(
        &cp,
        &token,
        &[
            "degrade",
            "web",
            "--instance",
            &instance,
            "--status",
            "200",
            "--body",
            "from the fallback",
            "--reason",
            "web-1 slow",
            "--ttl",
            "10m",
        ],
    );
    agent
        .eventually("web-1's share to be answered by the fallback", || async {
            // Round robin: each instance gets 4 to 6 of 10.
            let seen = spread(&c, &url, 10).await;
            let fallback = seen.get("from the fallback").copied().unwrap_or(0);
            let web2 = seen.get("web-2").copied().unwrap_or(0);
            (fallback >= 4 && web2 >= 4 && !seen.contains_key("web-1")).then_some(())
        })
        .await;
    cmd(&cp, &token, &["cmd", "revoke", &one]);
    // The revoke reaches the agent asynchronously: until web-1 answers again,
    // a request sent its way would still get the instance's fallback.
    agent
        .eventually("web-1 to serve again", || async {
            spread(&c, &url, 10)
                .await
                .contains_key("web-1")
                .then_some(())
        })
        .await;
    let post = c.post(&search).send().await.unwrap().text().await.unwrap();
    assert!(post.starts_with("web-"), "POST is not in the route: {post}");
    cmd(&cp, &token, &["cmd", "revoke", &route]);

    create(
        &cp,
        &token,
        &[
            "circuit", "web", "open", "--reason", "overload", "--ttl", "5s",
        ],
    );
    agent
        .eventually("the circuit to open", || async {
            let r = c.get(&url).send().await.unwrap();
            (r.status() == 503 && r.headers()["x-signpost-error"] == "circuit_open").then_some(())
        })
        .await;
    // It expires by itself: traffic flows again, to both instances.
    agent
        .eventually("the circuit to expire", || async {
            (c.get(&url).send().await.unwrap().status() == 200).then_some(())
        })
        .await;
    assert_eq!(spread(&c, &url, 10).await.len(), 2);

    // A rate limit: a burst of 5, then 429 with the reason.
    let limit = create(
        &cp,
        &token,
        &[
            "ratelimit",
            "web",
            "--per-second",
            "1",
            "--burst",
            "5",
            "--reason",
            "abuse",
            "--ttl",
            "10m",
        ],
    );
    let mut statuses = Vec::new();
    agent
        .eventually("the rate limit to apply", || async {
            let r = c.get(&url).send().await.unwrap();
            let limited = r.status() == 429 && r.headers()["x-signpost-error"] == "rate_limited";
            limited.then_some(())
        })
        .await;
    let emptied = Instant::now();
    for _ in 0..20 {
        statuses.push(c.get(&url).send().await.unwrap().status().as_u16());
    }
    // One token a second refills the emptied bucket while they run.
    let refill = emptied.elapsed().as_secs() as usize + 1;
    let allowed = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        allowed <= refill,
        "at most the refill ({refill}) gets through: {statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        20 - allowed,
        "{statuses:?}"
    );
    let (code, _, _) = cmd(&cp, &token, &["cmd", "revoke", &limit]);
    assert_eq!(code, 0);
    agent
        .eventually("the rate limit to be lifted", || async {
            (c.get(&url).send().await.unwrap().status() == 200).then_some(())
        })
        .await;

    // A command for other callers: this host runs no `billing`, so its
    // traffic is untouched once the command is applied.
    let other = create(
        &cp,
        &token,
        &[
            "circuit",
            "web",
            "open",
            "--caller",
            "billing",
            "--reason",
            "billing only",
            "--ttl",
            "10m",
        ],
    );
    agent
        .eventually("the agent to have the command", || async {
            let (_, out, _) = cmd(&cp, &token, &["cmd", "show", &other, "--json"]);
            let shown: Value = serde_json::from_str(&out).unwrap();
            (shown["applied"] == 1).then_some(())
        })
        .await;
    assert_eq!(
        spread(&c, &url, 10).await.len(),
        2,
        "not for this host's callers"
    );
    cmd(&cp, &token, &["cmd", "revoke", &other]);

    // A policy command: no retries, a short try timeout (validated).
    let (code, _, err) = cmd(
        &cp,
        &token,
        &[
            "cmd",
            "policy",
            "web",
            r#"{"retries": 20}"#,
            "--reason",
            "x",
            "--ttl",
            "1m",
        ],
    );
    assert_eq!(code, 65, "an invalid policy is refused: {err}");
    assert!(err.contains("retries"), "{err}");

    // Survives an agent restart with the control plane down.
    create(
        &cp,
        &token,
        &[
            "block",
            "web",
            &instance,
            "--reason",
            "still bad",
            "--ttl",
            "10m",
        ],
    );
    agent
        .eventually("web-1 to be blocked again", || async {
            let seen = spread(&c, &url, 10).await;
            (seen.get("web-2") == Some(&10)).then_some(())
        })
        .await;
    drop(cp);
    agent.restart().await;
    let addr = vip(&agent, "web", port).await;
    let c = client("web.service.internal", addr);
    let seen = spread(&c, &url, 10).await;
    assert_eq!(
        seen.get("web-2"),
        Some(&10),
        "the block was kept on disk: {seen:?}"
    );
}

#[tokio::test]
async fn commands_need_an_operator_token_are_audited_and_survive_a_restart() {
    let mut cp = ControlPlane::start().await;
    let token = operator(&cp);
    let (code, _, err) = cmd(
        &cp,
        "wrong",
        &[
            "cmd", "circuit", "web", "open", "--reason", "x", "--ttl", "1m",
        ],
    );
    assert_eq!(code, 77, "{err}");
    let (code, _, err) = cmd(
        &cp,
        &token,
        &[
            "cmd", "circuit", "web", "open", "--reason", "x", "--ttl", "200h",
        ],
    );
    assert_eq!(code, 65, "{err}");
    assert!(err.contains("ttl"), "{err}");
    let id = create(
        &cp,
        &token,
        &[
            "circuit",
            "web",
            "open",
            "--reason",
            "load test",
            "--ttl",
            "1m",
        ],
    );
    let (code, out, _) = cmd(&cp, &token, &["cmd", "list", "--state", "active"]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&id) && out.contains("circuit") && out.contains("load test"),
        "{out}"
    );
    let (_, out, _) = cmd(&cp, &token, &["audit", "--json"]);
    let audit: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert!(
        audit
            .iter()
            .any(|e| e["action"] == "command.create.circuit" && e["reason"] == "load test")
    );
    assert!(
        audit.iter().any(|e| e["action"] == "command.create"
            && e["outcome"].as_str().unwrap().starts_with("denied"))
    );
    assert!(
        audit
            .iter()
            .any(|e| e["action"] == "command.create"
                && e["outcome"].as_str().unwrap().contains("ttl"))
    );

    cp.restart().await;
    let (_, out, _) = cmd(&cp, &token, &["cmd", "show", &id, "--json"]);
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["state"], "active", "kept across a restart: {shown}");
}

/// A canary: a policy command sends 10 % of the traffic to the instances
/// tagged v2, until it is revoked.
#[tokio::test]
async fn weights_by_tag_split_traffic_for_a_canary() {
    let cp = ControlPlane::start().await;
    let token = operator(&cp);
    let web = upstreams("web", 2).await;
    let agent = agent(&cp).await;
    let entries: String = web
        .iter()
        .zip(["v1", "v2"])
        .map(|(u, tag)| format!("{}    tags: [{tag}]\n", u.entry("web", "http")))
        .collect();
    agent.write_service_file("web.yaml", &format!("services:\n{entries}"));
    let port = web[0].addr.port();
    let (c, url) = vip_client(&agent, "web", port).await;
    let id = create(
        &cp,
        &token,
        &[
            "policy",
            "web",
            r#"{"tag_weights": {"v1": 90, "v2": 10}}"#,
            "--reason",
            "canary v2",
            "--ttl",
            "10m",
        ],
    );
    agent
        .eventually("the canary split to apply", || async {
            let seen = spread(&c, &url, 40).await;
            (seen.get("web-1").copied().unwrap_or(0) >= 30).then_some(())
        })
        .await;
    let seen = spread(&c, &url, 400).await;
    let v2 = seen.get("web-2").copied().unwrap_or(0);
    assert!(
        (15..=80).contains(&v2),
        "about 10 % (40 of 400) to v2: {seen:?}"
    );

    let (code, _, _) = cmd(&cp, &token, &["cmd", "revoke", &id]);
    assert_eq!(code, 0);
    agent
        .eventually("an even split again", || async {
            let seen = spread(&c, &url, 40).await;
            (seen.get("web-2") == Some(&20)).then_some(())
        })
        .await;
}

/// The agent's local API forwards operator actions to the control plane,
/// and only with a token.
#[tokio::test]
async fn the_local_api_forwards_operator_actions_only_with_a_token() {
    let cp = ControlPlane::start().await;
    let token = operator(&cp);
    let agent = agent(&cp).await;
    let body = serde_json::json!({
        "action": {"kind": "circuit", "state": "open"},
        "target": {"service": "web"},
        "reason": "through the agent",
        "ttl": "5m",
    });
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("{}/v1/commands", agent.base());
    let r = http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("token"));
    let r = http
        .post(&url)
        .header("X-Consul-Token", "not-a-token")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the control plane refuses it too");
    let r = http
        .post(&url)
        .header("X-Consul-Token", &token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let created: Value = r.json().await.unwrap();
    let list: Value = cp
        .client()
        .get(cp.url("/v1/commands"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], created["id"]);
}
