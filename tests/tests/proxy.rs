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

/// A gRPC call (a POST whose body has no length ahead) to an instance
/// that refuses connections goes on to another: nothing of it was sent.
#[tokio::test]
async fn a_grpc_call_goes_on_to_another_instance_when_one_is_unreachable() {
    use tonic_health::pb::health_check_response::ServingStatus;

    let agent = agent("  defaults:\n    balancer: round_robin\n    eject_after: 0\n").await;
    let live = grpc_instance().await;
    // The same port on another address, closed again: refused.
    let dead = bind(live.port()).await.local_addr().unwrap();
    let entries: String = [("ledger-1", live), ("ledger-2", dead)]
        .iter()
        .map(|(id, a)| {
            format!(
                "  - name: ledger\n    id: {id}\n    address: {}\n    port: {}\n    protocol: grpc\n",
                a.ip(),
                a.port()
            )
        })
        .collect();
    agent.write_service_file("ledger.yaml", &format!("services:\n{entries}"));
    let mut client = health_client(vip(&agent, "ledger", live.port()).await).await;
    // Round robin sends every other call to the dead instance first.
    for n in 0..6 {
        let status = health_check(&mut client, "ledger")
            .await
            .unwrap_or_else(|e| panic!("call {n}: {e}"));
        assert_eq!(status, ServingStatus::Serving as i32);
    }
    let retries = agent
        .metric("signpost_agent_proxy_retries_total{service=\"ledger\"}")
        .await;
    assert!(
        retries >= 1.0,
        "the dead instance was tried first: {retries}"
    );
}

/// An instance dies while clients keep sending GETs: none of them fails.
#[tokio::test]
async fn a_killed_instance_costs_no_idempotent_request() {
    let agent = agent("").await;
    let web = upstreams("web", 3).await;
    register(&agent, "web.yaml", "web", "http", &web);
    let port = web[0].addr.port();
    let addr = vip(&agent, "web", port).await;
    let url = format!("http://web.service.internal:{port}/");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = JoinSet::new();
    for _ in 0..4 {
        let (c, url, stop) = (
            client("web.service.internal", addr),
            url.clone(),
            stop.clone(),
        );
        load.spawn(async move {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => failed.push(format!(
                        "{} {:?}",
                        r.status(),
                        r.headers().get("x-signpost-error")
                    )),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        });
    }
    // Some load first, then the kill, then more load.
    agent
        .eventually("traffic on every instance", || async {
            web.iter().all(|u| u.hits() > 20).then_some(())
        })
        .await;
    web[1].kill();
    let after = web[0].hits() + web[2].hits();
    agent
        .eventually("more traffic after the kill", || async {
            (web[0].hits() + web[2].hits() > after + 300).then_some(())
        })
        .await;
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    while let Some(result) = load.join_next().await {
        let (ok, failed) = result.unwrap();
        assert!(
            failed.is_empty(),
            "failed requests: {failed:?}\n{}",
            agent.log()
        );
        total += ok;
    }
    assert!(total > 300, "{total}");
}

