//! The fleet: a control plane and several agents on their own loopback
//! addresses. What is registered and checked on one host is seen by the
//! hosts that use it, and only by them; losing the control plane never
//! takes away what agents know.

#![allow(clippy::unwrap_used)] // test helpers: a panic is a test failure

use serde_json::{Value, json};
use signpost_tests::{AGENT_TOKEN, Agent, ControlPlane};

async fn register_web(agent: &Agent) {
    let body = json!({"ID": "web-1", "Name": "web", "Port": 8080, "Tags": ["v1"],
        "Check": {"TTL": "10m", "Status": "passing"}});
    let r = agent.put("/v1/agent/service/register", Some(body)).await;
    assert!(r.status.is_success(), "{}", r.text);
}

/// The health entries of `service` that `agent` knows on `node`.
async fn entries_on(agent: &Agent, service: &str, node: &str, query: &str) -> Vec<Value> {
    let body = agent
        .get(&format!("/v1/health/service/{service}{query}"))
        .await
        .json();
    body.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["Node"]["Node"] == node)
        .cloned()
        .collect()
}

/// The status of the first check of `node`'s web entry, in `agent`'s view,
/// whose `field` is `value`.
async fn check_status(agent: &Agent, node: &str, field: &str, value: &str) -> Option<String> {
    let entries = entries_on(agent, "web", node, "").await;
    let entry = entries.first()?;
    let check = entry["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c[field] == value)?;
    Some(check["Status"].as_str().unwrap().to_string())
}

/// How many agents the control plane counts alive.
async fn alive(cp: &ControlPlane) -> usize {
    let nodes = cp.get("/v1/nodes").await.json();
    let nodes = nodes.as_array().unwrap();
    nodes.iter().filter(|n| n["Status"] == "alive").count()
}

/// The status of web-1's own check on `node`, in `agent`'s view.
async fn service_status(agent: &Agent, node: &str) -> Option<String> {
    check_status(agent, node, "ServiceID", "web-1").await
}

#[tokio::test]
async fn changes_on_one_host_reach_the_hosts_that_use_them() {
    let cp = ControlPlane::start().await;
    let join = cp.agent_config(AGENT_TOKEN);
    let a = Agent::start_named("a", &join).await;
    let b = Agent::start_named("b", &format!("{join}upstreams: [web]\n")).await;
    let c = Agent::start_named("c", &join).await;
    b.eventually("three agents connected", || async {
        (alive(&cp).await == 3).then_some(())
    })
    .await;

    // Registration on A is visible on B (subscribed through `upstreams`).
    register_web(&a).await;
    b.eventually("web on b", || async {
        service_status(&b, "a").await.filter(|s| s == "passing")
    })
    .await;
    let entry = entries_on(&b, "web", "a", "").await.remove(0);
    assert_eq!(entry["Service"]["Port"], 8080);
    assert_eq!(entry["Service"]["Tags"], json!(["v1"]));
    assert_eq!(entry["Node"]["Address"], a.addr.ip().to_string());
    let services = b.get("/v1/catalog/services").await.json();
    assert_eq!(services["web"], json!(["v1"]));

    // A health flip on A propagates, and ?passing follows it.
    let r = a
        .put("/v1/agent/check/fail/service:web-1?note=down", None)
        .await;
    assert!(r.status.is_success());
    b.eventually("critical on b", || async {
        service_status(&b, "a").await.filter(|s| s == "critical")
    })
    .await;
    assert!(entries_on(&b, "web", "a", "?passing").await.is_empty());

    // C never used web: the control plane sent it nothing about it.
    let updates = "signpost_agent_sync_updates_total";
    assert!(b.metric(updates).await >= 2.0);
    assert_eq!(c.metric(updates).await, 0.0);

    // C's first lookup subscribes and answers at once from the snapshot.
    assert_eq!(service_status(&c, "a").await.as_deref(), Some("critical"));
    assert!(c.metric(updates).await >= 1.0);

    // Deregistration propagates.
    let r = a.put("/v1/agent/service/deregister/web-1", None).await;
    assert!(r.status.is_success());
    b.eventually("web gone from b", || async {
        service_status(&b, "a").await.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn agents_keep_their_view_without_the_control_plane() {
    let mut cp = ControlPlane::start().await;
    let join = cp.agent_config(AGENT_TOKEN);
    let a = Agent::start_named("a", &join).await;
    let b = Agent::start_named("b", &format!("{join}upstreams: [web]\n")).await;
    register_web(&a).await;
    b.eventually("web on b", || async { service_status(&b, "a").await })
        .await;
    let connected = "signpost_agent_sync_connected";
    // The control plane keeps its catalog on disk (coalesced writes).
    let kept = cp.dir.path().join("data").join("catalog.pb");
    b.eventually("catalog snapshot written", || async {
        let bytes = std::fs::read(&kept).unwrap_or_default();
        String::from_utf8_lossy(&bytes)
            .contains("web-1")
            .then_some(())
    })
    .await;

    cp.kill();
    b.eventually("b notices", || async {
        (b.metric(connected).await == 0.0).then_some(())
    })
    .await;
    // B keeps answering its last view, and says how fresh it is.
    assert_eq!(service_status(&b, "a").await.as_deref(), Some("passing"));
    let r = b.get("/v1/health/service/web").await;
    assert_eq!(r.headers["X-Consul-KnownLeader"], "false");
    let http_addr = b.addr.to_string();
    let (code, out, _) = signpost_tests::signpost(&["status", "--http-addr", &http_addr]);
    assert_eq!(code, 0);
    assert!(out.contains("UNREACHABLE"), "{out}");
    assert!(out.contains("subscriptions:  web"), "{out}");

    // The control plane comes back: agents reconnect and converge; web
    // never vanished from B on the way.
    cp.restart().await;
    b.eventually("b reconnects", || async {
        (b.metric(connected).await == 1.0).then_some(())
    })
    .await;
    assert_eq!(service_status(&b, "a").await.as_deref(), Some("passing"));
    let r = a.put("/v1/agent/check/fail/service:web-1", None).await;
    assert!(r.status.is_success());
    b.eventually("flip after restart", || async {
        service_status(&b, "a").await.filter(|s| s == "critical")
    })
    .await;
}

async fn node_status(cp: &ControlPlane, node: &str) -> Option<String> {
    let nodes = cp.get("/v1/nodes").await.json();
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["Node"] == node)
        .map(|n| n["Status"].as_str().unwrap().to_string())
}

/// The status of node `node`'s liveness check in `agent`'s view of web.
async fn liveness_on(agent: &Agent, node: &str) -> Option<String> {
    check_status(agent, node, "CheckID", "serfHealth").await
}

#[tokio::test]
async fn a_killed_agent_is_failed_once_its_peers_cannot_reach_it() {
    let cp = ControlPlane::start().await;
    let join = cp.agent_config(AGENT_TOKEN);
    let mut a = Agent::start_named("a", &join).await;
    let b = Agent::start_named("b", &format!("{join}upstreams: [web]\n")).await;
    register_web(&a).await;
    b.eventually("web on b", || async { service_status(&b, "a").await })
        .await;
    assert_eq!(liveness_on(&b, "a").await.as_deref(), Some("passing"));
    a.kill();
    // B is asked to probe A, cannot reach it: A failed, its instance is
    // critical everywhere (though its own check last said passing).
    b.eventually("a failed", || async {
        node_status(&cp, "a").await.filter(|s| s == "failed")
    })
    .await;
    b.eventually("a critical on b", || async {
        liveness_on(&b, "a").await.filter(|s| s == "critical")
    })
    .await;
    assert_eq!(service_status(&b, "a").await.as_deref(), Some("passing"));
    assert!(entries_on(&b, "web", "a", "?passing").await.is_empty());
    assert!(
        cp.log().contains("no peer reaches the node"),
        "{}",
        cp.log()
    );

    // A comes back: alive again, and healthy on B.
    a.restart().await;
    b.eventually("a alive again on b", || async {
        liveness_on(&b, "a").await.filter(|s| s == "passing")
    })
    .await;
    assert_eq!(node_status(&cp, "a").await.as_deref(), Some("alive"));
}

/// A TCP relay between an agent and the control plane that the test can
/// cut, leaving everything else connected.
struct Relay {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(to: std::net::SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind(signpost_tests::free_addr())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            // Dropping the set (when the relay task is aborted) cuts every
            // relayed connection.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                connections.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                        tokio::io::copy_bidirectional(&mut inbound, &mut outbound)
                            .await
                            .ok();
                    }
                });
            }
        });
        Relay { addr, task }
    }

    fn cut(&self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn an_agent_cut_off_from_the_control_plane_only_stays_passing() {
    let cp = ControlPlane::start().await;
    let join = cp.agent_config(AGENT_TOKEN);
    let relay = Relay::start(cp.grpc).await;
    let via_relay = format!(
        "control_plane:\n  addresses: [\"{}\"]\n  ca_file: {}\n  token: {AGENT_TOKEN}\n  server_name: localhost\n",
        relay.addr,
        cp.ca_file().display()
    );
    let a = Agent::start_named("a", &via_relay).await;
    let b = Agent::start_named("b", &format!("{join}upstreams: [web]\n")).await;
    register_web(&a).await;
    b.eventually("web on b", || async { service_status(&b, "a").await })
        .await;
    relay.cut();
    b.eventually("a unreachable", || async {
        node_status(&cp, "a").await.filter(|s| s == "unreachable")
    })
    .await;
    // B reaches A, so it is the control plane that is cut off: nothing is
    // removed and A's instance stays passing.
    b.eventually("partition decided", || async {
        cp.log().contains("a control-plane partition").then_some(())
    })
    .await;
    assert_eq!(node_status(&cp, "a").await.as_deref(), Some("unreachable"));
    assert_eq!(liveness_on(&b, "a").await.as_deref(), Some("passing"));
    assert_eq!(entries_on(&b, "web", "a", "?passing").await.len(), 1);
}

#[tokio::test]
async fn bad_token_and_bad_ca_are_refused_with_clear_errors() {
    let cp = ControlPlane::start().await;
    let bad_token =
        Agent::start_named("intruder", &cp.agent_config("not-the-token-0123456789")).await;
    bad_token
        .eventually("token refusal in the agent log", || async {
            bad_token
                .log()
                .contains("unknown agent token")
                .then_some(())
        })
        .await;

    // A CA that did not sign the control plane's certificate.
    let other = ControlPlane::start().await;
    let wrong_ca = format!(
        "control_plane:\n  addresses: [\"{}\"]\n  ca_file: {}\n  token: {AGENT_TOKEN}\n",
        cp.grpc,
        other.ca_file().display()
    );
    let bad_ca = Agent::start_named("stranger", &wrong_ca).await;
    bad_ca
        .eventually("certificate error in the agent log", || async {
            bad_ca
                .log()
                .to_lowercase()
                .contains("certificate")
                .then_some(())
        })
        .await;
    let nodes = cp.get("/v1/nodes").await.json();
    assert_eq!(nodes, json!([]), "{}", cp.log());
    assert_eq!(bad_token.metric("signpost_agent_sync_connected").await, 0.0);
}

#[tokio::test]
async fn an_agent_restarted_without_the_control_plane_answers_from_its_disk_cache() {
    let mut cp = ControlPlane::start().await;
    let join = cp.agent_config(AGENT_TOKEN);
    let a = Agent::start_named("a", &join).await;
    let mut b = Agent::start_named("b", &format!("{join}upstreams: [web]\n")).await;
    register_web(&a).await;
    b.eventually("web on b", || async { service_status(&b, "a").await })
        .await;
    cp.kill();
    assert_eq!(b.stop().await, Some(0));
    b.restart().await;
    // The first answer after the restart already has A's instance.
    assert_eq!(service_status(&b, "a").await.as_deref(), Some("passing"));
    assert_eq!(b.metric("signpost_agent_sync_connected").await, 0.0);
    assert!(
        b.log().contains("fleet view restored from disk"),
        "{}",
        b.log()
    );

    // Back with the control plane (a new epoch), B converges on the truth.
    cp.restart().await;
    let r = a.put("/v1/agent/check/fail/service:web-1", None).await;
    assert!(r.status.is_success());
    b.eventually("flip after both restarts", || async {
        service_status(&b, "a").await.filter(|s| s == "critical")
    })
    .await;
}

#[tokio::test]
async fn drain_waits_until_every_subscribed_agent_applied_it() {
    let cp = ControlPlane::start().await;
    let join = cp.agent_config(AGENT_TOKEN);
    let a = Agent::start_named("a", &join).await;
    let b = Agent::start_named("b", &format!("{join}upstreams: [web]\n")).await;
    let c = Agent::start_named("c", &format!("{join}upstreams: [web]\n")).await;
    register_web(&a).await;
    for agent in [&b, &c] {
        agent
            .eventually("web seen", || async { service_status(agent, "a").await })
            .await;
    }
    let http_addr = a.addr.to_string();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        signpost_tests::signpost(&[
            "drain",
            "web-1",
            "--timeout",
            "20s",
            "--http-addr",
            &http_addr,
        ])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("web-1 drained: 2 of 2 subscribed agents acknowledged"),
        "{out}"
    );
    // Both have it already: no waiting needed on their side.
    for agent in [&b, &c] {
        assert!(entries_on(agent, "web", "a", "?passing").await.is_empty());
        let maintenance = entries_on(agent, "web", "a", "").await[0]["Checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["CheckID"] == "_service_maintenance:web-1");
        assert!(maintenance);
    }

    // Out of maintenance; then c stops reading its stream (SIGSTOP): a
    // drain times out, exits non-zero and names it.
    let r = a
        .put("/v1/agent/service/maintenance/web-1?enable=false", None)
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    for agent in [&b, &c] {
        agent
            .eventually("web-1 passing again", || async {
                (!entries_on(agent, "web", "a", "?passing").await.is_empty()).then_some(())
            })
            .await;
    }
    nix::sys::signal::kill(c.pid(), nix::sys::signal::Signal::SIGSTOP).unwrap();
    let (code, out, err) = drain_web1(&a, &["--timeout", "2s", "--exec", "echo never"]).await;
    nix::sys::signal::kill(c.pid(), nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains(
            "only 1 of 2 agents using it stopped sending it new requests; still sending: c"
        ),
        "{err}"
    );
    assert!(
        !out.contains("never"),
        "--exec runs only once drained: {out}"
    );
    // Once c caught up, the drain completes and runs --exec.
    let marker = a.dir.path().join("drained");
    let exec = format!("echo drained > {}", marker.display());
    let (code, out, err) = drain_web1(&a, &["--timeout", "20s", "--exec", &exec]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "drained\n");
}

#[tokio::test]
async fn unused_subscriptions_are_dropped_but_upstreams_stay() {
    let cp = ControlPlane::start().await;
    let join = cp.agent_config(AGENT_TOKEN);
    let a = Agent::start_named("a", &join).await;
    // 3s: C's subscriptions are read once it has its answer, well within.
    let idle = format!("{join}  subscription_idle: 3s\nupstreams: [db]\n");
    let c = Agent::start_named("c", &idle).await;
    register_web(&a).await;
    c.eventually("web on the control plane", || async {
        let entries = cp.get("/v1/health/service/web").await.json();
        (entries.as_array().unwrap().len() == 1).then_some(())
    })
    .await;
    // C uses web once: subscribed, answered.
    assert_eq!(service_status(&c, "a").await.as_deref(), Some("passing"));
    let subscriptions = || async {
        let status = c.get("/v1/signpost/status").await.json();
        status["control_plane"]["subscriptions"].clone()
    };
    assert_eq!(subscriptions().await, json!(["db", "web"]));
    // Nothing asks again: web is dropped, db (an upstream) stays.
    c.eventually("web unsubscribed", || async {
        (subscriptions().await == json!(["db"])).then_some(())
    })
    .await;
    // Changes to web no longer reach C.
    let updates = "signpost_agent_sync_updates_total";
    let before = c.metric(updates).await;
    let r = a.put("/v1/agent/check/fail/service:web-1", None).await;
    assert!(r.status.is_success());
    let b = Agent::start_named("b", &format!("{join}upstreams: [web]\n")).await;
    b.eventually("flip seen by a subscriber", || async {
        service_status(&b, "a").await.filter(|s| s == "critical")
    })
    .await;
    assert_eq!(c.metric(updates).await, before);
}

#[tokio::test]
async fn control_plane_answers_the_catalog_and_health_endpoints_for_the_fleet() {
    // A datacenter of its own, named on both sides.
    let cp = ControlPlane::start_with("datacenter: eu1\n").await;
    let join = format!("{}datacenter: eu1\n", cp.agent_config(AGENT_TOKEN));
    let a = Agent::start_named("a", &join).await;
    let b = Agent::start_named("b", &join).await;
    b.eventually("both agents connected", || async {
        (alive(&cp).await == 2).then_some(())
    })
    .await;
    register_web(&a).await;
    let r = a
        .put("/v1/agent/check/fail/service:web-1?note=broken", None)
        .await;
    assert!(r.status.is_success());
    a.eventually("web critical on the control plane", || async {
        let checks = cp.get("/v1/health/checks/web").await.json();
        (checks[0]["Status"] == "critical").then_some(())
    })
    .await;
    let r = cp.get("/v1/catalog/service/web").await;
    assert!(r.index() >= 1);
    let entries = r.json();
    assert_eq!(entries.as_array().unwrap().len(), 1);
    assert_eq!(entries[0]["Node"], "a");
    assert_eq!(entries[0]["ServicePort"], 8080);
    assert_eq!(entries[0]["ServiceTags"], json!(["v1"]));
    assert_eq!(entries[0]["Datacenter"], "eu1");
    let nodes = cp.get("/v1/catalog/nodes").await.json();
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["Datacenter"] == "eu1"),
        "{nodes}"
    );
    let mut names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["Node"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b"]);
    let node = cp.get("/v1/catalog/node/a").await.json();
    assert_eq!(node["Services"]["web-1"]["Service"], "web");
    assert_eq!(cp.get("/v1/catalog/node/nope").await.json(), Value::Null);
    let critical = cp.get("/v1/health/state/critical").await.json();
    assert!(
        critical
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["CheckID"] == "service:web-1" && c["Output"] == "broken")
    );
    let on_b = cp.get("/v1/health/node/b").await.json();
    assert_eq!(
        on_b.as_array().unwrap().len(),
        1,
        "only b's liveness: {on_b}"
    );
    assert_eq!(on_b[0]["CheckID"], "serfHealth");
    assert_eq!(cp.get("/v1/health/state/bogus").await.status, 400);
    assert_eq!(
        cp.get("/v1/health/service/web?passing").await.json(),
        json!([])
    );
    drop(b);
}

