//! Bad input is refused where it enters, with a clear error, and nothing
//! that works is lost on the way: durations beyond any clock, background
//! tasks that stop, directories that go away.

#![allow(clippy::unwrap_used)] // test helpers: a panic is a test failure

use serde_json::{Value, json};
use signpost_tests::{Agent, ControlPlane, signpost};

mod control_plane;

/// A duration that fits a `u64` of seconds but no clock (Go refuses it too).
const HUGE: &str = "3000000000000000h";

async fn service(agent: &Agent, id: &str) -> Option<Value> {
    let services = agent.get("/v1/agent/services").await.json();
    services.get(id).cloned()
}

/// Waits until service `id` is registered.
async fn wait_service(agent: &Agent, id: &str) {
    agent
        .eventually(&format!("service {id}"), || async {
            service(agent, id).await.map(|_| ())
        })
        .await;
}

/// The error reported for service file `name`, once there is one.
async fn file_error(agent: &Agent, name: &str) -> String {
    let path = agent.services_dir().join(name).display().to_string();
    agent
        .eventually(&format!("an error for {name}"), || async {
            let body = agent.get("/v1/signpost/services").await.json();
            body["files"]
                .as_array()?
                .iter()
                .find(|f| f["path"] == path.as_str())?["error"]
                .as_str()
                .map(str::to_string)
        })
        .await
}

#[tokio::test]
async fn a_duration_too_large_for_any_clock_is_refused_everywhere_and_the_agent_lives_on() {
    let mut agent = Agent::start("").await;

    // A service file: refused with its position; the watcher carries on.
    agent.write_service_file(
        "huge.yaml",
        &format!("service:\n  name: huge\n  port: 1\n  checks:\n    - ttl: {HUGE}\n"),
    );
    let error = file_error(&agent, "huge.yaml").await;
    assert!(error.contains("huge.yaml:5:"), "{error}");
    assert!(error.contains("too large"), "{error}");
    agent.write_service_file("later.yaml", "service:\n  name: later\n  port: 2\n");
    wait_service(&agent, "later").await;
    assert!(service(&agent, "huge").await.is_none());

    // The API: as text and as nanoseconds, in every duration of a check.
    for check in [
        json!({"TTL": HUGE}),
        json!({"TTL": u64::MAX}),
        json!({"TTL": "10s", "DeregisterCriticalServiceAfter": HUGE}),
        json!({"TCP": "127.0.0.1:1", "Interval": HUGE}),
        json!({"TCP": "127.0.0.1:1", "Interval": "10s", "Timeout": u64::MAX}),
    ] {
        let body = json!({"ID": "api-huge", "Name": "api-huge", "Port": 3, "Check": check});
        let r = agent.put("/v1/agent/service/register", Some(body)).await;
        assert_eq!(r.status, 400, "{check}: {}", r.text);
        assert!(r.text.contains("too large"), "{check}: {}", r.text);
    }
    assert!(service(&agent, "api-huge").await.is_none());

    // --validate refuses what the agent refuses.
    let config = agent.config_path();
    let (code, _, stderr) =
        signpost(&["agent", "--config", config.to_str().unwrap(), "--validate"]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("huge.yaml:5:"), "{stderr}");

    // And a restart is a restart, not a crash loop.
    agent.restart().await;
    wait_service(&agent, "later").await;
    assert_eq!(
        agent
            .metric("signpost_agent_task_restarts_total{task=\"service file watcher\"}")
            .await,
        0.0,
        "nothing had to be started again"
    );
}

#[tokio::test]
async fn a_services_dir_removed_and_made_again_is_watched_again() {
    let agent = Agent::start("").await;
    agent.write_service_file("web.yaml", "service:\n  name: web\n  port: 80\n");
    wait_service(&agent, "web").await;

    std::fs::remove_dir_all(agent.services_dir()).unwrap();
    agent
        .eventually("the watcher to notice and be started again", || async {
            let restarts = agent
                .metric("signpost_agent_task_restarts_total{task=\"service file watcher\"}")
                .await;
            (restarts >= 1.0).then_some(())
        })
        .await;
    assert!(
        agent.log().contains("is gone: its services keep serving"),
        "{}",
        agent.log()
    );
    // Meanwhile what it had keeps serving.
    assert!(service(&agent, "web").await.is_some());

    std::fs::create_dir_all(agent.services_dir()).unwrap();
    agent.write_service_file("api.yaml", "service:\n  name: api\n  port: 81\n");
    wait_service(&agent, "api").await;
    // The directory came back without web.yaml: web is gone with its file.
    agent
        .eventually("web to go with its file", || async {
            service(&agent, "web").await.is_none().then_some(())
        })
        .await;
}