/// An instance that accepts and never answers: the per-try timeout moves
/// the request to another instance.
#[tokio::test]
async fn a_hanging_instance_times_out_per_try_and_the_request_goes_elsewhere() {
    let agent = agent("  defaults:\n    try_timeout: 300ms\n    balancer: round_robin\n").await;
    let web = upstreams("web", 2).await;
    web[0].set_status(HANG);
    register(&agent, "web.yaml", "web", "http", &web);
    let port = web[0].addr.port();
    let addr = vip(&agent, "web", port).await;
    let c = client("web.service.internal", addr);
    // Round robin sends every other request to the hanging instance
    // first (until it is ejected).
    let mut retried = 0;
    for _ in 0..6 {
        let r = c
            .get(format!("http://web.service.internal:{port}/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        if r.headers()["x-attempt-seen"] == "2" {
            retried += 1;
        }
        assert_eq!(r.text().await.unwrap(), "web-2");
    }
    assert!(retried >= 1, "some requests were answered by their retry");
    assert!(web[0].hits() >= 1);
    let retries = agent
        .metric("signpost_agent_proxy_retries_total{service=\"web\"}")
        .await;
    assert!(retries >= 1.0, "{retries}");

    // POST is not idempotent: after a try timeout it is not sent again,
    // the client gets 504 with the reason.
    web[1].set_status(HANG);
    let r = c
        .post(format!("http://web.service.internal:{port}/"))
        .body("pay")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(r.headers()["x-signpost-error"], "try_timeout");
}

/// What an instance behind the VIP answered to a streamed request.
struct Streamed {
    status: u16,
    /// The instance's name; the proxy's message when it answered itself.
    body: String,
    /// How many body bytes the instance read.
    length: Option<usize>,
    /// Which attempt reached the instance.
    attempt: Option<String>,
    error: Option<String>,
}

/// Sends `method` to `addr` with a body of `parts` whose length is not
/// known ahead: chunked over HTTP/1.1, data frames without a length over
/// HTTP/2 (as gRPC sends), the way a client that streams does.
async fn send_streamed(addr: SocketAddr, http2: bool, method: &str, parts: &[usize]) -> Streamed {
    use http_body_util::BodyExt;
    use hyper::body::Frame;

    let frames: Vec<Result<Frame<bytes::Bytes>, std::convert::Infallible>> = parts
        .iter()
        .map(|&n| Ok(Frame::data(bytes::Bytes::from(vec![b'x'; n]))))
        .collect();
    let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let mut request = hyper::Request::builder()
        .method(method)
        .header("host", "web.service.internal");
    let response = if http2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(conn);
        request = request
            .uri(format!("http://web.service.internal:{}/", addr.port()))
            .version(hyper::Version::HTTP_2);
        sender.send_request(request.body(body).unwrap()).await
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        sender
            .send_request(request.uri("/").body(body).unwrap())
            .await
    }
    .unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let (length, attempt, error) = (
        header("x-body-length").map(|v| v.parse().unwrap()),
        header("x-attempt-seen"),
        header("x-signpost-error"),
    );
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Streamed {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        length,
        attempt,
        error,
    }
}

/// A streamed body (no length ahead, so not read whole first) is never
/// lost to an instance that cannot be reached: nothing of it was sent, so
/// even a POST goes on to another instance.
#[tokio::test]
async fn a_streamed_body_goes_on_to_another_instance_when_one_is_unreachable() {
    let agent = agent("  defaults:\n    balancer: round_robin\n    eject_after: 0\n").await;
    let web = upstreams("web", 2).await;
    register(&agent, "web.yaml", "web", "http", &web);
    let port = web[0].addr.port();
    let addr = vip(&agent, "web", port).await;
    // Killed after its registration: the proxy still has it in its list
    // (no health check), and each connection to it is refused.
    web[1].kill();
    for http2 in [false, true] {
        // Round robin sends every other request to the dead instance first.
        for n in 0..6 {
            let r = send_streamed(addr, http2, "POST", &[1000, 2000, 3000]).await;
            assert_eq!(
                (r.status, r.error.as_deref()),
                (200, None),
                "POST {n} (HTTP/2: {http2}): {}",
                r.body
            );
            assert_eq!(r.body, "web-1");
            assert_eq!(r.length, Some(6000), "the whole body reached the instance");
        }
    }
    let retries = agent
        .metric("signpost_agent_proxy_retries_total{service=\"web\"}")
        .await;
    assert!(
        retries >= 2.0,
        "the dead instance was tried first: {retries}"
    );
}