/// `signpost drain web-1 ARGS` on agent `a`: exit code, stdout, stderr.
async fn drain_web1(a: &Agent, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["--http-addr".to_string(), a.addr.to_string()];
    all.extend(["drain", "web-1"].iter().chain(args).map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || {
        signpost_tests::signpost(&all.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap()
}

/// Requests through b's proxy to `url` in 8 loops until `stop`: how many
/// got each answer (status and body), and how many failed.
fn load_loops(
    url: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinSet<Vec<Result<(u16, String), String>>> {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut loops = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
        loops.spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let answer = match client.get(&url).send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        r.text()
                            .await
                            .map(|t| (status, t))
                            .map_err(|e| e.to_string())
                    }
                    Err(e) => Err(e.to_string()),
                };
                seen.push(answer);
            }
            seen
        });
    }
    loops
}

/// `signpost drain` waits for what consumers still have in flight to the
/// instance, not only for them to stop sending it new requests: under
/// load, with web-1 taking 2 s per request, the drain returns once
/// every request web-1 received was answered, and none failed; when one
/// never ends, the drain times out non-zero and names the consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_requests_in_flight_and_names_who_still_has_some() {
    let cp = ControlPlane::start().await;
    let join = cp.agent_config(AGENT_TOKEN);
    let a = Agent::start_named("a", &join).await;
    let b = Agent::start_named("b", &format!("{join}{}", drain_consumer())).await;
    drain_under_load(&a, &b).await;
}

