//! The service mesh across real hosts (network namespaces, the packaged
//! configuration): an application on one host calls a meshed service on
//! another by name, as before; between the hosts the call is mutual TLS
//! with both services' identities, the destination's host decides with
//! the intentions, and the instance can listen on loopback only.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use signpost_tests::PATIENCE;
use signpost_tests::fleet::{
    Agent, ControlPlane, Fleet, http_instance, loopback_echo_instance, loopback_http_instance,
};

/// Debian's interpreter.
const PYTHON: &str = "/usr/bin/python3";

/// Runs a Python program on the agent's host until it succeeds; its
/// output.
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

/// Runs a Python program on the agent's host once; its output.
fn run_once(agent: &Agent, program: &str) -> String {
    let out = agent.host.exec(PYTHON, &["-c", program]);
    assert!(
        out.status.success(),
        "{program}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A GET from an application on the host: `<status> <body>`, whatever
/// the status.
fn http_get(agent: &Agent, url: &str) -> String {
    run_once(
        agent,
        &format!(
            "import urllib.request, urllib.error\n\
             try:\n    r = urllib.request.urlopen({url:?}, timeout=10)\n    print(r.status, r.read().decode())\n\
             except urllib.error.HTTPError as e:\n    print(e.code, e.headers.get('x-signpost-error', ''))"
        ),
    )
}

/// Sends `ping` on a new connection to `host:port` and prints what comes
/// back (`closed` when the connection closes first).
fn echo(agent: &Agent, host: &str, port: u16) -> String {
    run_once(
        agent,
        &format!(
            "import socket\n\
             s = socket.create_connection(({host:?}, {port}), timeout=10)\n\
             s.sendall(b'ping')\n\
             try:\n    d = s.recv(100)\nexcept ConnectionResetError:\n    d = b''\n\
             print(d.decode() if d else 'closed')"
        ),
    )
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

/// Creates an intention through the control plane's API.
async fn intention(cp: &ControlPlane, body: Value) {
    let source = body["SourceName"].as_str().unwrap().to_string();
    let destination = body["DestinationName"].as_str().unwrap().to_string();
    let r = cp
        .send(
            Method::PUT,
            &format!("/v1/connect/intentions/exact?source={source}&destination={destination}"),
            Some(body),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
}

/// The value of the counter `series` (its name and labels as rendered)
/// in the agent's metrics, 0 when absent.
async fn metric(agent: &Agent, series: &str) -> f64 {
    let text = agent.get("/metrics").await.text;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Two hosts: `a` runs the meshed `web` (HTTP) and `echo` (TCP), both
/// listening on a's loopback only, and an unmeshed `plain`; `b` runs the
/// `api` service, the caller.
async fn two_hosts(fleet: &Fleet, cp_changes: &[(&str, &str)]) -> (ControlPlane, Agent, Agent) {
    let cp = fleet.control_plane(cp_changes).await;
    let a = fleet
        .agent("a", &cp, cp.grpc, "proxy:\n  access_log: true\n")
        .await;
    let b = fleet.agent("b", &cp, cp.grpc, "").await;
    all_alive(&cp, &[&a, &b]).await;
    loopback_http_instance(&a.host, 8080).await;
    loopback_echo_instance(&a.host, 7000).await;
    http_instance(&a.host, 8081).await;
    a.register(json!({
        "ID": "web-1", "Name": "web", "Address": "127.0.0.1", "Port": 8080,
        "Protocol": "http", "Connect": {"SidecarService": {}},
        "Check": {"HTTP": "http://127.0.0.1:8080/health", "Interval": "1s"}
    }))
    .await;
    a.register(json!({
        "ID": "echo-1", "Name": "echo", "Address": "127.0.0.1", "Port": 7000,
        "Protocol": "tcp", "Connect": {"SidecarService": {}},
        "Check": {"TCP": "127.0.0.1:7000", "Interval": "1s"}
    }))
    .await;
    a.register(json!({
        "ID": "plain-1", "Name": "plain", "Port": 8081, "Protocol": "http",
        "Check": {"HTTP": "http://127.0.0.1:8081/health", "Interval": "1s"}
    }))
    .await;
    b.register(json!({"ID": "api-1", "Name": "api", "Port": 9000}))
        .await;
    (cp, a, b)
}

/// Starts tcpdump on `agent`'s host, writing what `filter` matches to a
/// file; stopped with [`stop_capture`].
fn start_capture(agent: &Agent, what: &str, filter: &str) -> std::path::PathBuf {
    let file = agent.host.dir.join(format!("{what}.pcap"));
    let args = [
        "-i",
        "any",
        "-U",
        "-n",
        "-w",
        file.to_str().unwrap(),
        filter,
    ];
    agent
        .host
        .start_process(what, std::path::Path::new("tcpdump"), &args);
    file
}

/// Stops the capture `what` and returns what it captured; waits until it
/// captured something.
async fn stop_capture(agent: &Agent, what: &str, file: &std::path::Path, least: usize) -> Vec<u8> {
    agent
        .eventually(&format!("{what} to capture packets"), || async {
            let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
            (len as usize > least).then_some(())
        })
        .await;
    agent.host.kill_process(what);
    std::fs::read(file).unwrap()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// An application on b calls `web` on a by name: the call crosses hosts
/// as mutual TLS (a capture on b sees no byte of it in plaintext, where
/// it sees an unmeshed service's), the loopback-only instance is reached
/// only through the mesh, a client without a mesh certificate gets
/// nothing from the inbound port, and intentions decide: deny (403 for
/// HTTP, a closed connection for TCP, and an open TCP connection closed
/// when the deny arrives), shadow deny (let through and counted), L7
/// permissions per path.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and tcpdump"]
async fn meshed_calls_cross_hosts_encrypted_and_obey_intentions() {
    let fleet = Fleet::new();
    let (cp, a, b) = two_hosts(&fleet, &[]).await;
    let a_ip = a.host.ip.to_string();

    // Reached by name, through the mesh (the instance listens on a's
    // loopback, where b could not reach it otherwise).
    let answer = app(
        &b,
        "web from b through the mesh",
        "import urllib.request\nprint(urllib.request.urlopen('http://web.service.internal:8080/hello', timeout=10).read().decode())",
    )
    .await;
    assert_eq!(answer, "a GET /hello");
    let direct = run_once(
        &b,
        &format!(
            "import socket\ntry:\n    socket.create_connection(({a_ip:?}, 8080), timeout=5)\n    print('connected')\nexcept OSError as e:\n    print('refused')"
        ),
    );
    assert_eq!(
        direct, "refused",
        "the instance must not be reachable directly"
    );
    let echoed = app(
        &b,
        "echo from b through the mesh",
        "import socket\ns = socket.create_connection(('echo.service.internal', 7000), timeout=10)\ns.sendall(b'ping')\nprint(s.recv(100).decode())",
    )
    .await;
    assert_eq!(echoed, "ping");

    // Nothing crosses in plaintext: the mesh's capture has none of the
    // request, the unmeshed service's has it (so the capture works).
    app(
        &b,
        "plain from b",
        "import urllib.request\nprint(urllib.request.urlopen('http://plain.service.internal:8081/', timeout=10).read().decode())",
    )
    .await;
    let mesh_pcap = start_capture(&b, "capture-mesh", "tcp port 8443");
    let plain_pcap = start_capture(&b, "capture-plain", "tcp port 8081");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        http_get(&b, "http://web.service.internal:8080/secret-marker-mesh"),
        "200 a GET /secret-marker-mesh"
    );
    http_get(&b, "http://plain.service.internal:8081/secret-marker-plain");
    let mesh = stop_capture(&b, "capture-mesh", &mesh_pcap, 200).await;
    let plain = stop_capture(&b, "capture-plain", &plain_pcap, 200).await;
    assert!(
        contains(&plain, "secret-marker-plain"),
        "the capture sees plaintext"
    );
    assert!(
        !contains(&mesh, "secret-marker-mesh"),
        "the mesh leaked the path"
    );
    assert!(!contains(&mesh, "GET /"), "the mesh leaked a request line");

    // No mesh certificate, no answer: the inbound listener wants one.
    let bare = run_once(
        &b,
        &format!(
            "import socket, ssl\n\
             c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\n\
             c.check_hostname = False\n\
             c.verify_mode = ssl.CERT_NONE\n\
             c.set_alpn_protocols(['h2'])\n\
             try:\n\
             \x20   s = c.wrap_socket(socket.create_connection(({a_ip:?}, 8443), timeout=5), server_hostname='p8080.web.mesh.invalid')\n\
             \x20   s.sendall(b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n')\n\
             \x20   print('answered' if s.recv(100) else 'closed')\n\
             except (ssl.SSLError, OSError) as e:\n\
             \x20   print('refused')"
        ),
    );
    assert_ne!(bare, "answered");
    a.eventually("the refused handshake counted", || async {
        (metric(
            &a,
            "signpost_agent_proxy_mesh_handshake_failures_total{side=\"inbound\",reason=\"no_certificate\"}",
        )
        .await
            >= 1.0)
            .then_some(())
    })
    .await;

    // An L4 connection open before a deny is closed when it arrives.
    let holder = agent_program(
        &b,
        "holder",
        "import socket, sys\n\
         s = socket.create_connection(('echo.service.internal', 7000), timeout=60)\n\
         s.sendall(b'ping')\n\
         assert s.recv(100) == b'ping'\n\
         print('open', file=sys.stderr, flush=True)\n\
         try:\n    d = s.recv(100)\nexcept OSError:\n    d = b''\n\
         print('closed' if not d else 'data', file=sys.stderr, flush=True)\n",
    );
    b.eventually("the held connection open", || async {
        b.host.log(&holder).contains("open").then_some(())
    })
    .await;

    // Deny: HTTP gets 403 from a's inbound, TCP a closed connection.
    intention(
        &cp,
        json!({"SourceName": "api", "DestinationName": "web", "Action": "deny"}),
    )
    .await;
    intention(
        &cp,
        json!({"SourceName": "*", "DestinationName": "echo", "Action": "deny"}),
    )
    .await;
    b.eventually("the deny reaches a", || async {
        (http_get(&b, "http://web.service.internal:8080/") == "403 intention_denied").then_some(())
    })
    .await;
    assert_eq!(echo(&b, "echo.service.internal", 7000), "closed");
    b.eventually("the held connection closed by the deny", || async {
        b.host.log(&holder).contains("closed").then_some(())
    })
    .await;
    assert!(
        metric(
            &a,
            "signpost_agent_proxy_mesh_requests_total{source=\"api\",destination=\"web\",decision=\"deny\"}"
        )
        .await
            >= 1.0
    );

    // Shadow: the same deny lets calls through, and counts them.
    intention(
        &cp,
        json!({"SourceName": "api", "DestinationName": "web", "Action": "deny", "Shadow": true}),
    )
    .await;
    b.eventually("the shadow deny reaches a", || async {
        (http_get(&b, "http://web.service.internal:8080/shadowed") == "200 a GET /shadowed")
            .then_some(())
    })
    .await;
    assert!(
        metric(
            &a,
            "signpost_agent_proxy_mesh_requests_total{source=\"api\",destination=\"web\",decision=\"shadow_deny\"}"
        )
        .await
            >= 1.0
    );

    // L7 permissions: GET under /public only.
    intention(
        &cp,
        json!({"SourceName": "api", "DestinationName": "web", "Permissions": [
            {"Action": "allow", "HTTP": {"PathPrefix": "/public", "Methods": ["GET"]}},
            {"Action": "deny", "HTTP": {"PathPrefix": "/"}}
        ]}),
    )
    .await;
    b.eventually("the L7 intention reaches a", || async {
        (http_get(&b, "http://web.service.internal:8080/private") == "403 intention_denied")
            .then_some(())
    })
    .await;
    assert_eq!(
        http_get(&b, "http://web.service.internal:8080/public/x"),
        "200 a GET /public/x"
    );
    // The verified identity is in a's access log.
    let log = a.log();
    assert!(
        log.contains("spiffe://signpost.mesh/dc/dc1/svc/api"),
        "a's log names no caller identity"
    );

    // With the control plane gone, both agents restarted serve the mesh
    // from what they kept: certificates, roots and intentions.
    cp.kill();
    for agent in [&a, &b] {
        agent.host.kill_process("agent");
        agent.start().await;
    }
    b.eventually(
        "the mesh after restarts without a control plane",
        || async {
            (http_get(&b, "http://web.service.internal:8080/public/after")
                == "200 a GET /public/after")
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        http_get(&b, "http://web.service.internal:8080/private"),
        "403 intention_denied"
    );
}

/// Starts a Python program on the agent's host in the background; the
/// name its log is under.
fn agent_program(agent: &Agent, what: &str, program: &str) -> String {
    agent
        .host
        .start_process(what, std::path::Path::new(PYTHON), &["-c", program]);
    what.to_string()
}

/// Calls from an application on `agent`'s host to each of `urls` in a
/// loop, one client keeping connections alive and one opening a
/// connection per call, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    loops: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(agent: &Agent, urls: &[String]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut loops = Vec::new();
        for url in urls {
            for keep_alive in [true, false] {
                let (stop, ok, failed, url) =
                    (stop.clone(), ok.clone(), failed.clone(), url.clone());
                loops.push(agent.host.spawn(async move {
                    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(10));
                    if !keep_alive {
                        builder = builder.pool_max_idle_per_host(0);
                    }
                    let client = builder.build().unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        match client.get(&url).send().await {
                            Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                            other => {
                                eprintln!("failed: {url}: {other:?}");
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }));
            }
        }
        Load {
            stop,
            ok,
            failed,
            loops,
        }
    }

    /// Stops the calls; none may have failed, and enough were made to
    /// mean something.
    async fn stop_without_failures(self) {
        self.stop.store(true, Ordering::Relaxed);
        for l in self.loops {
            l.await.unwrap();
        }
        let (ok, failed) = (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        );
        assert_eq!(failed, 0, "{failed} failed calls out of {}", ok + failed);
        assert!(ok > 100, "only {ok} calls");
    }
}

/// Calls through the mesh keep succeeding while every certificate is
/// renewed (a one-minute lifetime: renewed after 40 s) and while the CA
/// rotates (a new root, cross-signed, and every certificate renewed with
/// it): requests on kept-alive connections and on a new connection each.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root"]
async fn certificates_and_the_ca_rotate_under_load_without_a_failed_request() {
    let fleet = Fleet::new();
    let (cp, a, b) = two_hosts(
        &fleet,
        &[(
            "restore_grace:",
            "restore_grace: 30s\nmesh:\n  leaf_ttl: 1m",
        )],
    )
    .await;
    app(
        &b,
        "web from b through the mesh",
        "import urllib.request\nprint(urllib.request.urlopen('http://web.service.internal:8080/', timeout=10).read().decode())",
    )
    .await;
    let vip = b.resolve("web.service.internal").unwrap();
    let load = Load::start(&b, &[format!("http://{vip}:8080/load")]);
    let renewals = |agent: &Agent, service: &str| {
        let service = format!("service={service}");
        agent
            .log()
            .lines()
            .filter(|l| l.contains("mesh certificate renewed") && l.contains(&service))
            .count()
    };
    // Each side's certificate renewed once more, under load.
    for (agent, service) in [(&a, "web"), (&b, "api")] {
        signpost_tests::poll(
            &format!("{service}'s certificate renewed"),
            2 * PATIENCE,
            || agent.log(),
            || async { (renewals(agent, service) >= 2).then_some(()) },
        )
        .await;
    }
    let rotated = cp.send(Method::POST, "/v1/connect/ca/rotate", None).await;
    assert_eq!(rotated.status, 200, "{}", rotated.text);
    let roots = cp.get("/v1/connect/ca/roots").await.json();
    let active = roots["ActiveRootID"].as_str().unwrap().to_string();
    assert_eq!(roots["Roots"].as_array().unwrap().len(), 2);
    for (agent, service) in [(&a, "web"), (&b, "api")] {
        agent
            .eventually(&format!("{service} renewed with the new root"), || async {
                agent
                    .log()
                    .lines()
                    .any(|l| {
                        l.contains("mesh certificate renewed")
                            && l.contains(&format!("service={service}"))
                            && l.contains(&active)
                    })
                    .then_some(())
            })
            .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.stop_without_failures().await;
    // The new certificates are in use: a full handshake after the
    // rotation still succeeds.
    assert_eq!(
        http_get(&b, "http://web.service.internal:8080/after"),
        "200 a GET /after"
    );
}

/// The agent process serving the API on `agent`'s host (`signpost
/// status`).
async fn serving_pid(agent: &Agent) -> i32 {
    agent.get("/v1/signpost/status").await.json()["pid"]
        .as_i64()
        .unwrap() as i32
}

/// Restarting both agents through a handover (`signpost restart`, as
/// the package's upgrade does with SIGUSR2) while an application on b
/// calls a's meshed and unmeshed services, with keep-alive and with a
/// connection per call: not one call fails. a's mesh inbound listener
/// and b's VIP listeners pass to the new processes with their queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn restarting_agents_through_a_handover_fails_no_call_between_hosts() {
    let fleet = Fleet::new();
    let (_cp, a, b) = two_hosts(&fleet, &[]).await;
    for service in ["web:8080", "plain:8081"] {
        app(
            &b,
            &format!("{service} from b"),
            &format!("import urllib.request\nprint(urllib.request.urlopen('http://{}.service.internal:{}/', timeout=10).read().decode())",
                service.split(':').next().unwrap(), service.split(':').nth(1).unwrap()),
        )
        .await;
    }
    let load = Load::start(
        &b,
        &[
            format!(
                "http://{}:8080/",
                b.resolve("web.service.internal").unwrap()
            ),
            format!(
                "http://{}:8081/",
                b.resolve("plain.service.internal").unwrap()
            ),
        ],
    );
    let signpost = signpost_tests::signpost_bin().to_str().unwrap().to_string();
    let mut successors = Vec::new();
    for agent in [&a, &b] {
        let before = serving_pid(agent).await;
        let out = agent
            .host
            .exec(&signpost, &["--http-addr", "127.0.0.1:8500", "restart"]);
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            agent.log()
        );
        let now = agent
            .eventually("the new agent process to answer", || async {
                let pid = serving_pid(agent).await;
                (pid != before).then_some(pid)
            })
            .await;
        successors.push(now);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.stop_without_failures().await;
    for pid in successors {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .ok();
    }
}