/// A POST (not repeated once sent) reaches the instance while its body is
/// still on its way: the proxy keeps no copy, so it does not wait for the
/// whole body first.
#[tokio::test]
async fn a_post_body_is_streamed_to_the_instance() {
    let agent = agent("").await;
    let web = upstreams("web", 1).await;
    register(&agent, "web.yaml", "web", "http", &web);
    let addr = vip(&agent, "web", web[0].addr.port()).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"POST / HTTP/1.1\r\nhost: web.service.internal\r\ncontent-length: 10\r\nconnection: close\r\n\r\nhello")
        .await
        .unwrap();
    agent
        .eventually(
            "the instance to get the request before its body ends",
            || async { (web[0].hits() == 1).then_some(()) },
        )
        .await;
    stream.write_all(b"world").await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("x-body-length: 10\r\n"), "{answer}");
}

/// An idempotent request whose streamed body ended within 64 KiB is sent
/// again after a 503, from the copy the proxy kept as it went; a longer
/// one is sent once, and the instance's own answer comes back.
#[tokio::test]
async fn a_streamed_body_within_64_kib_is_sent_again_on_a_retry() {
    let agent = agent("  defaults:\n    balancer: round_robin\n    eject_after: 0\n").await;
    let web = upstreams("web", 2).await;
    web[0].set_status(503);
    register(&agent, "web.yaml", "web", "http", &web);
    let port = web[0].addr.port();
    let addr = vip(&agent, "web", port).await;
    let mut retried = 0;
    for http2 in [false, true] {
        for n in 0..6 {
            let r = send_streamed(addr, http2, "PUT", &[1000, 30_000, 5000]).await;
            assert_eq!(r.status, 200, "PUT {n} (HTTP/2: {http2}): {}", r.body);
            assert_eq!(r.body, "web-2");
            assert_eq!(r.length, Some(36_000), "the whole body, once");
            if r.attempt.as_deref() == Some("2") {
                retried += 1;
            }
        }
    }
    assert!(
        retried >= 2,
        "some PUTs reached web-2 on their second attempt"
    );

    // Over 64 KiB: not kept, so the 503 of the instance that read it all
    // is the answer when that instance came first.
    let mut refused = 0;
    for n in 0..4 {
        let r = send_streamed(addr, false, "PUT", &[40_000, 40_000]).await;
        assert_eq!(r.length, Some(80_000), "PUT {n}: the instance read it all");
        match r.status {
            200 => assert_eq!(r.body, "web-2"),
            503 => {
                assert_eq!(r.error, None, "the instance's own answer");
                refused += 1;
            }
            other => panic!("PUT {n}: {other} {}", r.body),
        }
    }
    assert!(refused >= 1, "round robin sent one to web-1 first");
}

/// Peak-EWMA: a slow instance gets a small share of the requests.
#[tokio::test]
async fn a_slow_instance_receives_less_traffic() {
    let agent = agent("").await;
    let web = upstreams("web", 2).await;
    web[0].set_delay(100);
    register(&agent, "web.yaml", "web", "http", &web);
    let port = web[0].addr.port();
    let addr = vip(&agent, "web", port).await;
    let c = client("web.service.internal", addr);
    let seen = spread(&c, &format!("http://web.service.internal:{port}/"), 100).await;
    let slow = seen.get("web-1").copied().unwrap_or(0);
    assert!(slow <= 10, "the slow instance got {slow} of 100: {seen:?}");
}

/// Consecutive 5xx eject an instance; once its ejection is over, one
/// probe request readmits it if it answers well.
#[tokio::test]
async fn failing_instances_are_ejected_and_readmitted_after_a_good_probe() {
    let agent = agent(
        "  defaults:\n    balancer: round_robin\n    retries: 0\n    eject_after: 3\n    eject_base: 3s\n",
    )
    .await;
    let web = upstreams("web", 2).await;
    web[0].set_status(500);
    register(&agent, "web.yaml", "web", "http", &web);
    let port = web[0].addr.port();
    let (c, url) = vip_client(&agent, "web", port).await;
    let mut errors = 0;
    for _ in 0..20 {
        let r = c.get(&url).send().await;
        let r = r.unwrap_or_else(|e| panic!("{e:?}\n{}", agent.log()));
        if r.status() == 500 {
            errors += 1;
        }
    }
    assert_eq!(errors, 3, "ejected after 3 consecutive 5xx");
    let ejections = agent
        .metric(&format!(
            "signpost_agent_proxy_ejections_total{{service=\"web\",instance=\"{}\"}}",
            web[0].addr
        ))
        .await;
    assert_eq!(ejections, 1.0);

    web[0].set_status(200);
    let before = web[0].hits();
    // After the ejection period the instance gets its probe, then traffic.
    agent
        .eventually("the healed instance to be used again", || async {
            let seen = spread(&c, &url, 4).await;
            (seen.get("web-1").copied().unwrap_or(0) >= 2).then_some(())
        })
        .await;
    assert!(web[0].hits() > before);
    assert!(agent.log().contains("readmitted"), "{}", agent.log());
}