/// What b (the consumer in the drain tests) adds to its configuration:
/// it uses web, balanced round robin so that web-1 gets its share
/// whatever its latency.
pub(crate) fn drain_consumer() -> String {
    format!(
        "upstreams: [web]\n{}",
        signpost_tests::upstream::proxy_config("  defaults:\n    balancer: round_robin\n")
    )
}

/// a registers web-1 and web-2; under load from b (web-1 taking 2 s per
/// request), `signpost drain web-1` on a returns once every request
/// web-1 received was answered, none failed; then with a request to
/// web-1 that never ends, the drain times out naming b.
pub(crate) async fn drain_under_load(a: &Agent, b: &Agent) {
    use signpost_tests::upstream::{Upstream, vip};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let web1 = Upstream::start("web-1", 0).await;
    let web2 = Upstream::start("web-2", web1.addr.port()).await;
    a.write_service_file(
        "web.yaml",
        &format!(
            "services:\n{}{}",
            web1.entry("web", "http"),
            web2.entry("web", "http")
        ),
    );
    b.eventually("both instances on b", || async {
        (entries_on(b, "web", "a", "?passing").await.len() == 2).then_some(())
    })
    .await;
    let addr = vip(b, "web", web1.addr.port()).await;
    let url = format!("http://{addr}/");

    web1.set_delay(2000);
    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = load_loops(url.clone(), stop.clone());
    b.eventually("requests in flight to web-1", || async {
        (web1.hits() > 0).then_some(())
    })
    .await;
    let (code, out, err) = drain_web1(a, &["--timeout", "20s"]).await;
    let received_by_web1 = web1.hits();
    stop.store(true, Ordering::SeqCst);
    let mut answers = Vec::new();
    while let Some(seen) = loops.join_next().await {
        answers.extend(seen.unwrap());
    }
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("web-1 drained: 1 of 1 subscribed agents acknowledged, nothing in flight"),
        "{out}"
    );
    let failed: Vec<_> = answers
        .iter()
        .filter(|a| !matches!(a, Ok((200, _))))
        .collect();
    assert!(failed.is_empty(), "failed during the drain: {failed:?}");
    let answered_by_web1 = answers
        .iter()
        .filter(|a| matches!(a, Ok((_, body)) if body == "web-1"))
        .count();
    assert_eq!(
        web1.hits(),
        received_by_web1,
        "no request reached web-1 after the drain"
    );
    assert_eq!(
        answered_by_web1, received_by_web1,
        "every request web-1 received was answered before the drain returned"
    );

    // Back in service; then a request to web-1 that never ends.
    let r = a
        .put("/v1/agent/service/maintenance/web-1?enable=false", None)
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    b.eventually("web-1 passing again on b", || async {
        (entries_on(b, "web", "a", "?passing").await.len() == 2).then_some(())
    })
    .await;
    web1.set_delay(0);
    web1.set_status(signpost_tests::upstream::HANG);
    let before = web1.hits();
    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = load_loops(url, stop.clone());
    b.eventually("a request hanging on web-1", || async {
        (web1.hits() > before).then_some(())
    })
    .await;
    let (code, out, err) = drain_web1(a, &["--timeout", "3s"]).await;
    stop.store(true, Ordering::SeqCst);
    loops.abort_all();
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("no agent sends it new requests, but after 3s requests and connections are still in flight from: b ("),
        "{err}"
    );
}

