//! The fleet across real hosts: every host a network namespace with its
//! own loopback and address, the control plane on a host of its own, every
//! agent with the packaged default configuration (see
//! `signpost_tests::fleet`). What crosses hosts is proven here: names
//! resolve with each host's system resolver, traffic goes through each
//! host's own proxy to the other host's advertised address, and hosts die,
//! get cut off and lose packets the way real ones do.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use signpost_tests::PATIENCE;
use signpost_tests::fleet::{
    Agent, ControlPlane, Fleet, delay_relay, echo_instance, grpc_instance, http_instance,
};

/// Debian's interpreter, which has the apt-installed `grpc` module.
const PYTHON: &str = "/usr/bin/python3";

/// Runs a Python program on the agent's host, as an application there
/// would (its resolver is the host's); its output once it succeeds, or a
/// failure after [`PATIENCE`].
async fn app(agent: &Agent, what: &str, program: &str) -> String {
    agent
        .eventually(what, || async {
            let out = agent.host.exec(PYTHON, &["-c", program]);
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .await
}

/// An HTTP client program on the host: GET `url`, print the body.
async fn http_get(agent: &Agent, url: &str) -> String {
    let program = format!(
        "import urllib.request\nprint(urllib.request.urlopen({url:?}, timeout=10).read().decode())"
    );
    app(agent, &format!("GET {url} from {}", agent.name), &program).await
}

/// Waits until the control plane counts every node in `nodes` alive.
async fn all_alive(cp: &ControlPlane, nodes: &[&Agent]) {
    nodes[0]
        .eventually("every agent connected", || async {
            let statuses = cp.statuses().await;
            nodes
                .iter()
                .all(|a| statuses.get(&a.name).map(String::as_str) == Some("alive"))
                .then_some(())
        })
        .await;
}

fn web(id: &str, check: Value) -> Value {
    json!({"ID": id, "Name": "web", "Port": 8080, "Protocol": "http", "Check": check})
}

fn http_check(port: u16) -> Value {
    json!({"HTTP": format!("http://127.0.0.1:{port}/health"), "Interval": "1s"})
}

/// What a host's application sees, registered on another host with the
/// packaged defaults: the system resolver finds the name, the host's own
/// proxy takes HTTP, gRPC and a plain TCP protocol to the other host's
/// advertised (detected) address, and blocking watchers started before the
/// registration wake with it.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, iptables and python3-grpcio"]
async fn a_service_on_one_host_is_reached_by_name_from_another() {
    let fleet = Fleet::new();
    let cp = fleet.control_plane(&[]).await;
    let a = fleet.agent("a", &cp, cp.grpc, "").await;
    let b = fleet.agent("b", &cp, cp.grpc, "").await;
    all_alive(&cp, &[&a, &b]).await;

    // B's watchers, before anything is registered anywhere.
    let before = b.get("/v1/health/service/web").await;
    assert_eq!(before.json(), json!([]));
    let health_watch = b.get_later(&format!(
        "/v1/health/service/web?index={}&wait=60s",
        before.index()
    ));
    let names = b.get("/v1/catalog/services").await;
    assert!(names.json().get("web").is_none());
    let names_watch = b.get_later(&format!(
        "/v1/catalog/services?index={}&wait=60s",
        names.index()
    ));

    http_instance(&a.host, 8080).await;
    grpc_instance(&a.host, 50051).await;
    echo_instance(&a.host, 7000).await;
    a.register(web("web-1", http_check(8080))).await;
    a.register(
        json!({"ID": "ledger-1", "Name": "ledger", "Port": 50051, "Protocol": "grpc",
        "Check": {"GRPC": "127.0.0.1:50051", "Interval": "1s"}}),
    )
    .await;
    a.register(
        json!({"ID": "echo-1", "Name": "echo", "Port": 7000, "Protocol": "tcp",
        "Check": {"TCP": "127.0.0.1:7000", "Interval": "1s"}}),
    )
    .await;

    let woke = tokio::time::timeout(PATIENCE, health_watch)
        .await
        .expect("the blocking health query on b never woke")
        .unwrap();
    assert!(woke.index() > before.index());
    let entries = woke.json();
    let entry = &entries.as_array().unwrap()[0];
    assert_eq!(entry["Node"]["Node"], "a");
    // The packaged configuration sets no address: a's was detected, and it
    // is the one b's traffic goes to.
    assert_eq!(entry["Node"]["Address"], a.host.ip.to_string());
    let woke = tokio::time::timeout(PATIENCE, names_watch)
        .await
        .expect("the blocking catalog query on b never woke")
        .unwrap();
    assert!(woke.json().get("web").is_some(), "{}", woke.text);

    // Applications on B, through B's resolver and proxy.
    b.eventually("web passing on b", || async {
        (b.check_status("web", "a", "service:web-1").await.as_deref() == Some("passing"))
            .then_some(())
    })
    .await;
    assert_eq!(http_get(&b, "http://web.service.internal:8080/").await, "a");
    let vip = b.resolve("web.service.internal").unwrap();
    assert!(vip.is_loopback(), "{vip} is the VIP on b's own loopback");

    let grpc = "import grpc\n\
        channel = grpc.insecure_channel('ledger.service.internal:50051', options=[('grpc.enable_http_proxy', 0)])\n\
        check = channel.unary_unary('/grpc.health.v1.Health/Check')\n\
        print(check(b'', timeout=10).hex())";
    // HealthCheckResponse { status: SERVING } is 0x08 0x01.
    assert_eq!(app(&b, "a gRPC call from b", grpc).await, "0801");

    let tcp = "import socket\n\
        s = socket.create_connection(('echo.service.internal', 7000), timeout=10)\n\
        s.sendall(b'over the fleet')\n\
        print(s.recv(64).decode())";
    assert_eq!(
        app(&b, "a TCP exchange from b", tcp).await,
        "over the fleet"
    );
}

/// A host with several private addresses does not guess which one the
/// others reach: `--validate` and the agent refuse, listing them; named by
/// interface, the address is the interface's.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root"]
async fn a_host_with_several_addresses_is_told_which_to_advertise() {
    let fleet = Fleet::new();
    let cp = fleet.control_plane(&[]).await;
    let unsure = fleet.agent_stopped("unsure", &cp, cp.grpc, "");
    let named = fleet.agent_stopped("named", &cp, cp.grpc, "advertise_addr: interface:eth0\n");
    for agent in [&unsure, &named] {
        agent.host.add_address("extra0", "10.9.0.1/24");
        agent.host.add_address("extra1", "172.20.0.1/24");
    }
    for out in [unsure.validate(), unsure.run_to_exit()] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains("several private IPv4 addresses"),
            "{stderr}"
        );
        assert!(stderr.contains("10.9.0.1 (extra0)"), "{stderr}");
        assert!(stderr.contains("172.20.0.1 (extra1)"), "{stderr}");
        assert!(stderr.contains("set advertise_addr"), "{stderr}");
    }
    let out = named.validate();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    named.start().await;
    cp.wait_status("named", "alive").await;
    let nodes = cp.get("/v1/nodes").await.json();
    let node = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["Node"] == "named")
        .unwrap()
        .clone();
    assert_eq!(node["Address"], named.host.ip.to_string());
}