/// With fewer than half the instances healthy, the proxy balances over
/// all of them rather than piling everything on the survivors.
#[tokio::test]
async fn below_the_panic_threshold_all_instances_get_traffic() {
    let agent = agent("  defaults:\n    balancer: round_robin\n").await;
    let web = upstreams("web", 3).await;
    register(&agent, "web.yaml", "web", "http", &web);
    let port = web[0].addr.port();
    let (c, url) = vip_client(&agent, "web", port).await;

    // One of three in maintenance (critical): the other two take it all.
    agent
        .put("/v1/agent/service/maintenance/web-1?enable=true", None)
        .await;
    agent
        .eventually("web-1 to leave the rotation", || async {
            let seen = spread(&c, &url, 12).await;
            (!seen.contains_key("web-1")).then_some(())
        })
        .await;
    assert_eq!(
        agent
            .metric("signpost_agent_proxy_panic{service=\"web\"}")
            .await,
        0.0
    );

    // Two of three: 33 % available is under 50 %, so all three serve.
    agent
        .put("/v1/agent/service/maintenance/web-2?enable=true", None)
        .await;
    agent
        .eventually("every instance to serve in panic", || async {
            let seen = spread(&c, &url, 12).await;
            (seen.len() == 3).then_some(())
        })
        .await;
    assert_eq!(
        agent
            .metric("signpost_agent_proxy_panic{service=\"web\"}")
            .await,
        1.0
    );
}

