//! The local proxy end to end: a real agent, real upstream servers on
//! loopback, clients that resolve the service name through the agent's
//! DNS and connect to the VIP it returns.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use signpost_tests::Agent;
use signpost_tests::upstream::{
    HANG, Upstream, bind, client, client_builder, proxy_config, serve_echo, serve_grpc_health,
    spread, upstreams, vip, vip_client,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

mod balancing;
mod protection;
mod retries;
mod upgrades;

/// An agent with its own VIP range (tests run side by side) and `proxy`
/// settings (YAML lines under `proxy:`, indented by two spaces).
async fn agent(proxy: &str) -> Agent {
    Agent::start(&proxy_config(proxy)).await
}

fn register(agent: &Agent, file: &str, service: &str, protocol: &str, ups: &[Upstream]) {
    let entries: String = ups.iter().map(|u| u.entry(service, protocol)).collect();
    agent.write_service_file(file, &format!("services:\n{entries}"));
}

/// Registers one instance of `service`, at `addr`.
fn register_at(agent: &Agent, service: &str, protocol: &str, addr: SocketAddr) {
    agent.write_service_file(
        &format!("{service}.yaml"),
        &format!(
            "services:\n  - name: {service}\n    address: {}\n    port: {}\n    protocol: {protocol}\n",
            addr.ip(),
            addr.port()
        ),
    );
}

async fn echo_server() -> SocketAddr {
    let listener = bind(0).await;
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_echo(listener));
    addr
}

async fn echo(stream: &mut TcpStream, text: &str) -> String {
    stream.write_all(text.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; text.len()];
    stream.read_exact(&mut buf).await.unwrap();
    String::from_utf8(buf).unwrap()
}