/// With the control plane gone, hosts keep resolving and routing to each
/// other; what changed meanwhile arrives once it is back.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and iptables"]
async fn routes_survive_the_control_plane_and_changes_arrive_after_it() {
    let fleet = Fleet::new();
    let cp = fleet.control_plane(&[]).await;
    let a = fleet.agent("a", &cp, cp.grpc, "").await;
    let b = fleet.agent("b", &cp, cp.grpc, "").await;
    all_alive(&cp, &[&a, &b]).await;
    http_instance(&a.host, 8080).await;
    a.register(web("web-1", http_check(8080))).await;
    assert_eq!(http_get(&b, "http://web.service.internal:8080/").await, "a");

    let before = b.get("/v1/health/service/web").await.index();
    cp.kill();
    b.eventually("b notices", || async {
        let r = b.get("/v1/health/service/web").await;
        (r.headers["X-Consul-KnownLeader"] == "false").then_some(())
    })
    .await;
    assert_eq!(http_get(&b, "http://web.service.internal:8080/").await, "a");
    assert!(b.resolve("web.service.internal").is_some());

    // Registered while the control plane is down: B learns it once it is
    // back.
    http_instance(&a.host, 8081).await;
    a.register(
        json!({"ID": "api-1", "Name": "api", "Port": 8081, "Protocol": "http",
        "Check": http_check(8081)}),
    )
    .await;
    cp.start().await;
    assert_eq!(http_get(&b, "http://api.service.internal:8081/").await, "a");
    // The restarted control plane numbers everything anew; B's answers
    // never go back, and a change after it still moves them on.
    let after = b.get("/v1/health/service/web").await.index();
    assert!(after >= before, "{after} < {before}");
    let r = a
        .put("/v1/agent/service/maintenance/web-1?enable=true", None)
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    b.eventually("the maintenance on b", || async {
        let r = b.get("/v1/health/service/web").await;
        let critical = r.text.contains("_service_maintenance:web-1");
        (critical && r.index() > after).then_some(())
    })
    .await;
}