/// When every instance answers 503, retries stop at the budget instead of
/// multiplying the load.
#[tokio::test]
async fn the_retry_budget_caps_retries() {
    let agent = agent(
        "  defaults:\n    retries: 2\n    retry_budget_ratio: 0\n    retry_budget_min_per_second: 1\n    retry_backoff: 1ms\n    retry_backoff_max: 1ms\n    eject_after: 0\n",
    )
    .await;
    let web = upstreams("web", 2).await;
    for u in &web {
        u.set_status(503);
    }
    register(&agent, "web.yaml", "web", "http", &web);
    let port = web[0].addr.port();
    let addr = vip(&agent, "web", port).await;
    let c = client("web.service.internal", addr);
    for _ in 0..60 {
        let r = c
            .get(format!("http://web.service.internal:{port}/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
    }
    let sent = web[0].hits() + web[1].hits();
    let retries = agent
        .metric("signpost_agent_proxy_retries_total{service=\"web\"}")
        .await;
    let exhausted = agent
        .metric("signpost_agent_proxy_retry_budget_exhausted_total{service=\"web\"}")
        .await;
    // Without a budget: 60 requests x 3 attempts = 180.
    assert!(sent < 90, "{sent} attempts reached the instances");
    assert_eq!(
        sent as f64,
        60.0 + retries,
        "every attempt is a request or a counted retry"
    );
    assert!(exhausted >= 30.0, "{exhausted}");
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

/// Beyond max_requests and max_pending a request fails at once with 503
/// and the limit's name; beyond max_connections a connection does.
#[tokio::test]
async fn limits_fail_fast_with_the_reason() {
    let agent =
        agent("  defaults:\n    max_requests: 1\n    max_pending: 0\n    max_connections: 3\n")
            .await;
    let web = upstreams("web", 1).await;
    // 3s: the second request surely comes while the first is held.
    web[0].set_delay(3000);
    register(&agent, "web.yaml", "web", "http", &web);
    let port = web[0].addr.port();
    let addr = vip(&agent, "web", port).await;
    let url = format!("http://web.service.internal:{port}/");
    let slow = {
        let (c, url) = (client("web.service.internal", addr), url.clone());
        tokio::spawn(async move { c.get(&url).send().await.unwrap().status() })
    };
    agent
        .eventually("the slow request to reach the instance", || async {
            (web[0].hits() == 1).then_some(())
        })
        .await;
    let r = client("web.service.internal", addr)
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-signpost-error"], "max_pending");
    assert_eq!(slow.await.unwrap(), 200, "the admitted request is served");
    assert!(
        agent.log().contains("max_pending"),
        "the log names the limit"
    );

    // Three connections are open (the two above may still be pooled, so
    // open fresh ones until one is refused).
    web[0].set_delay(0);
    let mut held = Vec::new();
    let refused = loop {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        if head.starts_with("HTTP/1.1 503") {
            break head;
        }
        assert!(held.len() < 5, "max_connections never applied: {head}");
        held.push(s);
    };
    assert!(
        refused
            .to_ascii_lowercase()
            .contains("x-signpost-error: max_connections"),
        "{refused}"
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

/// Every packet to and from an address is dropped while this lives: the
/// host there is gone without a reset, as when it loses power or the
/// network between is cut.
struct Vanished(std::net::IpAddr);

impl Vanished {
    fn new(ip: std::net::IpAddr) -> Vanished {
        for side in ["-s", "-d"] {
            let status = std::process::Command::new("iptables")
                .args(["-I", "INPUT", side, &ip.to_string(), "-j", "DROP"])
                .status()
                .expect("cannot run iptables (install iptables; needs root)");
            assert!(status.success(), "iptables could not drop {side} {ip}");
        }
        Vanished(ip)
    }
}

impl Drop for Vanished {
    fn drop(&mut self) {
        for side in ["-s", "-d"] {
            let removed = std::process::Command::new("iptables")
                .args(["-D", "INPUT", side, &self.0.to_string(), "-j", "DROP"])
                .status();
            if !removed.is_ok_and(|s| s.success()) {
                eprintln!(
                    "could not remove the iptables rule dropping {side} {}",
                    self.0
                );
            }
        }
    }
}

/// Connections to an instance whose host goes silent are closed, and the
/// clients' with them: keep-alive probes find an idle L4 connection and
/// an idle tunnel (a switch of protocols), unacknowledged data a busy L4
/// connection. Without them the idle ones would stay open forever and
/// the busy one for 15 minutes.
#[tokio::test]
#[ignore = "needs root and iptables"]
async fn connections_to_an_instance_whose_host_vanished_are_closed() {
    let agent = agent("  tcp_keepalive: 1s\n  tcp_user_timeout: 3s\n").await;
    let echo_addr = echo_server().await;
    register_at(&agent, "echo", "tcp", echo_addr);
    let addr = vip(&agent, "echo", echo_addr.port()).await;
    let mut idle = TcpStream::connect(addr).await.unwrap();
    assert_eq!(echo(&mut idle, "idle").await, "idle");
    let mut busy = TcpStream::connect(addr).await.unwrap();
    assert_eq!(echo(&mut busy, "busy").await, "busy");
    let server = upgrading_server().await;
    register_at(&agent, "ws", "http", server);
    let (mut tunnel, head) = switch_to_echo(vip(&agent, "ws", server.port()).await).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert_eq!(echo(&mut tunnel, "tunnel").await, "tunnel");

    let _gone = [Vanished::new(echo_addr.ip()), Vanished::new(server.ip())];
    busy.write_all(b"to a host that is gone").await.unwrap();
    for (what, stream) in [
        ("idle", &mut idle),
        ("busy", &mut busy),
        ("tunnel", &mut tunnel),
    ] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(2 * signpost_tests::PATIENCE, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("the {what} connection is still open"));
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "the {what} connection is closed, not answered: {read:?}"
        );
    }
}

/// Instances in the agent's zone take the traffic while they are
/// available; then the other zone does.
#[tokio::test]
async fn the_agents_zone_is_preferred_while_it_has_available_instances() {
    let range = format!("127.76.{}.0/24", rand::random_range(0..=255u8));
    let agent = Agent::start(&format!(
        "zone: east\ndns:\n  recursors: []\nproxy:\n  vip_range: {range}\n  defaults:\n    balancer: round_robin\n"
    ))
    .await;
    let web = upstreams("web", 3).await;
    let zones = ["east", "west", "west"];
    let entries: String = web
        .iter()
        .zip(zones)
        .map(|(u, zone)| format!("{}    zone: {zone}\n", u.entry("web", "http")))
        .collect();
    agent.write_service_file("web.yaml", &format!("services:\n{entries}"));
    let port = web[0].addr.port();
    let (c, url) = vip_client(&agent, "web", port).await;
    let seen = spread(&c, &url, 12).await;
    assert_eq!(
        seen.get("web-1"),
        Some(&12),
        "all in the agent's zone: {seen:?}"
    );

    agent
        .put("/v1/agent/service/maintenance/web-1?enable=true", None)
        .await;
    agent
        .eventually("the other zone to take over", || async {
            let seen = spread(&c, &url, 12).await;
            (!seen.contains_key("web-1") && seen.len() == 2).then_some(())
        })
        .await;
}

/// Asks for each of 30 keys three times, `ask(key)` giving the instance
/// that answered; each key must stay on one instance and the keys must
/// spread over all three.
async fn keys_stick<F, Fut>(what: &str, mut ask: F)
where
    F: FnMut(u8) -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let mut owners = HashMap::new();
    for round in 0..3 {
        for key in 0..30 {
            let instance = ask(key).await;
            let first = owners.entry(key).or_insert_with(|| instance.clone());
            assert_eq!(*first, instance, "{what}: key {key} moved in round {round}");
        }
    }
    let used: std::collections::HashSet<&String> = owners.values().collect();
    assert_eq!(used.len(), 3, "{what}: 30 keys spread over the 3 instances");
}

/// The hash balancer keeps each key on one instance: a header, a cookie
/// (among others in the header), the client's address for L7 and, for
/// L4, the client's address of each new connection.
#[tokio::test]
async fn a_hash_key_sticks_to_one_instance() {
    let agent = agent(concat!(
        "  services:\n",
        "    header: {balancer: hash, hash_key: \"header:x-user\"}\n",
        "    cookie: {balancer: hash, hash_key: \"cookie:sid\"}\n",
        "    address: {balancer: hash, hash_key: client_ip}\n",
        "    bulk: {balancer: hash}\n",
    ))
    .await;
    let mut urls = HashMap::new();
    for (service, protocol) in [
        ("header", "http"),
        ("cookie", "http"),
        ("address", "http"),
        ("bulk", "tcp"),
    ] {
        let ups = upstreams(service, 3).await;
        register(&agent, &format!("{service}.yaml"), service, protocol, &ups);
        let port = ups[0].addr.port();
        let addr = vip(&agent, service, port).await;
        urls.insert(
            service,
            (addr, format!("http://{service}.service.internal:{port}/")),
        );
    }
    // A client of its own per key, on its own loopback address, opening
    // a new connection for every request.
    let net = rand::random_range(0..=255u8);
    let from = |service: &str, key: u8| {
        let (addr, _) = urls[service];
        client_builder(&format!("{service}.service.internal"), addr)
            .local_address(std::net::IpAddr::from([127, 78, net, key + 1]))
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    let text = |r: reqwest::Response| async move {
        assert_eq!(r.status(), 200, "{:?}", r.headers().get("x-signpost-error"));
        r.text().await.unwrap()
    };

    let c = from("header", 0);
    keys_stick("header", |key| {
        let r = c
            .get(&urls["header"].1)
            .header("x-user", format!("user-{key}"))
            .send();
        async move { text(r.await.unwrap()).await }
    })
    .await;
    let c = from("cookie", 0);
    keys_stick("cookie", |key| {
        let cookie = format!("theme=dark; sid=session-{key}; lang=en");
        let r = c.get(&urls["cookie"].1).header("cookie", cookie).send();
        async move { text(r.await.unwrap()).await }
    })
    .await;
    for service in ["address", "bulk"] {
        let clients: Vec<_> = (0..30).map(|key| from(service, key)).collect();
        keys_stick(service, |key| {
            let r = clients[usize::from(key)].get(&urls[service].1).send();
            async move { text(r.await.unwrap()).await }
        })
        .await;
    }
}

/// An operator's policy: a blocked instance gets nothing, an open circuit
/// fails every request at once with the reason.
#[tokio::test]
async fn blocked_instances_and_an_open_circuit_apply() {
    let web = upstreams("web", 2).await;
    let api = upstreams("api", 1).await;
    let agent = agent(&format!(
        "  services:\n    web: {{blocked: [\"{}\"]}}\n    api: {{circuit: open}}\n",
        web[0].addr
    ))
    .await;
    register(&agent, "web.yaml", "web", "http", &web);
    register(&agent, "api.yaml", "api", "http", &api);
    let port = web[0].addr.port();
    let addr = vip(&agent, "web", port).await;
    let c = client("web.service.internal", addr);
    let seen = spread(&c, &format!("http://web.service.internal:{port}/"), 20).await;
    assert_eq!(seen.get("web-2"), Some(&20), "{seen:?}");
    assert_eq!(web[0].hits(), 0);

    let port = api[0].addr.port();
    let addr = vip(&agent, "api", port).await;
    let r = client("api.service.internal", addr)
        .get(format!("http://api.service.internal:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-signpost-error"], "circuit_open");
    assert_eq!(api[0].hits(), 0, "nothing reaches the instance");
}

/// The automatic breaker: consecutive failed requests open the circuit
/// (requests fail fast without reaching the service), a good probe after
/// `breaker_open_for` closes it.
#[tokio::test]
async fn the_breaker_opens_on_failures_and_a_good_probe_closes_it() {
    let agent = agent(
        "  defaults:\n    retries: 0\n    eject_after: 0\n    breaker_failures: 3\n    breaker_open_for: 3s\n",
    )
    .await;
    let web = upstreams("web", 1).await;
    web[0].set_status(500);
    register(&agent, "web.yaml", "web", "http", &web);
    let port = web[0].addr.port();
    let (c, url) = vip_client(&agent, "web", port).await;
    for _ in 0..3 {
        assert_eq!(c.get(&url).send().await.unwrap().status(), 500);
    }
    let hits = web[0].hits();
    for _ in 0..5 {
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["x-signpost-error"], "circuit_open");
    }
    assert_eq!(web[0].hits(), hits, "an open circuit calls nothing");

    web[0].set_status(200);
    agent
        .eventually("the circuit to close after a good probe", || async {
            (c.get(&url).send().await.unwrap().status() == 200).then_some(())
        })
        .await;
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    assert!(agent.log().contains("circuit closed"), "{}", agent.log());
}

/// An HTTP/1.1 instance that switches to an echo protocol when asked
/// (`Upgrade: echo`), also unasked on `/unasked`, and otherwise answers
/// with the `Upgrade` header it received (`-` when none).
async fn upgrading_server() -> SocketAddr {
    let listener = bind(0).await;
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(|mut req: hyper::Request<_>| async move {
                let asked = req.headers().get("upgrade").cloned();
                let echo = asked.as_ref().is_some_and(|v| v == "echo");
                let response = if echo || req.uri().path() == "/unasked" {
                    let upgrade = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let Ok(upgraded) = upgrade.await else { return };
                        let mut io = hyper_util::rt::TokioIo::new(upgraded);
                        let mut buf = [0u8; 4096];
                        while let Ok(n @ 1..) = io.read(&mut buf).await {
                            if io.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                    hyper::Response::builder()
                        .status(101)
                        .header("connection", "upgrade")
                        .header("upgrade", "echo")
                        .body(http_body_util::Full::new(bytes::Bytes::new()))
                } else {
                    let seen = asked.map_or("-".to_string(), |v| v.to_str().unwrap().to_string());
                    hyper::Response::builder()
                        .body(http_body_util::Full::new(bytes::Bytes::from(seen)))
                };
                Ok::<_, std::convert::Infallible>(response.unwrap())
            });
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// Connects to `addr` and asks to switch to `upgrading_server`'s echo
/// protocol; the answer's head, lower-cased.
async fn switch_to_echo(addr: SocketAddr) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /chat HTTP/1.1\r\nHost: ws.service.internal\r\nConnection: keep-alive, Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    (stream, head)
}

/// Reads an answer's head (to the blank line), lower-cased.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(
            stream.read(&mut byte).await.unwrap(),
            1,
            "closed after {head:?}"
        );
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap().to_ascii_lowercase()
}

/// A client that asks to switch protocols (as a WebSocket does) gets the
/// instance's 101 and then a tunnel to it that holds its connection
/// (admission included) until the client closes it; an h2c switch is not
/// passed on, and a 101 nobody asked for is the instance's error.
#[tokio::test]
async fn a_switch_of_protocols_becomes_a_tunnel_to_the_instance() {
    let agent = agent("").await;
    let server = upgrading_server().await;
    register_at(&agent, "ws", "http", server);
    let addr = vip(&agent, "ws", server.port()).await;
    let active = "signpost_agent_proxy_connections_active{service=\"ws\"}";

    let (mut stream, head) = switch_to_echo(addr).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("\r\nupgrade: echo\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
    assert_eq!(echo(&mut stream, "hello").await, "hello");
    let long = "x".repeat(100_000);
    assert_eq!(echo(&mut stream, &long).await, long);
    assert_eq!(
        agent.metric(active).await,
        1.0,
        "the tunnel is still a connection"
    );
    drop(stream);
    agent
        .eventually("the tunnel's connection to close", || async {
            (agent.metric(active).await == 0.0).then_some(())
        })
        .await;

    let (client, url) = vip_client(&agent, "ws", server.port()).await;
    let answer = client
        .get(&url)
        .header("connection", "upgrade")
        .header("upgrade", "h2c")
        .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.text().await.unwrap(),
        "-",
        "h2c reached the instance"
    );

    let answer = client.get(format!("{url}unasked")).send().await.unwrap();
    assert_eq!(answer.status(), 502);
    assert_eq!(answer.headers()["x-signpost-error"], "upstream_upgrade");
}

/// A real WebSocket server and client (python3-websockets, from the
/// Debian package, hence the system interpreter) talk through the VIP.
#[tokio::test]
#[ignore = "needs python3-websockets"]
async fn a_websocket_client_reaches_a_websocket_server_through_the_vip() {
    const PYTHON: &str = "/usr/bin/python3";
    let peer = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/websocket.py");
    let agent = agent("").await;
    let port = bind(0).await.local_addr().unwrap();
    let mut server = tokio::process::Command::new(PYTHON)
        .args([
            peer,
            "serve",
            &port.ip().to_string(),
            &port.port().to_string(),
        ])
        .kill_on_drop(true)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("cannot run /usr/bin/python3 (install python3-websockets)");
    let mut ready = String::new();
    tokio::io::BufReader::new(server.stdout.as_mut().unwrap())
        .read_line(&mut ready)
        .await
        .unwrap();
    assert_eq!(
        ready.trim(),
        "listening",
        "the server did not start (install python3-websockets)"
    );
    register_at(&agent, "chat", "http", port);
    let addr = vip(&agent, "chat", port.port()).await;
    let out = tokio::process::Command::new(PYTHON)
        .args([peer, "client", &format!("ws://{addr}/chat")])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim() == "ok",
        "{stdout}\n{stderr}"
    );
    server.kill().await.unwrap();
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