/// SIGTERM drains the agent's own instances first: consumers stop sending
/// them new requests and finish what they had in flight before the agent
/// exits; so when the host's applications stop with it, no request
/// fails (b has no retries to hide one). Started again, its instances
/// are back in service (the drain's maintenance is not kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_an_agent_drains_its_instances_first() {
    use signpost_tests::upstream::{Upstream, proxy_config, vip};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let cp = ControlPlane::start().await;
    let join = cp.agent_config(AGENT_TOKEN);
    let mut a = Agent::start_named("a", &join).await;
    let c = Agent::start_named("c", &join).await;
    let proxy = proxy_config("  defaults:\n    balancer: round_robin\n    retries: 0\n");
    let b = Agent::start_named("b", &format!("{join}upstreams: [web]\n{proxy}")).await;
    let web1 = Upstream::start("web-1", 0).await;
    let web2 = Upstream::start("web-2", web1.addr.port()).await;
    a.write_service_file(
        "web.yaml",
        &format!("services:\n{}", web1.entry("web", "http")),
    );
    c.write_service_file(
        "web.yaml",
        &format!("services:\n{}", web2.entry("web", "http")),
    );
    let passing = || async {
        let body = b.get("/v1/health/service/web?passing").await.json();
        body.as_array().unwrap().len()
    };
    b.eventually("both instances on b", || async {
        (passing().await == 2).then_some(())
    })
    .await;
    let addr = vip(&b, "web", web1.addr.port()).await;
    web1.set_delay(1000);
    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = load_loops(format!("http://{addr}/"), stop.clone());
    b.eventually("requests in flight to web-1", || async {
        (web1.hits() > 0).then_some(())
    })
    .await;
    a.signal_term();
    assert_eq!(a.wait_exit().await, Some(0), "{}", a.log());
    // The host's applications stop with the agent.
    web1.kill();
    let before = web2.hits();
    b.eventually("more requests after web-1 stopped", || async {
        (web2.hits() > before + 20).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut answers = Vec::new();
    while let Some(seen) = loops.join_next().await {
        answers.extend(seen.unwrap());
    }
    let failed: Vec<_> = answers
        .iter()
        .filter(|a| !matches!(a, Ok((200, _))))
        .collect();
    assert!(failed.is_empty(), "failed: {failed:?}\n{}", a.log());
    assert!(
        a.log().contains("this node's instances are drained"),
        "{}",
        a.log()
    );
    assert!(
        answers
            .iter()
            .any(|a| matches!(a, Ok((_, body)) if body == "web-1"))
    );

    // Started again, a's instance is in service (it has no check).
    a.restart().await;
    b.eventually("web-1 in service again", || async {
        (passing().await == 2).then_some(())
    })
    .await;
}