/// An agent whose control plane goes silent (the path to it drops
/// everything: no reset) notices within seconds and fails over to its
/// other address; what changes on its host still reaches the others.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and iptables"]
async fn an_agent_fails_over_from_a_silent_control_plane_address() {
    let fleet = Fleet::new();
    let cp = fleet.control_plane(&[]).await;
    // Two ways to the control plane, through relays: the agent starts
    // with either (from a random one on).
    let relays = [8302, 8303].map(|port| std::net::SocketAddr::from((cp.host.ip, port)));
    for relay in relays {
        delay_relay(&cp.host, relay, cp.grpc, Duration::ZERO).await;
    }
    let a = fleet.agent_stopped("a", &cp, relays[0], "");
    a.add_control_plane_address(relays[1]);
    a.start().await;
    let b = fleet.agent("b", &cp, cp.grpc, "upstreams: [web]\n").await;
    all_alive(&cp, &[&a, &b]).await;
    let connected =
        |to: std::net::SocketAddr| format!("connected to the control plane address={to}");
    let (silent, other) = if a.log().contains(&connected(relays[0])) {
        (relays[0], relays[1])
    } else {
        (relays[1], relays[0])
    };
    assert!(a.log().contains(&connected(silent)), "{}", a.log());

    // The relay it uses goes silent.
    let port = silent.port();
    cp.host
        .firewall(&format!("-A INPUT -p tcp --dport {port} -j DROP"));
    cp.host
        .firewall(&format!("-A OUTPUT -p tcp --sport {port} -j DROP"));
    a.eventually("a on the other address", || async {
        a.log().contains(&connected(other)).then_some(())
    })
    .await;
    cp.wait_status("a", "alive").await;
    a.register(web("web-a", json!({"TTL": "10m", "Status": "passing"})))
        .await;
    b.eventually("web-a on b", || async {
        b.check_status("web", "a", "service:web-a")
            .await
            .filter(|s| s == "passing")
    })
    .await;
}

/// Requests from B to the instances of `web`, on `workers` keep-alive
/// connections through B's proxy, until `stop`: answers by body (the
/// instance's host) and failures.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Tally>>,
}

/// Answers by body (the instance's host), and failures.
type Tally = (BTreeMap<String, usize>, Vec<String>);

