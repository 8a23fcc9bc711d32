//! The control plane on etcd (`store: etcd`): three equal replicas on a
//! real three-member etcd cluster, agents spread over them. What is
//! registered, flipped, commanded or authorised through one replica holds
//! on every other; a replica's death moves its agents to another without
//! losing anything or failing anyone; losing etcd's quorum refuses writes
//! and nothing else; `migrate` copies a fleet between files and etcd.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

use std::process::Command;

use serde_json::{Value, json};
use signpost_tests::etcd::EtcdCluster;
use signpost_tests::{AGENT_TOKEN, Agent, ControlPlane, control_plane_bin, signpost};

/// A fresh key prefix: each test its own fleet.
fn prefix() -> String {
    format!("/signpost-test-{:08x}/", rand::random::<u32>())
}

/// An agent configuration that joins any of `replicas` (tried in order).
fn join(replicas: &[&ControlPlane], ca: &ControlPlane) -> String {
    let addresses: Vec<String> = replicas.iter().map(|r| format!("\"{}\"", r.grpc)).collect();
    format!(
        "control_plane:\n  addresses: [{}]\n  ca_file: {}\n  token: {AGENT_TOKEN}\n  server_name: localhost\n  first_lookup_wait: 10s\n",
        addresses.join(", "),
        ca.ca_file().display()
    )
}

async fn register(agent: &Agent, id: &str, name: &str) {
    let body = json!({"ID": id, "Name": name, "Port": 8080,
        "Check": {"TTL": "10m", "Status": "passing"}});
    let r = agent.put("/v1/agent/service/register", Some(body)).await;
    assert!(r.status.is_success(), "{}", r.text);
}

/// The status of `service`'s first check on `node`, in `agent`'s view.
async fn status_on(agent: &Agent, service: &str, node: &str) -> Option<String> {
    let body = agent
        .get(&format!("/v1/health/service/{service}"))
        .await
        .json();
    let entry = body
        .as_array()?
        .iter()
        .find(|e| e["Node"]["Node"] == node)?
        .clone();
    let check = entry["Checks"]
        .as_array()?
        .iter()
        .find(|c| c["ServiceID"] != "")?
        .clone();
    Some(check["Status"].as_str()?.to_string())
}

fn admin(cp: &ControlPlane) -> String {
    std::fs::read_to_string(cp.dir.path().join("data").join("bootstrap-token"))
        .unwrap()
        .trim()
        .to_string()
}

/// Runs the CLI against `cp` with `token`; its JSON answer.
fn cli(cp: &ControlPlane, token: &str, args: &[&str]) -> Value {
    let addr = cp.http.to_string();
    let mut all = vec!["--control-plane", &addr, "--token", token];
    all.extend_from_slice(args);
    all.push("--json");
    let (code, out, err) = signpost(&all);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap()
}

