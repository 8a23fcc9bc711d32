//! Retries: a request or call goes on to another instance when one is
//! unreachable, killed or hanging, streamed bodies are sent again when
//! they can be, and the retry budget caps it all.

use super::*;

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