impl Load {
    fn start(b: &Agent, vip: std::net::Ipv4Addr, workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..workers)
            .map(|_| {
                let stop = stop.clone();
                b.host.spawn(async move {
                    let client = reqwest::Client::builder()
                        .no_proxy()
                        .resolve("web.service.internal", (vip, 8080).into())
                        .timeout(Duration::from_secs(30))
                        .build()
                        .unwrap();
                    let mut answers = BTreeMap::new();
                    let mut failures = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        match client.get("http://web.service.internal:8080/").send().await {
                            Ok(r) if r.status() == 200 => {
                                let body = r.text().await.unwrap_or_default();
                                *answers.entry(body).or_insert(0) += 1;
                            }
                            Ok(r) => failures.push(format!(
                                "{}: {:?}",
                                r.status(),
                                r.headers().get("x-signpost-error")
                            )),
                            Err(e) => failures.push(e.to_string()),
                        }
                    }
                    (answers, failures)
                })
            })
            .collect();
        Load { stop, tasks }
    }

    async fn finish(self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        let mut answers = BTreeMap::new();
        let mut failures = Vec::new();
        for task in self.tasks {
            let (a, f) = task.await.unwrap();
            for (k, v) in a {
                *answers.entry(k).or_insert(0) += v;
            }
            failures.extend(f);
        }
        (answers, failures)
    }
}

/// An HTTP instance of `web` on A's host and one on C's, registered with
/// an HTTP check; once B sees both passing, web's VIP on B.
async fn web_on_a_and_c(a: &Agent, b: &Agent, c: &Agent) -> std::net::Ipv4Addr {
    for (agent, id) in [(a, "web-a"), (c, "web-c")] {
        http_instance(&agent.host, 8080).await;
        agent.register(web(id, http_check(8080))).await;
    }
    b.eventually("both instances on b", || async {
        let a = b.check_status("web", "a", "service:web-a").await;
        let c = b.check_status("web", "c", "service:web-c").await;
        (a.as_deref() == Some("passing") && c.as_deref() == Some("passing")).then_some(())
    })
    .await;
    b.resolve("web.service.internal").unwrap()
}

/// A host that loses power under load (no FIN, no reset: its link goes
/// down, then everything on it dies) is found silent, probed by its peers
/// and failed; B's requests that were on their way to it go to C, and not
/// one idempotent request fails.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and iptables"]
async fn a_host_that_dies_is_failed_and_costs_no_request() {
    let fleet = Fleet::new();
    let cp = fleet.control_plane(&[]).await;
    let a = fleet.agent("a", &cp, cp.grpc, "").await;
    let b = fleet.agent("b", &cp, cp.grpc, "").await;
    let c = fleet.agent("c", &cp, cp.grpc, "").await;
    all_alive(&cp, &[&a, &b, &c]).await;
    let vip = web_on_a_and_c(&a, &b, &c).await;
    let load = Load::start(&b, vip, 4);
    // Both take traffic before A dies.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let died = Instant::now();
    a.host.power_off();
    cp.wait_status("a", "failed").await;
    let detected = died.elapsed();
    b.eventually("a critical on b", || async {
        (b.check_status("web", "a", "serfHealth").await.as_deref() == Some("critical"))
            .then_some(())
    })
    .await;
    // Traffic goes on a while with A known dead.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (answers, failures) = load.finish().await;
    eprintln!(
        "host death (link down, no reset) to failed: {:.2} s; answers {answers:?}",
        detected.as_secs_f64()
    );
    assert!(
        answers.get("a").copied().unwrap_or(0) > 0,
        "a took traffic before it died: {answers:?}"
    );
    assert!(answers.get("c").copied().unwrap_or(0) > 0, "{answers:?}");
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}\nb's log:\n{}",
        failures.len(),
        failures.len() + answers.values().sum::<usize>(),
        &failures[..failures.len().min(10)],
        b.log()
    );
    assert!(
        cp.log().contains("no peer reaches the node"),
        "{}",
        cp.log()
    );
}