#[tokio::test]
async fn a_change_that_cannot_be_saved_is_refused_and_taken_back() {
    let mut agent = Agent::start("").await;
    let register = |id: &str| json!({"ID": id, "Name": id, "Port": 80, "Check": {"TTL": "10m", "Status": "passing"}});
    let r = agent
        .put("/v1/agent/service/register", Some(register("kept")))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    // A directory where the state file goes: every write fails (a file
    // is never renamed over a directory), as on a full or read-only disk.
    let state = agent.data_dir().join("state.json");
    let saved = agent.data_dir().join("state.json.saved");
    std::fs::rename(&state, &saved).unwrap();
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("in-the-way"), "").unwrap();
    let r = agent
        .put("/v1/agent/service/register", Some(register("lost")))
        .await;
    assert_eq!(r.status, 500, "{}", r.text);
    assert!(r.text.contains("cannot save the agent state"), "{}", r.text);
    assert!(service(&agent, "lost").await.is_none(), "taken back");
    let r = agent.put("/v1/agent/service/deregister/kept", None).await;
    assert_eq!(r.status, 500, "{}", r.text);
    assert!(service(&agent, "kept").await.is_some(), "put back");
    let r = agent
        .put("/v1/agent/service/maintenance/kept?enable=true", None)
        .await;
    assert_eq!(r.status, 500, "{}", r.text);
    let checks = agent.get("/v1/agent/checks").await.json();
    assert!(
        checks.get("_service_maintenance:kept").is_none(),
        "{checks}"
    );
    let r = agent
        .put(
            "/v1/agent/check/register",
            Some(json!({"ID": "alone", "Name": "alone", "TTL": "10m"})),
        )
        .await;
    assert_eq!(r.status, 500, "{}", r.text);
    assert!(agent.check_status("alone").await.is_none());
    assert!(
        agent
            .metric("signpost_agent_state_writes_total{outcome=\"error\"}")
            .await
            >= 4.0
    );

    // The disk is back: what was acknowledged, and only that, survives.
    std::fs::remove_dir_all(&state).unwrap();
    std::fs::rename(&saved, &state).unwrap();
    let r = agent
        .put("/v1/agent/service/register", Some(register("later")))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    agent.restart().await;
    assert!(service(&agent, "kept").await.is_some());
    assert!(service(&agent, "later").await.is_some());
    assert!(service(&agent, "lost").await.is_none());
}

/// A request to the control plane's HTTP API with an admin token.
async fn cp_call(
    cp: &ControlPlane,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let admin = std::fs::read_to_string(cp.dir.path().join("data").join("bootstrap-token"))
        .unwrap()
        .trim()
        .to_string();
    let mut request = cp
        .client()
        .request(method, cp.url(path))
        .header("X-Consul-Token", admin);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test]
async fn the_control_plane_keeps_nothing_it_could_not_save() {
    use reqwest::Method;
    let cp = ControlPlane::start().await;
    let data = cp.dir.path().join("data");
    let token = json!({"Role": "read", "Description": "a reader"});
    let (status, reader) = cp_call(&cp, Method::PUT, "/v1/acl/token", Some(token.clone())).await;
    assert_eq!(status, 200, "{reader}");
    let command = json!({"action": {"kind": "circuit", "state": "open"},
        "target": {"service": "web"}, "reason": "test", "ttl": "10m"});
    let (status, created) = cp_call(&cp, Method::POST, "/v1/commands", Some(command.clone())).await;
    assert_eq!(status, 200, "{created}");
    let id = created["id"].as_str().unwrap().to_string();

    // Directories where the token and command files go: every save fails.
    for file in ["acl.json", "commands.json"] {
        std::fs::remove_file(data.join(file)).unwrap();
        std::fs::create_dir_all(data.join(file).join("in-the-way")).unwrap();
    }
    let tokens = |list: &Value| list.as_array().unwrap().len();
    let (_, before) = cp_call(&cp, Method::GET, "/v1/acl/tokens", None).await;
    let (status, refused) = cp_call(&cp, Method::PUT, "/v1/acl/token", Some(token)).await;
    assert_eq!(status, 500, "{refused}");
    let (_, after) = cp_call(&cp, Method::GET, "/v1/acl/tokens", None).await;
    assert_eq!(tokens(&after), tokens(&before), "not kept: {after}");
    let accessor = reader["AccessorID"].as_str().unwrap();
    let (status, _) = cp_call(
        &cp,
        Method::DELETE,
        &format!("/v1/acl/token/{accessor}"),
        None,
    )
    .await;
    assert_eq!(status, 500);
    let (_, after) = cp_call(&cp, Method::GET, "/v1/acl/tokens", None).await;
    assert!(after.to_string().contains(accessor), "still there: {after}");

    let (status, refused) = cp_call(&cp, Method::POST, "/v1/commands", Some(command)).await;
    assert_eq!(status, 500, "{refused}");
    let (status, _) = cp_call(&cp, Method::DELETE, &format!("/v1/commands/{id}"), None).await;
    assert_eq!(status, 500);
    let (_, list) = cp_call(&cp, Method::GET, "/v1/commands", None).await;
    let commands = list.as_array().unwrap();
    assert_eq!(commands.len(), 1, "{list}");
    assert!(
        commands[0]["revoked_at"].is_null(),
        "still in force: {list}"
    );
}