/// The node's liveness as `cp` reports it.
async fn node_status(cp: &ControlPlane, node: &str) -> Option<String> {
    let nodes = cp.get("/v1/nodes").await.json();
    nodes
        .as_array()?
        .iter()
        .find(|n| n["Node"] == node)
        .and_then(|n| n["Status"].as_str().map(str::to_string))
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn three_replicas_share_one_fleet_and_agents_move_when_one_dies() {
    let etcd = EtcdCluster::start(3).await;
    let store = etcd.config(&prefix());
    let r1 = ControlPlane::start_with(&store).await;
    let mut r2 = ControlPlane::start_replica(&r1, &store).await;
    let r3 = ControlPlane::start_replica(&r1, &store).await;
    let a = Agent::start_named("a", &join(&[&r1], &r1)).await;
    let b = Agent::start_named("b", &join(&[&r2, &r1], &r1)).await;
    let c = Agent::start_named("c", &join(&[&r3], &r1)).await;
    c.eventually("three agents alive on every replica", || async {
        for r in [&r1, &r2, &r3] {
            for node in ["a", "b", "c"] {
                if node_status(r, node).await.as_deref() != Some("alive") {
                    return None;
                }
            }
        }
        Some(())
    })
    .await;

    // Registered on a host whose agent is on replica 1, seen by a host
    // on replica 3; a health flip follows.
    register(&a, "web-1", "web").await;
    c.eventually("web on c", || async {
        status_on(&c, "web", "a").await.filter(|s| s == "passing")
    })
    .await;
    let r = a
        .put("/v1/agent/check/fail/service:web-1?note=down", None)
        .await;
    assert!(r.status.is_success());
    c.eventually("critical on c", || async {
        status_on(&c, "web", "a").await.filter(|s| s == "critical")
    })
    .await;
    // Every replica gives the service the same index: etcd's revision.
    let index = |cp: &ControlPlane| {
        let url = format!("http://{}/v1/health/service/web", cp.http);
        async move {
            let r = reqwest::Client::new().get(url).send().await.unwrap();
            r.headers()["x-consul-index"].to_str().unwrap().to_string()
        }
    };
    c.eventually("the same index on every replica", || async {
        let (i1, i3) = (index(&r1).await, index(&r3).await);
        (i1 == i3 && i1 == index(&r2).await).then_some(())
    })
    .await;

    // A token made on replica 1 is enforced on replica 3, where it
    // creates a command every agent applies (acks through etcd).
    let token = cli(
        &r1,
        &admin(&r1),
        &["acl", "token", "create", "--role", "operator"],
    );
    let secret = token["SecretID"].as_str().unwrap().to_string();
    let command = cli(
        &r3,
        &secret,
        &[
            "cmd",
            "block",
            "web",
            "198.18.0.9:8080",
            "--reason",
            "disk",
            "--ttl",
            "10m",
        ],
    );
    let id = command["id"].as_str().unwrap().to_string();
    c.eventually("the command applied by the three agents", || async {
        let shown = r1.get(&format!("/v1/commands/{id}")).await.json();
        (shown["applied"] == 3).then_some(())
    })
    .await;

    // Replica 2 dies with b's stream on it: b moves to replica 1, stays
    // alive, and what it registers next still reaches c.
    r2.kill();
    register(&b, "api-1", "api").await;
    c.eventually("api from b (moved to replica 1) on c", || async {
        status_on(&c, "api", "b").await.filter(|s| s == "passing")
    })
    .await;
    assert_eq!(node_status(&r3, "b").await.as_deref(), Some("alive"));
    assert_eq!(
        status_on(&c, "web", "a").await.as_deref(),
        Some("critical"),
        "nothing lost"
    );
    for r in [&r1, &r3] {
        assert!(
            !r.log().contains("recording it failed"),
            "no node failed because a replica died:\n{}",
            r.log()
        );
    }
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn without_etcd_quorum_writes_are_refused_and_the_fleet_keeps_working() {
    let mut etcd = EtcdCluster::start(3).await;
    let store = etcd.config(&prefix());
    let cp = ControlPlane::start_with(&store).await;
    let a = Agent::start_named("qa", &join(&[&cp], &cp)).await;
    let c = Agent::start_named("qc", &join(&[&cp], &cp)).await;
    register(&a, "web-1", "web").await;
    c.eventually("web on c", || async {
        status_on(&c, "web", "qa").await.filter(|s| s == "passing")
    })
    .await;
    let token = admin(&cp);
    let block = [
        "cmd",
        "block",
        "web",
        "198.18.0.9:8080",
        "--reason",
        "q",
        "--ttl",
        "1m",
    ];

    // One member down: nothing visible.
    etcd.kill(0);
    cli(&cp, &token, &block);

    // Two down: writes refused with 503, reads and agents unaffected.
    etcd.kill(1);
    let addr = cp.http.to_string();
    let (code, _, err) = signpost(&[
        "--control-plane",
        &addr,
        "--token",
        &token,
        "cmd",
        "block",
        "web",
        "198.18.0.9:8080",
        "--reason",
        "q",
        "--ttl",
        "1m",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("no store quorum"), "{err}");
    let nodes = cp.get("/v1/nodes").await;
    assert!(nodes.status.is_success());
    assert_eq!(
        nodes
            .headers
            .get("x-signpost-store")
            .and_then(|v| v.to_str().ok()),
        Some("no store quorum")
    );
    assert_eq!(status_on(&c, "web", "qa").await.as_deref(), Some("passing"));

    // Back: writes resume without restarting anything.
    etcd.restart(0).await;
    etcd.restart(1).await;
    c.eventually("writes to resume", || async {
        let (code, _, _) = signpost(&[
            "--control-plane",
            &addr,
            "--token",
            &token,
            "cmd",
            "block",
            "web",
            "198.18.0.9:8080",
            "--reason",
            "q",
            "--ttl",
            "1m",
        ]);
        (code == 0).then_some(())
    })
    .await;
}

/// Runs `migrate` with the configuration `config` (a file's text).
fn migrate(dir: &std::path::Path, config: &str, from: &str, to: &str) -> String {
    let path = dir.join(format!("{from}-to-{to}.yaml"));
    std::fs::write(&path, config).unwrap();
    let out = Command::new(control_plane_bin())
        .arg("--config")
        .arg(&path)
        .args(["migrate", "--from", from, "--to", to])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn migrate_copies_a_fleet_from_files_to_etcd_and_back() {
    let etcd = EtcdCluster::start(1).await;
    let mut cp = ControlPlane::start().await;
    let a = Agent::start_named("ma", &join(&[&cp], &cp)).await;
    register(&a, "web-1", "web").await;
    let token = admin(&cp);
    let command = cli(
        &cp,
        &token,
        &[
            "cmd",
            "block",
            "web",
            "198.18.0.9:8080",
            "--reason",
            "m",
            "--ttl",
            "1h",
        ],
    );
    cli(&cp, &token, &["acl", "token", "create", "--role", "read"]);
    let data = cp.dir.path().join("data");
    a.eventually("the node kept on disk", || async {
        let kept = std::fs::read(data.join("catalog.pb")).ok()?;
        kept.windows(5).any(|w| w == b"web-1").then_some(())
    })
    .await;
    cp.kill();

    let store = etcd.config(&prefix());
    let out = migrate(
        cp.dir.path(),
        &format!("data_dir: {}\n{store}", data.display()),
        "file",
        "etcd",
    );
    assert_eq!(out.trim(), "copied 1 nodes, 1 commands, 2 tokens");
    let back = cp.dir.path().join("back");
    let out = migrate(
        cp.dir.path(),
        &format!("data_dir: {}\n{store}", back.display()),
        "etcd",
        "file",
    );
    assert_eq!(out.trim(), "copied 1 nodes, 1 commands, 2 tokens");
    let json = |dir: &std::path::Path, name: &str| -> Value {
        serde_json::from_slice(&std::fs::read(dir.join(name)).unwrap()).unwrap()
    };
    assert_eq!(json(&back, "commands.json"), json(&data, "commands.json"));
    assert_eq!(
        json(&back, "commands.json")[command["id"].as_str().unwrap()]["reason"],
        "m"
    );
    assert_eq!(json(&back, "acl.json"), json(&data, "acl.json"));
    assert_eq!(
        std::fs::read(back.join("catalog.pb")).unwrap(),
        std::fs::read(data.join("catalog.pb")).unwrap()
    );
    // Into a store that holds a fleet already: refused.
    let path = cp.dir.path().join("again.yaml");
    std::fs::write(&path, format!("data_dir: {}\n{store}", data.display())).unwrap();
    let again = Command::new(control_plane_bin())
        .arg("--config")
        .arg(&path)
        .args(["migrate", "--from", "file", "--to", "etcd"])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("empty prefix"));
}
