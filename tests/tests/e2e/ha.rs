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
use signpost_tests::upstream::{proxy_config, upstreams, vip_client};
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

/// The status of `service`'s own check on `node`, in `agent`'s view.
async fn status_on(agent: &Agent, service: &str, node: &str) -> Option<String> {
    check_on(agent, service, node, |c| c["ServiceID"] != "").await
}

/// The status of `node`'s liveness (`serfHealth`), in `agent`'s view of
/// `service`.
async fn liveness_on(agent: &Agent, service: &str, node: &str) -> Option<String> {
    check_on(agent, service, node, |c| c["CheckID"] == "serfHealth").await
}

async fn check_on(
    agent: &Agent,
    service: &str,
    node: &str,
    which: impl Fn(&Value) -> bool,
) -> Option<String> {
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
        .find(|c| which(c))?
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
    let flags = cp.cli_flags();
    let mut all: Vec<&str> = flags.iter().map(String::as_str).collect();
    all.extend(["--token", token]);
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

/// Which of `replicas` `node`'s agent connected to (its first stream).
fn holder(replicas: &[ControlPlane], node: &str) -> Option<usize> {
    let needle = format!("agent connected node={node} ");
    replicas.iter().position(|r| r.log().contains(&needle))
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn three_replicas_share_one_fleet_and_agents_move_when_one_dies() {
    let etcd = EtcdCluster::start(3).await;
    let store = etcd.config(&prefix());
    let r1 = ControlPlane::start_with(&store).await;
    let r2 = ControlPlane::start_replica(&r1, &store).await;
    let r3 = ControlPlane::start_replica(&r1, &store).await;
    let web = upstreams("web", 2).await;
    let a = Agent::start_named("a", &join(&[&r1], &r1)).await;
    let entries: String = web.iter().map(|u| u.entry("web", "http")).collect();
    a.write_service_file("web.yaml", &format!("services:\n{entries}"));
    // b lists replicas 2 and 1 and starts with either.
    let mut b = Agent::start_named("b", &join(&[&r2, &r1], &r1)).await;
    let c = Agent::start_named("c", &format!("{}{}", join(&[&r3], &r1), proxy_config(""))).await;
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
    register(&a, "api-1", "api").await;
    c.eventually("api on c", || async {
        status_on(&c, "api", "a").await.filter(|s| s == "passing")
    })
    .await;
    let r = a
        .put("/v1/agent/check/fail/service:api-1?note=down", None)
        .await;
    assert!(r.status.is_success());
    c.eventually("critical on c", || async {
        status_on(&c, "api", "a").await.filter(|s| s == "critical")
    })
    .await;
    // Every replica gives the service the same index: etcd's revision.
    let index = |cp: &ControlPlane| {
        let (url, client) = (cp.url("/v1/health/service/api"), cp.client().clone());
        async move {
            let r = client.get(url).send().await.unwrap();
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
            "api",
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

    // The replica b is on dies under proxy load from c to a's instances.
    let (client, url) = vip_client(&c, "web", web[0].addr.port()).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => failed.push(r.status().to_string()),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        })
    };
    let mut replicas = vec![r1, r2, r3];
    let dead = holder(&replicas, "b").expect("b connected to a replica");
    let killed_at = std::time::Instant::now();
    replicas[dead].kill();
    b.eventually("b connected again", || async {
        (b.metric("signpost_agent_sync_connected").await == 1.0
            && b.log().matches("connected to the control plane").count() >= 2)
            .then_some(())
    })
    .await;
    eprintln!(
        "b resumed on another replica {:.2} s after its replica died",
        killed_at.elapsed().as_secs_f64()
    );
    let alive: Vec<&ControlPlane> = replicas
        .iter()
        .enumerate()
        .filter(|(n, _)| *n != dead)
        .map(|(_, r)| r)
        .collect();
    register(&b, "db-1", "db").await;
    c.eventually("db from b (moved) on c", || async {
        status_on(&c, "db", "b").await.filter(|s| s == "passing")
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(ok > 0);
    assert!(
        failed.is_empty(),
        "{} of {} proxied requests failed: {failed:?}",
        failed.len(),
        ok + failed.len() as u64
    );
    for r in &alive {
        assert_eq!(node_status(r, "b").await.as_deref(), Some("alive"));
        // The command and its three acks outlive the replica.
        let shown = r.get(&format!("/v1/commands/{id}")).await.json();
        assert_eq!(
            (shown["state"].as_str(), shown["applied"].as_u64()),
            (Some("active"), Some(3))
        );
    }
    assert_eq!(
        status_on(&c, "api", "a").await.as_deref(),
        Some("critical"),
        "nothing lost"
    );
    for r in &alive {
        assert!(
            !r.log().contains("recording it failed"),
            "no node failed because a replica died:\n{}",
            r.log()
        );
    }
    b.kill();
}

/// A drain asked through one replica waits for the consumers on every
/// other: b's agent knows only replica 2, the drained instance's agent
/// only replica 1; the drain returns only once b applied it and finished every
/// request it had in flight to web-1 (none failed), and one that never
/// ends makes it time out naming b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd (etcd-server)"]
async fn a_drain_waits_for_the_consumers_on_every_replica() {
    let etcd = EtcdCluster::start(1).await;
    let store = etcd.config(&prefix());
    let r1 = ControlPlane::start_with(&store).await;
    let r2 = ControlPlane::start_replica(&r1, &store).await;
    let a = Agent::start_named("a", &join(&[&r1], &r1)).await;
    let b = Agent::start_named(
        "b",
        &format!("{}{}", join(&[&r2], &r1), crate::sync::drain_consumer()),
    )
    .await;
    b.eventually("a and b alive on both replicas", || async {
        for r in [&r1, &r2] {
            for node in ["a", "b"] {
                if node_status(r, node).await.as_deref() != Some("alive") {
                    return None;
                }
            }
        }
        Some(())
    })
    .await;
    crate::sync::drain_under_load(&a, &b).await;
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
    // A block command: the exit status and what the CLI said.
    let flags = cp.cli_flags();
    let block = || {
        let (code, _, err) = signpost(&[
            &flags[0],
            &flags[1],
            &flags[2],
            &flags[3],
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
        (code, err)
    };

    // One member down: nothing visible.
    etcd.kill(0);
    let (code, err) = block();
    assert_eq!(code, 0, "{err}");

    // Two down: writes refused with 503, reads and agents unaffected.
    etcd.kill(1);
    let (code, err) = block();
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
        (block().0 == 0).then_some(())
    })
    .await;
}

/// Runs `migrate` with the configuration `config` (a file's text): whether
/// it succeeded, and what it printed (stdout, or stderr on failure).
fn migrate(dir: &std::path::Path, config: &str, from: &str, to: &str) -> (bool, String) {
    let path = dir.join(format!("{from}-to-{to}.yaml"));
    std::fs::write(&path, config).unwrap();
    let out = Command::new(control_plane_bin())
        .arg("--config")
        .arg(&path)
        .args(["migrate", "--from", from, "--to", to])
        .output()
        .unwrap();
    let said = if out.status.success() {
        &out.stdout
    } else {
        &out.stderr
    };
    (
        out.status.success(),
        String::from_utf8_lossy(said).into_owned(),
    )
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
    let r = cp
        .client()
        .put(cp.url("/v1/kv/app/setting"))
        .body("kept")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let data = cp.dir.path().join("data");
    a.eventually("the node kept on disk", || async {
        let kept = std::fs::read(data.join("catalog.pb")).ok()?;
        kept.windows(5).any(|w| w == b"web-1").then_some(())
    })
    .await;
    cp.kill();

    let store = etcd.config(&prefix());
    let to_etcd = format!("data_dir: {}\n{store}", data.display());
    let (ok, out) = migrate(cp.dir.path(), &to_etcd, "file", "etcd");
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "copied 1 nodes, 1 commands, 2 tokens, 1 keys");
    let back = cp.dir.path().join("back");
    let (ok, out) = migrate(
        cp.dir.path(),
        &format!("data_dir: {}\n{store}", back.display()),
        "etcd",
        "file",
    );
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "copied 1 nodes, 1 commands, 2 tokens, 1 keys");
    let json = |dir: &std::path::Path, name: &str| -> Value {
        serde_json::from_slice(&std::fs::read(dir.join(name)).unwrap()).unwrap()
    };
    assert_eq!(json(&back, "commands.json"), json(&data, "commands.json"));
    assert_eq!(
        json(&back, "commands.json")[command["id"].as_str().unwrap()]["reason"],
        "m"
    );
    assert_eq!(json(&back, "acl.json"), json(&data, "acl.json"));
    let kv = std::fs::read(back.join("kv.redb")).unwrap();
    assert!(
        kv.windows(4).any(|w| w == b"kept"),
        "the KV store came back"
    );
    assert_eq!(
        std::fs::read(back.join("catalog.pb")).unwrap(),
        std::fs::read(data.join("catalog.pb")).unwrap()
    );
    // Into a store that holds a fleet already: refused.
    let (ok, out) = migrate(cp.dir.path(), &to_etcd, "file", "etcd");
    assert!(!ok);
    assert!(out.contains("empty prefix"), "{out}");
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn kv_and_locks_hold_across_replicas() {
    let etcd = EtcdCluster::start(1).await;
    let store = etcd.config(&prefix());
    let r1 = ControlPlane::start_with(&store).await;
    let r2 = ControlPlane::start_replica(&r1, &store).await;
    let put = |cp: &ControlPlane, path: &str, body: &str| {
        let request = cp.client().put(cp.url(path)).body(body.to_string());
        async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(put(&r1, "/v1/kv/cfg/a", "1").await, (200, "true".into()));
    // A consistent read on the other replica sees it, with etcd's index.
    let r = r2.get("/v1/kv/cfg/a?consistent").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let index = r.json()[0]["ModifyIndex"].as_u64().unwrap();
    assert_eq!(r.index(), index);
    // CAS decided by etcd: the stale index loses on either replica.
    assert_eq!(
        put(&r2, &format!("/v1/kv/cfg/a?cas={index}"), "2").await.1,
        "true"
    );
    assert_eq!(
        put(&r1, &format!("/v1/kv/cfg/a?cas={index}"), "3").await.1,
        "false"
    );
    // A blocking read on one replica wakes for a write through the other.
    let waiting = {
        let (client, url) = (
            r2.client().clone(),
            r2.url(&format!("/v1/kv/cfg/?recurse&index={}&wait=1m", index + 1)),
        );
        tokio::spawn(async move {
            client
                .get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    assert_eq!(put(&r1, "/v1/kv/cfg/b", "new").await.1, "true");
    let seen = waiting.await.unwrap();
    assert_eq!(seen.as_array().unwrap().len(), 2, "{seen}");
    // Sessions and locks: created through an agent on r1, seen on r2.
    let a = Agent::start_named(
        "kv-a",
        &format!("{}  http: https://{}\n", join(&[&r1], &r1), r1.http),
    )
    .await;
    // Once the agent has joined, a session can be made on its node.
    let s1 = a
        .eventually("a session on the agent's node", || async {
            let created = a
                .put("/v1/session/create", Some(json!({"LockDelay": "0s"})))
                .await;
            (created.status == 200).then(|| created.json()["ID"].as_str().unwrap().to_string())
        })
        .await;
    let created = a
        .put("/v1/session/create", Some(json!({"LockDelay": "0s"})))
        .await;
    let s2 = created.json()["ID"].as_str().unwrap().to_string();
    assert_eq!(
        put(&r1, &format!("/v1/kv/lock?acquire={s1}"), "one")
            .await
            .1,
        "true"
    );
    assert_eq!(
        put(&r2, &format!("/v1/kv/lock?acquire={s2}"), "two")
            .await
            .1,
        "false"
    );
    assert_eq!(
        put(&r2, &format!("/v1/session/destroy/{s1}"), "").await.1,
        "true"
    );
    assert_eq!(
        put(&r1, &format!("/v1/kv/lock?acquire={s2}"), "two")
            .await
            .1,
        "true"
    );
    let held = r2.get("/v1/kv/lock?consistent").await.json();
    assert_eq!(held[0]["Session"], s2.as_str());
    assert_eq!(held[0]["LockIndex"], 2);

    // The mesh's CA and intentions are records of the same store: one CA
    // for every replica (whichever created it first), an intention
    // written on one replica is enforced from the other.
    let mut first = String::new();
    for _ in 0..100 {
        first = active_root(&r1).await;
        if !first.is_empty() && first == active_root(&r2).await {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(!first.is_empty(), "no mesh CA");
    assert_eq!(active_root(&r2).await, first);
    let r = put(
        &r1,
        "/v1/connect/intentions/exact?source=api&destination=db",
        r#"{"Action": "deny"}"#,
    )
    .await;
    assert_eq!(r.0, 200, "{}", r.1);
    let mut allowed = serde_json::Value::Null;
    for _ in 0..100 {
        let check = r2
            .get("/v1/connect/intentions/check?source=api&destination=db")
            .await;
        allowed = check.json()["Allowed"].clone();
        if allowed == false {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(allowed, false, "the other replica never saw the deny");
}

/// The mesh CA's active root on `cp` (empty before there is one).
async fn active_root(cp: &ControlPlane) -> String {
    let roots = cp.get("/v1/connect/ca/roots").await.json();
    roots["ActiveRootID"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Whether `cp` is the elected leader (its metric).
async fn leads(cp: &ControlPlane) -> bool {
    cp.get("/metrics")
        .await
        .text
        .lines()
        .any(|l| l.starts_with("signpost_control_plane_leader ") && l.ends_with(" 1"))
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn when_the_leader_dies_another_replica_fails_and_reaps_the_dead_host() {
    let etcd = EtcdCluster::start(1).await;
    let store = format!(
        "{}  lease_ttl: 5s\nnode_reap_after: 6s\n",
        etcd.config(&prefix())
    );
    let r1 = ControlPlane::start_with(&store).await;
    let r2 = ControlPlane::start_replica(&r1, &store).await;
    // Peers on both replicas, so that whichever leads has one to ask.
    let p1 = Agent::start_named("p1", &join(&[&r1, &r2], &r1)).await;
    let p2 = Agent::start_named("p2", &join(&[&r2, &r1], &r1)).await;
    let mut x = Agent::start_named("x", &join(&[&r1, &r2], &r1)).await;
    register(&x, "web-x", "web").await;
    p1.eventually("x's web on p1", || async {
        status_on(&p1, "web", "x").await.filter(|s| s == "passing")
    })
    .await;
    let mut replicas = [r1, r2];
    let leader = p1
        .eventually("a leader", || async {
            for (n, r) in replicas.iter().enumerate() {
                if leads(r).await {
                    return Some(n);
                }
            }
            None
        })
        .await;

    // x's host dies: the leader's peers cannot reach it, it fails.
    x.kill();
    p1.eventually("x failed", || async {
        (node_status(&replicas[1 - leader], "x").await.as_deref() == Some("failed")).then_some(())
    })
    .await;
    p2.eventually("x failed in p2's view", || async {
        liveness_on(&p2, "web", "x")
            .await
            .filter(|s| s == "critical")
    })
    .await;

    // The leader dies before reaping it: the other replica takes over,
    // x stays failed and is reaped; the peers are never failed.
    replicas[leader].kill();
    let survivor = &replicas[1 - leader];
    p1.eventually("the survivor to lead", || async {
        leads(survivor).await.then_some(())
    })
    .await;
    p1.eventually("x reaped", || async {
        node_status(survivor, "x").await.is_none().then_some(())
    })
    .await;
    p2.eventually("x's web gone from p2", || async {
        status_on(&p2, "web", "x").await.is_none().then_some(())
    })
    .await;
    for peer in ["p1", "p2"] {
        assert_ne!(
            node_status(survivor, peer).await.as_deref(),
            Some("failed"),
            "{}",
            survivor.log()
        );
    }
}