#[tokio::test]
async fn http_and_tcp_services_are_reached_through_their_vip_names() {
    let agent = agent("  defaults:\n    balancer: round_robin\n").await;
    let web = upstreams("web", 2).await;
    register(&agent, "web.yaml", "web", "http", &web);
    let echo_addr = echo_server().await;
    register_at(&agent, "echo", "tcp", echo_addr);

    // L7, on the instances' port and on port 80.
    let port = web[0].addr.port();
    let addr = vip(&agent, "web", port).await;
    let c = client("web.service.internal", addr);
    let seen = spread(&c, &format!("http://web.service.internal:{port}/"), 20).await;
    assert_eq!(seen.len(), 2, "both instances serve: {seen:?}");
    let on_80 = vip(&agent, "web", 80).await;
    let c80 = client("web.service.internal", on_80);
    let r = c80
        .get("http://web.service.internal/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().starts_with("web-"));

    // An HTTP/2 client (prior knowledge) to the same HTTP/1.1 instances.
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .resolve("web.service.internal", addr)
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for _ in 0..3 {
        let r = h2
            .get(format!("http://web.service.internal:{port}/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.status(), 200);
        assert!(r.text().await.unwrap().starts_with("web-"));
    }

    // L4: bytes both ways.
    let addr = vip(&agent, "echo", echo_addr.port()).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    assert_eq!(
        echo(&mut stream, "hello through the VIP").await,
        "hello through the VIP"
    );

    let m = agent
        .metric(&format!(
            "signpost_agent_proxy_requests_total{{service=\"web\",instance=\"{}\",class=\"2xx\"}}",
            web[0].addr
        ))
        .await;
    assert!(m >= 1.0, "requests are counted per instance");
}

/// Requests reuse the proxy's connections to an instance; a connection the
/// instance closed is never used again, so even a POST (never retried)
/// gets through.
#[tokio::test]
async fn connections_to_instances_are_pooled_and_closed_ones_replaced() {
    let agent = agent("").await;
    let web = upstreams("web", 1).await;
    register(&agent, "web.yaml", "web", "http", &web);
    let port = web[0].addr.port();
    let (c, url) = vip_client(&agent, "web", port).await;
    for _ in 0..20 {
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
    }
    let pooled = web[0].connections();
    assert!(
        (1..=2).contains(&pooled),
        "20 requests in a row took {pooled} connections to the instance"
    );

    web[0].set_close(true);
    for n in 0..5 {
        let r = c.post(&url).body("once").send().await.unwrap();
        assert_eq!(r.status(), 200, "POST {n} after the instance closed");
        assert!(
            r.headers().get("connection").is_none(),
            "the instance's Connection header is its own"
        );
        r.text().await.unwrap();
    }
    // The first POST went on the pooled connection; the instance closed
    // it and each of the others after one answer.
    assert_eq!(
        web[0].connections(),
        pooled + 4,
        "each closed connection was replaced once"
    );
}

/// Pooled connections left idle past `pool_idle_timeout` are closed.
#[tokio::test]
async fn idle_pooled_connections_are_closed() {
    let agent = agent("  pool_idle_timeout: 300ms\n").await;
    let web = upstreams("web", 1).await;
    register(&agent, "web.yaml", "web", "http", &web);
    let (c, url) = vip_client(&agent, "web", web[0].addr.port()).await;
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    assert!(web[0].open() >= 1, "the proxy keeps its connection open");
    drop(c);
    // Polled, not timed: the sweeper runs every idle timeout.
    let mut open = web[0].open();
    for _ in 0..100 {
        if open == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        open = web[0].open();
    }
    assert_eq!(open, 0, "idle connections to the instance are closed");
}

/// A client connection that starts no request for `client_idle_timeout`
/// is closed, but never in the middle of an exchange: a request slower
/// than the timeout gets its whole answer first.
#[tokio::test]
async fn idle_client_connections_are_closed_after_their_exchange() {
    let agent = agent("  client_idle_timeout: 300ms\n").await;
    let web = upstreams("web", 1).await;
    register(&agent, "web.yaml", "web", "http", &web);
    let addr = vip(&agent, "web", web[0].addr.port()).await;
    web[0].set_delay(1500);
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: web.service.internal\r\n\r\n")
        .await
        .unwrap();
    // To the end of the stream: the proxy closes it after the answer
    // (the limit only keeps a broken proxy from hanging the test).
    let limit = std::time::Duration::from_secs(60);
    let mut answer = String::new();
    tokio::time::timeout(limit, slow.read_to_string(&mut answer))
        .await
        .expect("the idle connection was never closed")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("web-1"), "the whole answer: {answer}");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(limit, silent.read_to_end(&mut rest))
        .await
        .expect("the silent connection was never closed");
    assert_eq!(read.unwrap(), 0);
}

/// With `proxy.access_log` on and JSON logs, each request (L7) and each
/// connection (L4) gets one line on the `signpost::access` target naming
/// the service, the client, the instance and what came of it.
#[tokio::test]
async fn the_access_log_has_a_line_per_request_and_connection() {
    let agent = Agent::start(&format!(
        "log:\n  format: json\n{}",
        proxy_config("  access_log: true\n")
    ))
    .await;
    let web = upstreams("web", 1).await;
    register(&agent, "web.yaml", "web", "http", &web);
    let bulk = echo_server().await;
    register_at(&agent, "bulk", "tcp", bulk);
    let web_vip = vip(&agent, "web", web[0].addr.port()).await;
    let bulk_vip = vip(&agent, "bulk", bulk.port()).await;
    let net = rand::random_range(0..=255u8);
    let connect_from = |host: u8, to: SocketAddr| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::from(([127, 78, net, host], 0)))
            .unwrap();
        socket.connect(to).await.unwrap()
    };

    let mut stream = connect_from(1, web_vip).await;
    let web_client = stream.local_addr().unwrap();
    stream
        .write_all(b"GET /hello?to=you HTTP/1.1\r\nHost: web.service.internal\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let mut stream = connect_from(2, bulk_vip).await;
    let bulk_client = stream.local_addr().unwrap();
    assert_eq!(echo(&mut stream, "ping").await, "ping");
    drop(stream);

    // The lines of this test's two clients (`vip` has connected too).
    let clients = [web_client.to_string(), bulk_client.to_string()];
    let lines = agent
        .eventually("two access log lines", || async {
            let lines: Vec<serde_json::Value> = agent
                .log()
                .lines()
                .filter_map(|line| serde_json::from_str(line).ok())
                .filter(|line: &serde_json::Value| {
                    line["target"] == "signpost::access"
                        && clients.iter().any(|c| line["client"] == c.as_str())
                })
                .collect();
            (lines.len() >= 2).then_some(lines)
        })
        .await;
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let request = &lines[0];
    assert_eq!(request["service"], "web", "{request}");
    assert_eq!(request["client"], web_client.to_string(), "{request}");
    assert_eq!(request["method"], "GET", "{request}");
    assert_eq!(request["path"], "/hello", "{request}");
    assert_eq!(request["status"], 200, "{request}");
    assert_eq!(request["instance"], web[0].addr.to_string(), "{request}");
    assert_eq!(request["attempts"], 1, "{request}");
    assert!(request["duration_ms"].as_f64().is_some(), "{request}");
    let connection = &lines[1];
    assert_eq!(connection["service"], "bulk", "{connection}");
    assert_eq!(
        connection["client"],
        bulk_client.to_string(),
        "{connection}"
    );
    assert_eq!(connection["instance"], bulk.to_string(), "{connection}");
    assert_eq!(connection["bytes_sent"], 4, "{connection}");
    assert_eq!(connection["bytes_received"], 4, "{connection}");
    assert!(connection["duration_ms"].as_f64().is_some(), "{connection}");
}

/// Requests carry their identity through the proxy: a W3C
/// `traceparent` and an `x-request-id` that came with the request reach
/// the instance unchanged; missing ones are made (a valid, unsampled
/// trace; a UUID). The answer carries the request id back, the access
/// log both.
#[tokio::test]
async fn requests_carry_a_trace_context_and_a_request_id() {
    let agent = Agent::start(&format!(
        "log:\n  format: json\n{}",
        proxy_config("  access_log: true\n")
    ))
    .await;
    let web = upstreams("web", 1).await;
    register(&agent, "web.yaml", "web", "http", &web);
    let (client, url) = vip_client(&agent, "web", web[0].addr.port()).await;

    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = client
        .get(format!("{url}given"))
        .header("traceparent", given)
        .header("x-request-id", "checkout-7")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-traceparent-seen"], given);
    assert_eq!(r.headers()["x-request-id-seen"], "checkout-7");
    assert_eq!(r.headers()["x-request-id"], "checkout-7");

    let r = client.get(format!("{url}made")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let made = r.headers()["x-traceparent-seen"]
        .to_str()
        .unwrap()
        .to_string();
    let parts: Vec<&str> = made.split('-').collect();
    assert_eq!(parts.len(), 4, "{made}");
    assert_eq!(
        (parts[0], parts[3]),
        ("00", "00"),
        "version 00, not sampled: {made}"
    );
    assert!(parts[1].len() == 32 && parts[2].len() == 16, "{made}");
    assert!(
        parts[1..3].iter().all(|p| p
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            && p.chars().any(|c| c != '0')),
        "{made}"
    );
    let request_id = r.headers()["x-request-id-seen"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(request_id.len(), 36, "a UUID: {request_id}");
    assert_eq!(r.headers()["x-request-id"], request_id.as_str());
    let again = client.get(format!("{url}made")).send().await.unwrap();
    assert_ne!(
        again.headers()["x-request-id"],
        request_id.as_str(),
        "one per request"
    );

    let lines = agent
        .eventually("access log lines with the ids", || async {
            let lines: Vec<serde_json::Value> = agent
                .log()
                .lines()
                .filter_map(|line| serde_json::from_str(line).ok())
                .filter(|line: &serde_json::Value| {
                    line["target"] == "signpost::access"
                        && (line["path"] == "/given" || line["path"] == "/made")
                })
                .collect();
            (lines.len() >= 2).then_some(lines)
        })
        .await;
    assert_eq!(
        lines[0]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "{}",
        lines[0]
    );
    assert_eq!(lines[0]["request_id"], "checkout-7", "{}", lines[0]);
    assert_eq!(lines[1]["trace_id"], parts[1], "{}", lines[1]);
    assert_eq!(lines[1]["request_id"], request_id.as_str(), "{}", lines[1]);
}

/// A client that shuts its sending side after the request (HTTP/1.1
/// allows it) still gets the answer.
#[tokio::test]
async fn a_half_closed_client_gets_its_answer() {
    let agent = agent("").await;
    let web = upstreams("web", 1).await;
    register(&agent, "web.yaml", "web", "http", &web);
    let port = web[0].addr.port();
    let addr = vip(&agent, "web", port).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /half HTTP/1.1\r\nHost: web.service.internal\r\n\r\n")
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

/// A gRPC instance (the standard health service, `ledger` serving) on a
/// loopback address of its own; that address.
async fn grpc_instance() -> SocketAddr {
    let listener = bind(0).await;
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_grpc_health(listener, "ledger"));
    addr
}

/// A gRPC health client of the instances behind `addr`.
async fn health_client(
    addr: SocketAddr,
) -> tonic_health::pb::health_client::HealthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(channel)
}

/// Asks the health service behind `client` for `service`.
async fn health_check(
    client: &mut tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>,
    service: &str,
) -> Result<i32, tonic::Status> {
    let request = tonic_health::pb::HealthCheckRequest {
        service: service.to_string(),
    };
    Ok(client.check(request).await?.into_inner().status)
}

/// gRPC (HTTP/2 with prior knowledge on both sides) through the VIP.
#[tokio::test]
async fn grpc_goes_through_the_proxy_over_h2c() {
    use tonic_health::pb::health_check_response::ServingStatus;

    let agent = agent("").await;
    let grpc = grpc_instance().await;
    register_at(&agent, "ledger", "grpc", grpc);
    let mut client = health_client(vip(&agent, "ledger", grpc.port()).await).await;
    for _ in 0..3 {
        let status = health_check(&mut client, "ledger").await.unwrap();
        assert_eq!(status, ServingStatus::Serving as i32);
    }
    let unknown = health_check(&mut client, "nope").await.unwrap_err();
    assert_eq!(
        unknown.code(),
        tonic::Code::NotFound,
        "gRPC status passes through"
    );
}

/// Services come and go; listeners open and close; a connection through
/// another service's VIP never notices.
#[tokio::test]
async fn listeners_come_and_go_without_disturbing_other_connections() {
    let agent = agent("").await;
    let a = echo_server().await;
    let b = echo_server().await;
    let file = |name: &str, addr: SocketAddr| {
        format!(
            "services:\n  - name: {name}\n    address: {}\n    port: {}\n",
            addr.ip(),
            addr.port()
        )
    };
    agent.write_service_file("a.yaml", &file("alpha", a));
    let alpha = vip(&agent, "alpha", a.port()).await;
    let mut long_lived = TcpStream::connect(alpha).await.unwrap();
    assert_eq!(echo(&mut long_lived, "one").await, "one");

    // A new service: its listener opens.
    agent.write_service_file("b.yaml", &file("beta", b));
    let beta = vip(&agent, "beta", b.port()).await;
    let mut short = TcpStream::connect(beta).await.unwrap();
    assert_eq!(echo(&mut short, "beta").await, "beta");
    assert_eq!(echo(&mut long_lived, "two").await, "two");

    // The service goes away: its listener closes, its open connection
    // and the other service's carry on.
    std::fs::remove_file(agent.services_dir().join("b.yaml")).unwrap();
    agent
        .eventually("beta's listener to close", || async {
            TcpStream::connect(beta).await.is_err().then_some(())
        })
        .await;
    assert_eq!(echo(&mut short, "still").await, "still");
    assert_eq!(echo(&mut long_lived, "three").await, "three");
    assert_eq!(
        agent.metric("signpost_agent_proxy_listeners").await,
        1.0,
        "only alpha's listener is left"
    );
}

/// A real Redis server reached with its own client through the L4 proxy.
#[tokio::test]
#[ignore = "needs redis-server and redis-cli"]
async fn redis_works_through_the_l4_proxy() {
    let agent = agent("").await;
    let port = bind(0).await.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut redis = tokio::process::Command::new("redis-server")
        .args([
            "--bind",
            &port.ip().to_string(),
            "--port",
            &port.port().to_string(),
        ])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(dir.path())
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("cannot run redis-server (install redis-server)");
    register_at(&agent, "cache", "tcp", port);
    let addr = vip(&agent, "cache", port.port()).await;
    let cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .args(args)
            .output()
            .expect("cannot run redis-cli (install redis-tools)");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // redis-server may still be starting.
    agent
        .eventually("redis to answer through the VIP", || async {
            (cli(&["PING"]) == "PONG").then_some(())
        })
        .await;
    assert_eq!(cli(&["SET", "greeting", "through signpost"]), "OK");
    assert_eq!(cli(&["GET", "greeting"]), "through signpost");
    redis.kill().await.unwrap();
}

/// An instance's metric series go when it leaves the service (a fleet
/// whose instances come and go would otherwise grow them for ever); the
/// remaining instance's series stay and keep counting.
#[tokio::test]
async fn an_instances_metric_series_go_when_it_leaves() {
    let agent = agent("  defaults:\n    balancer: round_robin\n").await;
    let web = upstreams("web", 2).await;
    register(&agent, "web.yaml", "web", "http", &web);
    let (c, url) = vip_client(&agent, "web", web[0].addr.port()).await;
    let seen = spread(&c, &url, 4).await;
    assert_eq!(seen.len(), 2, "both instances answered: {seen:?}");
    let series = |u: &Upstream| {
        format!(
            "signpost_agent_proxy_requests_total{{service=\"web\",instance=\"{}\",class=\"2xx\"}}",
            u.addr
        )
    };
    assert!(agent.metric(&series(&web[0])).await >= 1.0);
    assert!(agent.metric(&series(&web[1])).await >= 1.0);

    register(&agent, "web.yaml", "web", "http", &web[..1]);
    let gone = format!("instance=\"{}\"", web[1].addr);
    agent
        .eventually("the series of the instance that left to go", || async {
            (!agent.get("/metrics").await.text.contains(&gone)).then_some(())
        })
        .await;
    let before = agent.metric(&series(&web[0])).await;
    assert!(before >= 1.0, "the remaining instance's series stays");
    spread(&c, &url, 2).await;
    assert_eq!(agent.metric(&series(&web[0])).await, before + 2.0);
}

/// A service no longer in use on the host takes its metric series with
/// it (requests, latency, connections, errors, retries); another
/// service's stay.
#[tokio::test]
async fn a_services_metric_series_go_when_it_leaves() {
    let agent = agent("  defaults:\n    eject_after: 0\n").await;
    let web = upstreams("web", 1).await;
    let api = upstreams("api", 1).await;
    register(&agent, "web.yaml", "web", "http", &web);
    register(&agent, "api.yaml", "api", "http", &api);
    let (web_client, web_url) = vip_client(&agent, "web", web[0].addr.port()).await;
    spread(&web_client, &web_url, 2).await;
    let (c, url) = vip_client(&agent, "api", api[0].addr.port()).await;
    spread(&c, &url, 2).await;
    // The proxy's own answer: counted with its reason.
    api[0].kill();
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.headers()["x-signpost-error"], "connect_failed");
    let text = agent.get("/metrics").await.text;
    for series in [
        "signpost_agent_proxy_requests_total{service=\"api\",instance=\"\",class=\"5xx\"}",
        "signpost_agent_proxy_errors_total{service=\"api\",reason=\"connect_failed\"}",
        "signpost_agent_proxy_connections_total{service=\"api\"}",
        "signpost_agent_proxy_request_duration_seconds_count{service=\"api\"}",
    ] {
        assert!(text.contains(series), "{series} in\n{text}");
    }

    std::fs::remove_file(agent.services_dir().join("api.yaml")).unwrap();
    agent
        .eventually("the series of the service that left to go", || async {
            let text = agent.get("/metrics").await.text;
            (!text.contains("service=\"api\"")).then_some(())
        })
        .await;
    let web_requests = "signpost_agent_proxy_requests_total{service=\"web\",instance=";
    let text = agent.get("/metrics").await.text;
    assert!(text.contains(web_requests), "web's series stay:\n{text}");
    assert!(text.contains("signpost_agent_proxy_connections_total{service=\"web\"}"));
}