/// Watches `node` for `window`: the control plane never calls it failed
/// and `observer` never sees its liveness critical.
async fn never_failed(cp: &ControlPlane, observer: &Agent, node: &str, window: Duration) {
    let until = Instant::now() + window;
    while Instant::now() < until {
        let status = cp.status(node).await;
        assert_ne!(
            status.as_deref(),
            Some("failed"),
            "{node} was failed\n{}",
            cp.log()
        );
        assert_ne!(
            observer
                .check_status("web", node, "serfHealth")
                .await
                .as_deref(),
            Some("critical"),
            "{} saw {node} critical",
            observer.name
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A host cut off from the control plane only stays passing (its peers
/// reach it, again and again); cut off from everyone it is failed; healed,
/// it is passing again without a restart.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and iptables"]
async fn a_partition_fails_only_the_host_nobody_reaches() {
    let fleet = Fleet::new();
    let cp = fleet.control_plane(&[]).await;
    let a = fleet.agent("a", &cp, cp.grpc, "").await;
    let b = fleet.agent("b", &cp, cp.grpc, "upstreams: [web]\n").await;
    let c = fleet.agent("c", &cp, cp.grpc, "").await;
    all_alive(&cp, &[&a, &b, &c]).await;
    a.register(web("web-a", json!({"TTL": "10m", "Status": "passing"})))
        .await;
    b.eventually("web-a on b", || async {
        b.check_status("web", "a", "serfHealth")
            .await
            .filter(|s| s == "passing")
    })
    .await;

    // Only the control plane and A are cut apart.
    a.host.cut_from(&cp.host);
    cp.wait_status("a", "unreachable").await;
    // Long enough for the first probe and two re-probes (2 s, then 4 s).
    never_failed(&cp, &b, "a", Duration::from_secs(8)).await;
    assert!(cp.log().contains("peers reach the node"), "{}", cp.log());

    // Now nobody reaches A: the next re-probe fails it.
    a.host.isolate();
    cp.wait_status("a", "failed").await;
    b.eventually("a critical on b", || async {
        b.check_status("web", "a", "serfHealth")
            .await
            .filter(|s| s == "critical")
    })
    .await;

    a.host.heal();
    cp.wait_status("a", "alive").await;
    b.eventually("a passing again on b", || async {
        b.check_status("web", "a", "serfHealth")
            .await
            .filter(|s| s == "passing")
    })
    .await;
}

/// A restarted control plane keeps a failed host failed, fails a host that
/// died while it was down once the grace period is over without it, and
/// reaps both after `node_reap_after`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and iptables"]
async fn a_control_plane_restart_keeps_dead_hosts_dead_and_reaps_them() {
    let fleet = Fleet::new();
    let cp = fleet
        .control_plane(&[("node_reap_after:", "node_reap_after: 20s")])
        .await;
    let a = fleet.agent("a", &cp, cp.grpc, "").await;
    let b = fleet.agent("b", &cp, cp.grpc, "upstreams: [web]\n").await;
    let c = fleet.agent("c", &cp, cp.grpc, "").await;
    all_alive(&cp, &[&a, &b, &c]).await;
    for (agent, id) in [(&a, "web-a"), (&c, "web-c")] {
        agent
            .register(web(id, json!({"TTL": "10m", "Status": "passing"})))
            .await;
    }
    b.eventually("both on b", || async {
        let entries = b.get("/v1/health/service/web").await.json();
        (entries.as_array().unwrap().len() == 2).then_some(())
    })
    .await;

    // A dies with the control plane up: failed.
    a.host.power_off();
    cp.wait_status("a", "failed").await;
    // C dies while the control plane is down.
    let kept = cp.host.dir.join("data").join("catalog.pb");
    b.eventually("the failure kept on disk", || async {
        // The snapshot is written within a moment of the change.
        tokio::time::sleep(Duration::from_millis(500)).await;
        std::fs::metadata(&kept).is_ok().then_some(())
    })
    .await;
    cp.kill();
    c.host.power_off();
    cp.start().await;

    // Restarted: A is still failed, C is unreachable (routable) until the
    // grace period has passed without it.
    assert_eq!(cp.status("a").await.as_deref(), Some("failed"));
    assert_eq!(cp.status("c").await.as_deref(), Some("unreachable"));
    cp.wait_status("b", "alive").await;
    b.eventually("a critical and c passing on b", || async {
        let a = b.check_status("web", "a", "serfHealth").await;
        let c = b.check_status("web", "c", "serfHealth").await;
        (a.as_deref() == Some("critical") && c.as_deref() == Some("passing")).then_some(())
    })
    .await;
    cp.wait_status("c", "failed").await;
    assert!(
        cp.log().contains("restored from the last snapshot"),
        "{}",
        cp.log()
    );
    // Both are reaped: gone from the control plane and from B's view.
    b.eventually("a and c reaped", || async {
        let statuses = cp.statuses().await;
        let entries = b.get("/v1/health/service/web").await.json();
        (!statuses.contains_key("a")
            && !statuses.contains_key("c")
            && entries.as_array().unwrap().is_empty())
        .then_some(())
    })
    .await;
}

/// 5 % of packets lost between all hosts and 50 ms added each way on the
/// path to the control plane: every change still reaches the host that
/// uses it, and no host is failed by mistake, over a minute.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and iptables"]
async fn loss_and_delay_neither_stop_changes_nor_fail_anyone() {
    let fleet = Fleet::new();
    let cp = fleet.control_plane(&[]).await;
    let slow = std::net::SocketAddr::from((cp.host.ip, 8302));
    delay_relay(&cp.host, slow, cp.grpc, Duration::from_millis(50)).await;
    let a = fleet.agent("a", &cp, slow, "").await;
    let b = fleet.agent("b", &cp, slow, "upstreams: [web]\n").await;
    let c = fleet.agent("c", &cp, slow, "").await;
    all_alive(&cp, &[&a, &b, &c]).await;
    a.register(web("web-a", json!({"TTL": "10m", "Status": "passing"})))
        .await;
    b.eventually("web-a on b", || async {
        b.check_status("web", "a", "service:web-a")
            .await
            .filter(|s| s == "passing")
    })
    .await;
    for host in [&cp.host, &a.host, &b.host, &c.host] {
        host.lose(0.05);
    }

    let run = Duration::from_secs(60);
    let started = Instant::now();
    let mut changes = 0;
    let mut latencies = Vec::new();
    while started.elapsed() < run {
        let status = if changes % 2 == 0 { "fail" } else { "pass" };
        let flipped = Instant::now();
        let r = a
            .put(&format!("/v1/agent/check/{status}/service:web-a"), None)
            .await;
        assert!(r.status.is_success(), "{}", r.text);
        let want = if status == "fail" {
            "critical"
        } else {
            "passing"
        };
        b.eventually(&format!("change {changes} on b"), || async {
            (b.check_status("web", "a", "service:web-a").await.as_deref() == Some(want))
                .then_some(())
        })
        .await;
        latencies.push(flipped.elapsed());
        changes += 1;
        // Between changes, nobody is failed.
        never_failed(&cp, &b, "a", Duration::from_secs(1)).await;
        for node in ["b", "c"] {
            assert_ne!(cp.status(node).await.as_deref(), Some("failed"), "{node}");
        }
    }
    latencies.sort();
    eprintln!(
        "{changes} changes under 5 % loss and 50 ms: p50 {:?}, max {:?}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    assert!(!cp.log().contains("marking it failed"), "{}", cp.log());
}

/// Three control-plane machines, each a replica with an etcd member
/// beside it (`store: etcd`, the packaged configuration), and agents that
/// list all three. The machine whose replica holds B's stream loses power
/// under B's proxy load: B resumes on another replica, a change on A's
/// host still reaches B, not one request fails and no host is failed.
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, iptables and etcd (etcd-server)"]
async fn the_fleet_survives_the_loss_of_a_control_plane_machine() {
    let fleet = Fleet::new();
    let replicas = fleet.control_plane_replicas(3).await;
    let join = |name: &'static str, settings: &'static str| {
        let agent = fleet.agent_stopped(name, &replicas[0], replicas[0].grpc, settings);
        for replica in &replicas[1..] {
            agent.add_control_plane_address(replica.grpc);
        }
        agent
    };
    let (a, b, c) = (join("a", ""), join("b", ""), join("c", ""));
    for agent in [&a, &b, &c] {
        agent.start().await;
    }
    all_alive(&replicas[0], &[&a, &b, &c]).await;
    let vip = web_on_a_and_c(&a, &b, &c).await;
    let load = Load::start(&b, vip, 4);

    let on = replicas
        .iter()
        .position(|r| r.log().contains("agent connected node=b "))
        .expect("b's stream is on a replica");
    let died = Instant::now();
    replicas[on].host.power_off();
    b.eventually("b on another replica", || async {
        (b.log().matches("connected to the control plane").count() >= 2).then_some(())
    })
    .await;
    let resumed = died.elapsed();
    a.register(json!({"ID": "api-a", "Name": "api", "Port": 9090,
        "Check": {"TTL": "10m", "Status": "passing"}}))
        .await;
    b.eventually("a's new service on b", || async {
        b.check_status("api", "a", "service:api-a")
            .await
            .filter(|s| s == "passing")
    })
    .await;
    let (answers, failures) = load.finish().await;
    eprintln!(
        "a control-plane machine lost power: b resumed on another replica after {:.2} s; answers {answers:?}",
        resumed.as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        failures.len() + answers.values().sum::<usize>(),
        &failures[..failures.len().min(10)]
    );
    for (n, replica) in replicas.iter().enumerate().filter(|(n, _)| *n != on) {
        let statuses = replica.statuses().await;
        for node in ["a", "b", "c"] {
            assert_eq!(
                statuses.get(node).map(String::as_str),
                Some("alive"),
                "replica {n}: {statuses:?}\n{}",
                replica.log()
            );
        }
    }
}

/// The KV store across hosts with the packaged configuration (the
/// control plane's HTTP API on every address): what one host writes
/// through its agent, another reads and watches through its own, and a
/// lock taken on one host holds against the other.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root"]
async fn kv_written_on_one_host_is_read_watched_and_locked_on_another() {
    let fleet = Fleet::new();
    let cp = fleet.control_plane(&[]).await;
    let http = format!("  http: https://{}:8700\n", cp.host.ip);
    let a = fleet.agent("a", &cp, cp.grpc, &http).await;
    let b = fleet.agent("b", &cp, cp.grpc, &http).await;
    all_alive(&cp, &[&a, &b]).await;

    let r = a.put("/v1/kv/app/mode", Some(json!("blue"))).await;
    assert_eq!((r.status.as_u16(), r.text.as_str()), (200, "true"));
    assert_eq!(b.get("/v1/kv/app/mode?raw").await.text, "\"blue\"");
    let before = b.get("/v1/kv/app/?recurse").await;
    assert_eq!(before.status, 200, "{}", before.text);
    let watch = b.get_later(&format!(
        "/v1/kv/app/?recurse&index={}&wait=60s",
        before.index()
    ));
    let r = a.put("/v1/kv/app/mode", Some(json!("green"))).await;
    assert_eq!(r.text, "true");
    let woke = tokio::time::timeout(PATIENCE, watch)
        .await
        .expect("b's blocking read never woke")
        .unwrap();
    assert!(woke.index() > before.index());
    assert_eq!(woke.json()[0]["Value"], "ImdyZWVuIg==", "{}", woke.text);

    let created = b
        .put("/v1/session/create", Some(json!({"LockDelay": "0s"})))
        .await;
    assert_eq!(created.status, 200, "{}", created.text);
    let held_by_b = created.json()["ID"].as_str().unwrap().to_string();
    let created = a
        .put("/v1/session/create", Some(json!({"LockDelay": "0s"})))
        .await;
    let wants_a = created.json()["ID"].as_str().unwrap().to_string();
    let lock = |s: &str| format!("/v1/kv/app/leader?acquire={s}");
    assert_eq!(
        b.put(&lock(&held_by_b), Some(json!("b"))).await.text,
        "true"
    );
    assert_eq!(a.put(&lock(&wants_a), Some(json!("a"))).await.text, "false");
    let info = a.get(&format!("/v1/session/info/{held_by_b}")).await.json();
    assert_eq!(info[0]["Node"], "b");
}