#[tokio::test]
async fn a_malformed_request_body_is_the_clients_error_not_the_instances() {
    use signpost_tests::upstream::{Upstream, client, proxy_config, vip};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let agent = Agent::start(&proxy_config("")).await;
    let up = Upstream::start("web-1", 0).await;
    agent.write_service_file(
        "web.yaml",
        &format!("services:\n{}", up.entry("web", "http")),
    );
    let addr = vip(&agent, "web", up.addr.port()).await;

    // More bad requests than it takes to eject an instance (5 failures).
    for _ in 0..8 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nnot-a-size\r\n",
            )
            .await
            .unwrap();
        let mut answer = vec![0u8; 512];
        let n = stream.read(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]).to_lowercase();
        assert!(answer.starts_with("http/1.1 400"), "{answer}");
        assert!(answer.contains("x-signpost-error: client_body"), "{answer}");
    }
    // The instance is as good as before.
    let r = client("web.service.internal", addr)
        .get(format!("http://web.service.internal:{}/", up.addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "web-1");
    let series = format!(
        "signpost_agent_proxy_ejections_total{{service=\"web\",instance=\"{}\"}}",
        up.addr
    );
    assert_eq!(agent.metric(&series).await, 0.0);
}

#[tokio::test]
async fn connections_that_send_nothing_do_not_lock_a_service_out() {
    use signpost_tests::upstream::{Upstream, client, proxy_config, vip};

    let agent = Agent::start(&proxy_config(
        "  client_first_byte_timeout: 1s\n  defaults:\n    max_connections: 20\n",
    ))
    .await;
    let up = Upstream::start("web-1", 0).await;
    agent.write_service_file(
        "web.yaml",
        &format!("services:\n{}", up.entry("web", "http")),
    );
    let addr = vip(&agent, "web", up.addr.port()).await;
    let url = format!("http://web.service.internal:{}/", up.addr.port());

    // More silent connections than the service admits.
    let mut silent = Vec::new();
    for _ in 0..25 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // They are closed, having asked for nothing...
    for stream in &mut silent {
        closed_by_peer(stream).await;
    }
    // ...and the service answers everyone else.
    let r = client("web.service.internal", addr)
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let series = "signpost_agent_proxy_errors_total{service=\"web\",reason=\"client_silent\"}";
    assert!(agent.metric(series).await >= 25.0);
}

#[tokio::test]
async fn an_l4_service_with_an_idle_timeout_closes_idle_connections() {
    use signpost_tests::upstream::{bind, proxy_config, serve_echo, vip};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let agent = Agent::start(&proxy_config("  services:\n    echo: {idle_timeout: 1s}\n")).await;
    let listener = bind(0).await;
    let echo = listener.local_addr().unwrap();
    tokio::spawn(serve_echo(listener));
    agent.write_service_file(
        "echo.yaml",
        &format!(
            "service:\n  name: echo\n  address: {}\n  port: {}\n  protocol: tcp\n",
            echo.ip(),
            echo.port()
        ),
    );
    let addr = vip(&agent, "echo", echo.port()).await;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    // Then nothing, either way: closed.
    closed_by_peer(&mut stream).await;
}

/// Waits until the other end closes `stream` (it reads end-of-file or an
/// error); fails the test if it stays open.
async fn closed_by_peer(stream: &mut tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    let Ok(read) = tokio::time::timeout(signpost_tests::PATIENCE, stream.read(&mut buf)).await
    else {
        panic!("the connection is still open");
    };
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test]
async fn idle_and_surplus_api_connections_are_closed_and_blocking_queries_are_not() {
    let agent = Agent::start(
        "api:\n  limits:\n    header_timeout: 1s\n    max_connections_per_client: 4\n",
    )
    .await;
    // A blocking query waits longer than the header timeout, unharmed.
    let index = agent.get("/v1/catalog/services").await.index();
    let r = agent
        .get(&format!("/v1/catalog/services?index={index}&wait=3s"))
        .await;
    assert_eq!(r.status, 200);

    // More connections from this client than it may have, all silent:
    // those over the limit are closed as they arrive, the others once
    // the header timeout passes.
    let mut silent = Vec::new();
    for _ in 0..7 {
        silent.push(tokio::net::TcpStream::connect(agent.addr).await.unwrap());
    }
    for stream in &mut silent {
        closed_by_peer(stream).await;
    }
    // The API serves the client again.
    assert_eq!(agent.get("/v1/agent/self").await.status, 200);
    let closed = |reason: &str| {
        format!("signpost_agent_api_connections_closed_total{{reason=\"{reason}\"}}")
    };
    assert!(agent.metric(&closed("per_client_limit")).await >= 3.0);
    assert!(agent.metric(&closed("header_timeout")).await >= 3.0);
}

#[tokio::test]
async fn the_control_plane_closes_http_connections_that_send_nothing() {
    let cp = ControlPlane::start().await;
    let mut silent = tokio::net::TcpStream::connect(cp.http).await.unwrap();
    closed_by_peer(&mut silent).await;
    let metrics = cp.get("/metrics").await;
    assert_eq!(metrics.status, 200);
    let series = "signpost_control_plane_http_connections_closed_total{reason=\"header_timeout\"}";
    assert!(
        metrics
            .text
            .lines()
            .any(|l| l.starts_with(series) && !l.ends_with(" 0")),
        "{}",
        metrics.text
    );
}

/// CPU time (user and system, in clock ticks) process `pid` has used.
fn cpu_ticks(pid: nix::unistd::Pid) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name in parentheses: state is field 3, utime 14.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test]
async fn dns_over_tcp_waits_out_the_file_descriptor_limit_and_closes_idle_connections() {
    use hickory_proto::rr::RecordType;
    use signpost_tests::dns::{Transport, query};

    let agent = Agent::start("").await;
    agent.write_service_file(
        "web.yaml",
        "service:\n  name: web\n  address: 10.1.2.3\n  port: 80\n",
    );
    wait_service(&agent, "web").await;
    let dns = agent.dns_addr();
    let mut idle = tokio::net::TcpStream::connect(dns).await.unwrap();

    // No file descriptor left: a connection waits in the backlog and the
    // accept loops back off instead of spinning.
    let pid = agent.pid().to_string();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap()
        .to_string();
    let limit = |soft: &str| {
        let out = std::process::Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={soft}:")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    limit(&open.to_string());
    let waiting = tokio::net::TcpStream::connect(dns).await.unwrap();
    let before = cpu_ticks(agent.pid());
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let used = cpu_ticks(agent.pid()) - before;
    limit(&soft);
    // A thread spinning on accept would use about 300 ticks (3 s).
    assert!(
        used < 100,
        "{used} ticks of CPU in 3 s at the descriptor limit"
    );
    drop(waiting);

    // Descriptors again: TCP queries are answered.
    let answer = query(dns, "web.service.internal", RecordType::A, Transport::Tcp).await;
    assert!(!answer.answers.is_empty(), "{answer:?}");
    // And the connection that never asked anything is closed.
    closed_by_peer(&mut idle).await;
    assert!(
        agent
            .log()
            .contains("cannot accept connections; backing off")
    );
}

#[tokio::test]
async fn unknown_services_unreadable_files_and_link_loops_are_reported() {
    let agent = Agent::start("").await;
    // Deregistering a service nobody registered: 404, as Consul.
    let r = agent.put("/v1/agent/service/deregister/nobody", None).await;
    assert_eq!(r.status, 404, "{}", r.text);
    assert!(
        r.text.contains("Unknown service ID \"nobody\""),
        "{}",
        r.text
    );

    // Service files that cannot be read are reported, not skipped.
    let dir = agent.services_dir();
    std::os::unix::fs::symlink(dir.join("loop.yaml"), dir.join("loop.yaml")).unwrap();
    std::os::unix::fs::symlink(dir.join("missing"), dir.join("dangling.yaml")).unwrap();
    std::fs::create_dir(dir.join("folder.yaml")).unwrap();
    agent.write_service_file("good.yaml", "service:\n  name: good\n  port: 1\n");
    wait_service(&agent, "good").await;
    let error = file_error(&agent, "loop.yaml").await;
    assert!(error.contains("symbolic links"), "{error}");
    let error = file_error(&agent, "dangling.yaml").await;
    assert!(error.contains("a symbolic link to nothing"), "{error}");
    let error = file_error(&agent, "folder.yaml").await;
    assert!(error.contains("directory"), "{error}");
}
